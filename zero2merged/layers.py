"""One LoRA layer merged by PEFT and checked on probe activations, a block of rows at a time where it can be.

The maths stays PEFT's (its layer's own ``merge``): this module only gives a layer on the meta device its
weights, a piece at a time, and runs it before and after the merge on the same seeded probe inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from zero2merged.errors import VerificationError
from zero2merged.options import Tuning
from zero2merged.parity import MERGE_TOLERANCE, PROBE_BATCH, PROBE_SEED, compare
from zero2merged.results import PERFECT
from zero2merged.safetensors_io import Readers


class LayerMerger:
    """Gives each LoRA layer its weights, merges it with PEFT's own ``merge`` and checks it on probe
    activations, then puts it back on the meta device.

    A plain LoRA linear layer is merged a block of output rows at a time (``block_bytes`` of fp32): the
    block's rows of the base weight, ``lora_B`` and the bias, with all of ``lora_A``, are themselves a LoRA
    layer, whose merged rows are those of the whole. Any other layer is merged whole: a DoRA (or other
    variant) layer, whose PEFT code keeps state from call to call; an embedding or a Conv1D, whose rows lie
    the other way.

    Args:
        adapter: The adapter's name.
        sources: Stage 4's plan: wrapper key -> ``[file, name in it]``.
        device: Where each layer is merged and checked (weights are read and written on the CPU).
        block_bytes: See :class:`~zero2merged.options.Tuning`.

    Attributes:
        readers: The files read from, each header read once.
        merged: The paths of the layers merged so far.
        worst: The worst parity of the layers merged so far.
    """

    def __init__(self, adapter: str, sources: dict[str, list[str]], device: str, block_bytes: int = Tuning.block_bytes):
        self.adapter, self.sources, self.device, self.block_bytes = adapter, sources, device, block_bytes
        self.readers = Readers()
        self.merged: set[str] = set()
        self.worst = PERFECT
        self._buffers = torch.empty(2, block_bytes, dtype=torch.uint8)  # a block as stored, and in fp32

    def merge(self, path: str, layer: Any) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Merge the layer at ``path``; yields ``(base param name, first row, merged rows)`` on the CPU,
        each valid only until the next is asked for.

        Raises:
            VerificationError: (once all is yielded) the merged layer's outputs left tolerance.
        """
        self.merged.add(path)
        probe = self._probe(layer)
        before, after = [], []
        for first_row in self._weights_given(path, layer):
            layer.merged_adapters.clear()  # PEFT's record of the previous block's merge: this one is unmerged
            with torch.no_grad():
                before.append(layer(probe))
                layer.merge(adapter_names=[self.adapter])  # no safe_merge's copy: NaN/inf fails the parity check
                if self.adapter not in layer.merged_adapters:
                    raise VerificationError(f"{path}: PEFT did not merge the adapter into this layer")
                after.append(layer(probe))
            for name, param in layer.get_base_layer().named_parameters(recurse=False):
                yield name, first_row, param.detach().to("cpu")
        parity = compare(torch.cat(after, dim=-1), torch.cat(before, dim=-1))
        parity.check(MERGE_TOLERANCE, f"{path}: merged vs unmerged layer")
        self.worst = self.worst.worse(parity)

    def _weights_given(self, path: str, layer: Any) -> Iterator[int]:
        """Give the layer its weights (in fp32, on the device) whole or a block of rows at a time, the base
        weight's block in a buffer reused block after block; yields the first row given each time. Ends
        with the layer back on the meta device, as declared."""
        sources = {name: self.sources[f"{path}.{name}"] for name in layer.state_dict(keep_vars=True)}
        if not _by_rows(layer, self.adapter):
            layer.load_state_dict({name: self._fetch(*source) for name, source in sources.items()}, assign=True)
            yield 0
            layer.to("meta")
            return
        declared = {name: torch.empty_like(param) for name, param in layer.named_parameters()}
        out_features, in_features = declared["base_layer.weight"].shape
        step = max(1, self.block_bytes // (in_features * 4))
        _assign(layer, {name: self._fetch(*source) for name, source in sources.items() if name.startswith("lora_A.")})
        for first in range(0, out_features, step):
            rows = slice(first, min(first + step, out_features))
            _assign(
                layer,
                {
                    name: self._fetch(*source, rows, buffered=name == "base_layer.weight")
                    for name, source in sources.items()
                    if not name.startswith("lora_A.")
                },
            )
            yield first
        _assign(layer, declared)

    def _fetch(self, file: str, key: str, rows: slice | None = None, *, buffered: bool = False) -> torch.Tensor:
        """A stored tensor (or its ``rows``) on the device, in fp32 if floating point; ``buffered``: in
        the reused buffers where it fits (valid until the next buffered fetch)."""
        stored = self.readers[file].get(key, rows, into=self._buffers[0] if buffered else None)
        if not stored.is_floating_point():
            return stored.to(self.device)
        if buffered and self.device == "cpu" and stored.numel() * 4 <= self.block_bytes:
            return self._buffers[1].view(torch.float32)[: stored.numel()].view(stored.shape).copy_(stored)
        return stored.to(self.device, torch.float32)  # PEFT merges in fp32 here too

    def _probe(self, layer: Any) -> torch.Tensor:
        from torch import nn

        base, generator = layer.get_base_layer(), torch.Generator().manual_seed(PROBE_SEED)
        if isinstance(base, nn.Embedding):
            probe = torch.randint(0, base.num_embeddings, (PROBE_BATCH, 8), generator=generator)
        else:
            probe = torch.randn(PROBE_BATCH, layer.in_features, generator=generator)
        return probe.to(self.device)


def _by_rows(layer: Any, adapter: str) -> bool:
    """Whether ``layer`` is a plain LoRA linear layer (not DoRA or another variant, not Conv1D-shaped),
    whose state is all base layer, ``lora_A`` and ``lora_B``: the layers :class:`LayerMerger` splits."""
    from peft.tuners.lora import Linear
    from torch import nn

    return (
        type(layer) is Linear
        and type(layer.get_base_layer()) is nn.Linear
        and not layer.fan_in_fan_out
        and adapter not in layer.lora_variant
        and all(name.startswith(("base_layer.", "lora_A.", "lora_B.")) for name in layer.state_dict())
    )


def _assign(layer: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` the layer's parameters, whatever their shapes (``load_state_dict`` insists on the
    declared ones)."""
    from torch import nn

    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))

"""One LoRA layer merged by PEFT and checked on probe activations, a block of rows (or experts) at a time
where it can be.

The maths stays PEFT's (its layer's own ``merge``): this module only gives a layer on the meta device its
weights, a piece at a time, and checks its merged weights on seeded probe inputs against the unmerged layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from zero2merged.checks.parity import MERGE_TOLERANCE, PROBE_BATCH, PROBE_SEED, compare
from zero2merged.core.errors import VerificationError
from zero2merged.core.options import Tuning
from zero2merged.core.results import PERFECT
from zero2merged.model.weights import Readers


def wrapped_params(model: Any) -> Iterator[tuple[str, Any, dict[str, torch.nn.Parameter]]]:
    """``(path, LoRA layer, {name: param})``: each LoRA layer of the wrapper and the base params its merge
    changes, by their names in the base layer: all of a wrapped module's own (a linear layer's weight and
    bias), or the one parameter a ``ParamWrapper`` (PEFT's ``target_parameters``) wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "base_layer"):
            continue
        base = module.get_base_layer()
        name = getattr(module, "parameter_name", None)
        yield path, module, ({name: getattr(base, name)} if name else dict(base.named_parameters(recurse=False)))


class LayerMerger:
    """Gives each LoRA layer its weights, merges it with PEFT's own ``merge`` and checks it on probe
    activations, then puts it back on the meta device.

    A plain LoRA linear layer is merged a block of output rows at a time (``block_bytes`` of fp32): the
    block's rows of the base weight, ``lora_B`` and the bias, with all of ``lora_A``, are themselves a LoRA
    layer, whose merged rows are those of the whole. Any other layer is merged whole: a DoRA (or other
    variant) layer, whose PEFT code keeps state from call to call; an embedding or a Conv1D, whose rows lie
    the other way.

    A ``ParamWrapper`` on fused experts (PEFT's ``target_parameters``) is merged a block of experts at a time
    (at least two, so that PEFT takes its experts' path; ``block_bytes`` of fp32 where experts are smaller):
    the block's experts of the parameter, of ``lora_A`` and of ``lora_B`` are themselves such a layer.

    Args:
        adapter: The adapter's name.
        sources: Stage 4's plan: wrapper key -> ``[file or base model folder, name in it]``.
        device: Where each layer is merged and checked (weights are read and written on the CPU).
        readers: The sources' readers (a fresh set if not given).
        block_bytes: See :class:`~zero2merged.core.options.Tuning`.

    Attributes:
        readers: The sources' readers, each header read once.
        merged: The paths of the layers merged so far.
        worst: The worst parity of the layers merged so far.
    """

    def __init__(
        self,
        adapter: str,
        sources: dict[str, list[str]],
        device: str,
        readers: Readers | None = None,
        block_bytes: int = Tuning.block_bytes,
    ):
        self.adapter, self.sources, self.device, self.block_bytes = adapter, sources, device, block_bytes
        self.readers = Readers() if readers is None else readers
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
        if getattr(layer, "parameter_name", None):
            yield from self._merge_experts(path, layer)
            return
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

    def _merge_experts(self, path: str, layer: Any) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Merge a ``ParamWrapper`` a block of experts at a time; each block's merged experts are checked on
        probe inputs against the unmerged ones, computed with PEFT's own split of the whole layer's factors
        by expert (``get_delta_factors``), so that a block given the wrong experts' factors fails."""
        adapter, name = self.adapter, layer.parameter_name
        keys = {"lora_A": f"lora_A.{adapter}.weight", "lora_B": f"lora_B.{adapter}.weight"}
        base, depth = layer.get_base_layer(), _depth(layer)
        declared = {key: getattr(layer, part)[adapter].weight for part, key in keys.items()}
        declared_param = getattr(base, name)
        factors = {part: self._fetch(*self.sources[f"{path}.{key}"]) for part, key in keys.items()}
        _assign(layer, {keys[part]: tensor for part, tensor in factors.items()})
        # PEFT casts the factors to the parameter's dtype: an fp32 stand-in for it, as the merge sees.
        setattr(base, name, torch.nn.Parameter(torch.empty_like(declared_param, dtype=torch.float32), False))
        lhs, rhs, scaling = _delta_factors(layer, adapter)
        experts, rank = layer.num_experts, layer.r[adapter]
        blocks = _expert_blocks(experts, self.block_bytes // (4 * math.prod(declared_param.shape[1:])))
        source = self.sources[f"{path}.{'base_layer.' * depth}{name}"]
        before, after = [], []
        try:
            for first, last in blocks:
                weight = self._fetch(*source, slice(first, last))
                probe = torch.randn(
                    last - first, weight.shape[-1], PROBE_BATCH, generator=torch.Generator().manual_seed(PROBE_SEED)
                ).to(self.device)
                before.append(weight @ probe + scaling * lhs[first:last] @ (rhs[first:last] @ probe))
                a = factors["lora_A"].reshape(experts, rank, -1)[first:last].reshape((last - first) * rank, -1)
                b = factors["lora_B"].reshape(factors["lora_B"].shape[0], rank, experts)[:, :, first:last]
                _assign(layer, {keys["lora_A"]: a, keys["lora_B"]: b.reshape(b.shape[0], -1)})
                setattr(base, name, torch.nn.Parameter(weight, requires_grad=False))
                layer.num_experts = last - first  # PEFT reads the experts' count off the param once, when wrapping
                layer.merged_adapters.clear()
                with torch.no_grad():
                    layer.merge(adapter_names=[adapter])
                if adapter not in layer.merged_adapters:
                    raise VerificationError(f"{path}: PEFT did not merge the adapter into this layer")
                merged = getattr(base, name).detach()
                after.append(merged @ probe)
                yield name, first, merged.to("cpu")
        finally:
            layer.num_experts = experts
            setattr(base, name, declared_param)
            _assign(layer, declared)
        parity = compare(torch.cat(after).transpose(1, 2), torch.cat(before).transpose(1, 2))
        parity.check(MERGE_TOLERANCE, f"{path}: merged vs unmerged experts ({name})")
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


def _delta_factors(layer: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lhs, rhs, scaling)`` of a ``ParamWrapper``'s delta, ``scaling * lhs @ rhs`` per expert: PEFT's own
    split where it has one (``get_delta_factors``), else the one its ``get_delta_weight`` computes in PEFT
    0.17 (experts stored as ``(experts, in, out)``: ``einsum("o r e, e r i -> e i o", B, A)``)."""
    if hasattr(layer, "get_delta_factors"):
        return layer.get_delta_factors(adapter)
    weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    weight_a = weight_a.reshape(layer.num_experts, -1, weight_a.shape[-1])  # (experts, rank, in)
    weight_b = weight_b.reshape(weight_b.shape[0], -1, layer.num_experts).permute(2, 0, 1)  # (experts, out, rank)
    dtype = layer.get_param().dtype
    return weight_a.transpose(-2, -1).to(dtype), weight_b.transpose(-2, -1).to(dtype), layer.scaling[adapter]


def _depth(layer: Any) -> int:
    """How many ``base_layer`` steps lead from a (nested) LoRA wrapper to the module it wraps."""
    depth, module = 0, layer
    while hasattr(module, "base_layer"):
        depth, module = depth + 1, module.base_layer
    return depth


def _expert_blocks(experts: int, per_block: int) -> list[tuple[int, int]]:
    """``(first, last + 1)`` of blocks of at least two experts (PEFT merges a single expert as a plain linear
    layer, which does not fit every experts' layout), about ``per_block`` each; all of them if fewer than two."""
    if experts < 2:
        return [(0, experts)]
    step = max(2, per_block)
    blocks = [(first, min(first + step, experts)) for first in range(0, experts, step)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] == 1:
        blocks[-2:] = [(blocks[-2][0], experts)]
    return blocks


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

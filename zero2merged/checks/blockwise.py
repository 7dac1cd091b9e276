"""Models run from their files a block at a time: ``verify`` at the sizes users convert.

A model is built without weights (its parameters on the meta device, its buffers real: a rotary embedding's
frequencies are computed, not stored), and accelerate's offload hooks (``attach_align_device_hook``, what
``device_map`` offloading uses) give each block its weights, read from disk, just before it runs and take
them back to the meta device after: a decoder block (the classes transformers keeps whole,
``_no_split_modules``) or a LoRA layer (whose forward reads its factors without calling them) at a time, any
other module with weights of its own alone. Only a block's weights (in fp32) are ever in memory, so a model
of any size runs in what one block takes, and computes exactly what the whole model in fp32 computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from zero2merged.core.errors import VerificationError, first_line


class DiskWeights(Mapping):
    """A model's tensors by its own names, read from files when asked for (floating point as fp32).

    Args:
        where: name -> ``(reader, name in it)``; a reader reads like a safetensors
            :class:`~zero2merged.files.safetensors_reader.Reader` (``dtype``, ``shape``, ``get``, ``chunks``):
            one, a :class:`~zero2merged.model.weights.BaseWeights`, a
            :class:`~zero2merged.checkpoint.quantized.DequantizedWeights`.
    """

    def __init__(self, where: dict[str, tuple[Any, str]]):
        self.where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        reader, stored = self.where[name]
        dtype, shape = reader.dtype(stored), reader.shape(stored)
        if not dtype.is_floating_point or dtype == torch.float32 or len(shape) < 2:
            return reader.get(stored).float() if dtype.is_floating_point else reader.get(stored)
        weight = torch.empty(shape, dtype=torch.float32)  # filled a chunk at a time: never a 16-bit copy whole
        for first, rows in reader.chunks(stored):
            weight[first : first + rows.shape[0]] = rows
        return weight

    def __contains__(self, name: object) -> bool:
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def aliases(model) -> dict[str, list[str]]:
    """Each name of ``model``'s state dict -> every name of that tensor (several where tied, as files and
    plans name a tied weight once)."""
    state = model.state_dict(keep_vars=True)
    by_object: dict[int, list[str]] = {}
    for key, tensor in state.items():
        by_object.setdefault(id(tensor), []).append(key)
    return {key: by_object[id(tensor)] for key, tensor in state.items()}


def run_from_disk(model, weights: DiskWeights) -> None:
    """Make ``model`` (built by :func:`~zero2merged.model.base.meta_model` with ``real_buffers``) read its
    weights from ``weights`` a block at a time as it runs (see the module's doc). Its persistent buffers are
    set from ``weights`` where they hold them."""
    from accelerate.hooks import attach_align_device_hook

    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in weights:
                buffer.copy_(weights[name])
    blocks = _blocks(model)
    attach_align_device_hook(
        model, execution_device=torch.device("cpu"), offload=True, weights_map=weights, preload_module_classes=blocks
    )
    trim = _malloc_trim()

    def release(*_) -> None:  # a forward hook: runs once the block's weights are back on the meta device
        trim(0)

    if trim is not None:
        trim(0)  # what building the model left behind
        for module in model.modules():
            if type(module).__name__ in blocks or any(True for _ in module.parameters(recurse=False)):
                module.register_forward_hook(release)


def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere. A block's weights, freed after it runs, are mostly tens of
    MB each, which glibc serves from its heap once it has seen such sizes freed (its mmap threshold rises),
    and the heap does not shrink by itself between blocks: the peak crept up block after block (docs/scaling.md
    has the figures)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _blocks(model) -> list[str]:
    """The module classes whose instances get all their weights at once: transformers' unsplittable blocks,
    and PEFT's layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    classes = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
        if isinstance(module, BaseTunerLayer):
            classes.add(type(module).__name__)
    return sorted(classes)


def meta_failure(error: Exception) -> VerificationError:
    """A model whose forward reads a weight outside the module holding it (which no block hook can see)."""
    return VerificationError(
        f"this model cannot be run a block at a time ({first_line(error)}); verify it whole with --in-memory"
    )

"""Stage 4, load: the consolidated weights into the PEFT wrapper, with every key accounted for.

* No unexpected key: each consolidated tensor has a place in the wrapper, with the same shape.
* A missing key only where the checkpoint did not save frozen params; then the base supplies it.
* Saved frozen params must equal the base's (cast to the dtype they were saved in): if not, the user gave
  the wrong base model, or another revision of it, and a merge would silently mix two models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from zero2merged.errors import BaseModelError, CheckpointError
from zero2merged.stages.inspect import CheckpointInfo


def read_consolidated(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stage 2's file, one tensor at a time."""
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_weights(
    model, tensors: Iterable[tuple[str, torch.Tensor]], info: CheckpointInfo, *, ignore_base_mismatch: bool = False
) -> dict:
    """Stage 4: copy the checkpoint's tensors into ``model`` (the wrapper from stage 3).

    Args:
        model: The PEFT wrapper; its non-saved params keep the base's values.
        tensors: ``(name, tensor)`` pairs: :func:`read_consolidated` of stage 2's file, or a
            :class:`~zero2merged.zero.ZeroReader`'s tensors straight from the checkpoint.
        info: Stage 1's result.
        ignore_base_mismatch: Use the checkpoint's frozen weights even where they differ from the base's.

    Returns:
        The key accounting: counts from the checkpoint and from the base, and any frozen mismatches.

    Raises:
        CheckpointError: a consolidated key has no place in the wrapper, or another shape.
        BaseModelError: saved frozen weights differ from the base's, or the base has params the
            checkpoint saved no value for although it saved frozen params.
    """
    state = model.state_dict()
    frozen = info.layout.frozen
    mismatched: list[tuple[str, float]] = []
    keys = []
    for key, tensor in tensors:
        target = state.get(key)
        if target is None:
            raise CheckpointError(f"checkpoint param {key} has no place in the rebuilt model; is --base-model the "
                                  "architecture the run trained?")
        if tensor.shape != target.shape:
            raise BaseModelError(f"{key} is {list(tensor.shape)} in the checkpoint but {list(target.shape)} in "
                                 "the base model; --base-model is not the model this run trained")
        if key in frozen and not torch.equal(tensor, target.to(tensor.dtype)):
            mismatched.append((key, (tensor.float() - target.float()).abs().max().item()))
        with torch.no_grad():
            target.copy_(tensor)
        keys.append(key)
    if mismatched and not ignore_base_mismatch:
        name, diff = max(mismatched, key=lambda m: m[1])
        raise BaseModelError(
            f"{len(mismatched)} of {len(frozen)} frozen weights saved in the checkpoint differ from the base model's "
            f"(largest: {name}, max abs diff {diff:.3g}): {info.base_model} is not the base this run trained "
            "(or another revision); pass the right --base-model, or --ignore-base-mismatch to use the checkpoint's"
        )
    from_base = sorted(set(state) - set(keys) - set(info.layout.shared))
    if from_base and info.layout.frozen_source is not None:
        raise BaseModelError(f"the base model has {len(from_base)} params the checkpoint saved no value for, e.g. "
                             f"{from_base[0]}; --base-model is not the architecture this run trained")
    return {
        "from_checkpoint": len(keys),
        "from_base": len(from_base),
        "frozen_checked": len([k for k in keys if k in frozen]),
        "frozen_mismatched": [name for name, _ in mismatched],
    }


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

from zero2merged import names
from zero2merged.errors import BaseModelError, CheckpointError
from zero2merged.stages.inspect import CheckpointInfo


def read_consolidated(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stage 2's file, one tensor at a time."""
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_weights(
    model,
    tensors: Iterable[tuple[str, torch.Tensor]],
    info: CheckpointInfo,
    *,
    resized_vocab: dict | None = None,
    ignore_base_mismatch: bool = False,
) -> dict:
    """Stage 4: copy the checkpoint's tensors into ``model`` (the wrapper from stage 3).

    Args:
        model: The PEFT wrapper; its non-saved params keep the base's values.
        tensors: ``(name, tensor)`` pairs: :func:`read_consolidated` of stage 2's file, or a
            :class:`~zero2merged.zero.ZeroReader`'s tensors straight from the checkpoint.
        info: Stage 1's result.
        resized_vocab: Stage 3's record of a vocabulary resized to the checkpoint's (``from``, ``to``,
            ``modules``): the base's values then exist only for the first ``from`` rows.
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
    resized = _resized_keys(state, resized_vocab)
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
        if key in frozen:
            saved, base = (tensor, target) if key not in resized else (tensor[: resized[key]], target[: resized[key]])
            if not torch.equal(saved, base.to(saved.dtype)):
                mismatched.append((key, (saved.float() - base.float()).abs().max().item()))
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
    # Tied weights share storage: a key is accounted for when its storage was loaded under any name.
    loaded = {state[key].data_ptr() for key in keys}
    from_base = sorted(k for k in state if state[k].data_ptr() not in loaded and k not in info.layout.shared)
    if from_base and info.layout.frozen_source is not None:
        raise BaseModelError(f"the base model has {len(from_base)} params the checkpoint saved no value for, e.g. "
                             f"{from_base[0]}; --base-model is not the architecture this run trained")
    # Rows added to the vocabulary for training have no value in the base: the checkpoint must hold them
    # (a frozen copy only PEFT's unmerged forward would read, ``original_module``, may go without).
    unsaved = [k for k in from_base if k in resized and ".original_module." not in k]
    if unsaved:
        raise CheckpointError(
            f"the vocabulary was grown from {resized_vocab['from']} to {resized_vocab['to']} tokens before training, "
            f"but the checkpoint holds no values for the new rows of {unsaved[0]} (frozen params were not saved and "
            "the embeddings are not in modules_to_save): the trained model cannot be reproduced"
        )
    return {
        "from_checkpoint": len(keys),
        "resized_vocab": resized_vocab,
        "from_base": len(from_base),
        "frozen_checked": len([k for k in keys if k in frozen]),
        "frozen_mismatched": [name for name, _ in mismatched],
    }



def _resized_keys(state: dict, resized_vocab: dict | None) -> dict[str, int]:
    """Keys of the resized embedding modules, each with the number of rows the base really had."""
    if not resized_vocab:
        return {}
    prefixes = tuple(f"{names.PEFT_PREFIX}{module}." for module in resized_vocab["modules"])
    return {k: resized_vocab["from"] for k, t in state.items()
            if k.startswith(prefixes) and t.dim() > 0 and t.shape[0] == resized_vocab["to"]}

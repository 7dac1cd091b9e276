"""One save's files only: a tag folder whose rank files come from different saves (an interrupted copy, a
rerun that wrote over part of a tag) is refused, naming the file that does not belong.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.files.zipcheck import archive_name


def check_archive_names(tag_dir: Path, files: list[Path]) -> None:
    """Each rank file holds the archive ``torch.save`` wrote under its name: a rank file renamed, or copied
    over another, holds another's (read from the zip directory alone, before the file is unpickled).

    Raises:
        CheckpointError: naming the file that is not of this save.
    """
    for path in files:
        saved_as = archive_name(path)
        if saved_as is not None and _rank_file_kind(saved_as) not in (None, _rank_file_kind(path.stem)):
            raise _not_this_save(tag_dir, path, f"it holds the archive torch.save wrote as {saved_as}.pt")


def check_one_save(tag_dir: Path, files: list[tuple[Path, dict]]) -> None:
    """The rank files (each with what it holds) must be one save's: all agree on the DeepSpeed config, the
    step and the optimizer's step count. Files of another tag or run with the same shapes would otherwise be
    read as this save's parts (the fuzzer swaps them). ZeRO-1/2 masters are also held to their 16-bit copies
    as they are read (:meth:`ZeroReader.pieces`).

    Raises:
        CheckpointError: naming the file that is not of this save, and what gave it away.
    """
    first: dict[str, tuple[Path, object]] = {}
    for path, data in files:
        for what, value in _signature(data).items():
            seen = first.setdefault(what, (path, value))
            if value != seen[1]:
                raise _not_this_save(tag_dir, path, f"its {what} differs from {seen[0].name}'s")


def _signature(data: dict) -> dict[str, object]:
    """What every rank file of one save agrees on, where the file holds it."""
    found = {
        "DeepSpeed config": data.get(names.DS_CONFIG),
        "global step": data.get(names.GLOBAL_STEPS),
        "optimizer step count": _optimizer_step(data),
    }
    return {what: value for what, value in found.items() if value is not None}


def _optimizer_step(data: dict) -> int | None:
    """The base optimizer's step count (Adam's ``step``) in an optimizer-state file."""
    optim = data.get(names.OPTIMIZER_STATE_DICT)
    for key in (names.BASE_OPTIMIZER_STATE, names.OPTIMIZER_STATE_DICT):  # ZeRO-1/2, ZeRO-3
        inner = optim.get(key) if isinstance(optim, dict) else None
        if isinstance(inner, list) and inner:  # older DeepSpeed: one per param group
            inner = inner[0]
        state = inner.get("state") if isinstance(inner, dict) else None
        if isinstance(state, dict):
            steps = [_count(v.get("step")) for v in state.values() if isinstance(v, dict)]
            return max((step for step in steps if step is not None), default=None)
    return None


def _count(step) -> int | None:
    """A step count as Adam keeps it (an int, or a one-element tensor); None for anything else: the moments'
    bookkeeping is not read otherwise, so a damaged one only does not take part in the comparison."""
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
        return int(step)
    return None


def _rank_file_kind(stem: str) -> tuple[str, int] | None:
    """``("model_states" | "optim_states", rank)`` of a rank file's name (without ``.pt``); None for others."""
    found = re.search(r"(?:zero_pp_rank_(\d+)_)?mp_rank_\d+_(model_states|optim_states)$", stem)
    return (found.group(2), int(found.group(1) or 0)) if found else None


def _not_this_save(tag_dir: Path, path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{tag_dir / path.name} is not part of the same save as the tag's other rank files ({why}): files "
        "were mixed with another rank's, tag's or run's; copy the tag folder again as the run saved it"
    )

"""One save's files only: a tag folder whose rank files come from different saves (an interrupted copy, a
rerun that wrote over part of a tag) is refused, naming the file that does not belong.
"""

from __future__ import annotations

import re
from pathlib import Path

from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.files.pickles import load_pt
from zero2merged.files.zipcheck import archive_name


def check_one_save(tag_dir: Path, model_files: list[Path], optim_files: list[Path], states: dict) -> None:
    """The rank files must be one save's: each holds the archive ``torch.save`` wrote under its name (a rank
    file renamed, or copied over another, holds another's), and all agree on the DeepSpeed config, the step
    and the optimizer's step count. Files of another tag or run with the same shapes would otherwise be
    read as this save's parts (the fuzzer swaps them). ZeRO-1/2 masters are also held to their 16-bit copies
    as they are read (:meth:`ZeroReader.pieces`).

    Raises:
        CheckpointError: naming the file that is not of this save, and what gave it away.
    """
    for path in [*model_files, *optim_files]:
        saved_as = archive_name(path)
        if saved_as is not None and _rank_file_kind(saved_as) not in (None, _rank_file_kind(path.stem)):
            raise _not_this_save(tag_dir, path, f"it holds the archive torch.save wrote as {saved_as}.pt")
    first: dict[str, tuple[Path, object]] = {}
    for path, data in [(model_files[0], states), *((p, load_pt(p)) for p in [*model_files[1:], *optim_files])]:
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
            steps = [int(v["step"]) for v in state.values() if isinstance(v, dict) and "step" in v]
            return max(steps, default=None)
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

"""Where a checkpoint's tag folder is: ``latest``, a ``--tag``, a tag folder given itself, or the newest
checkpoint of a run folder.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from zero2merged.checkpoint.adapter_file import ADAPTER_FILE, is_adapter_folder
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError

NAME_MAX = 255  # the longest file name Linux filesystems take, in bytes


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _tags(checkpoint: Path) -> list[str]:
    found = [p.name for p in checkpoint.iterdir() if p.is_dir() and any(p.glob(names.MODEL_STATES_GLOB))]
    return sorted(found, key=_natural)


@dataclass(frozen=True)
class Location:
    """Where the tag to convert is.

    Attributes:
        folder: The checkpoint folder (holding ``latest`` and the tag folders).
        tag: The tag folder's name.
        tags: Every tag in ``folder``, oldest first.
        checkpoints: When a run folder was given: its checkpoint folders, oldest first.
        gathered: ``folder`` is a PEFT adapter folder saved gathered, with no ZeRO files (``tag`` is empty):
            :mod:`~zero2merged.checkpoint.adapter_file`.
    """

    folder: Path
    tag: str
    tags: list[str]
    checkpoints: list[str] = field(default_factory=list)
    gathered: bool = False


def _is_checkpoint(folder: Path) -> bool:
    return (folder / names.LATEST).is_file() or bool(_tags(folder))


def _is_gathered(folder: Path) -> bool:
    return is_adapter_folder(folder) and not _is_checkpoint(folder)


def resolve_tag(checkpoint: Path, tag: str | None) -> Location:
    """Find the checkpoint folder, the tag to convert and every tag present.

    ``checkpoint`` may be the folder holding ``latest``, a tag folder itself, or a run folder holding
    several checkpoint folders (the Trainer's ``checkpoint-N``): then the newest is taken, or the one
    ``tag`` names (a checkpoint folder or a tag inside one).

    Raises:
        CheckpointError: no checkpoint there, or the tag is missing or unsafe.
    """
    checkpoint = checkpoint.expanduser().resolve()
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a directory; pass the folder holding '{names.LATEST}'")
    if tag is None and not (checkpoint / names.LATEST).exists() and any(checkpoint.glob(names.MODEL_STATES_GLOB)):
        return Location(checkpoint.parent, checkpoint.name, _tags(checkpoint.parent))
    if tag is None and _is_gathered(checkpoint):
        return Location(checkpoint, "", [], gathered=True)
    if not _is_checkpoint(checkpoint):
        found = sorted(
            (p.name for p in checkpoint.iterdir() if p.is_dir() and (_is_checkpoint(p) or _is_gathered(p))),
            key=_natural,
        )
        if not found:
            raise CheckpointError(
                f"{checkpoint} is not a DeepSpeed checkpoint: no '{names.LATEST}' file, no tag folder with "
                f"{names.MODEL_STATES_GLOB}, no {ADAPTER_FILE} and no checkpoint folder inside"
            )
        chosen = found[-1]
        if tag in found:
            chosen, tag = tag, None
        elif tag is not None:
            holding = [name for name in found if (checkpoint / name / tag).is_dir()]
            if not holding:
                raise CheckpointError(
                    f"no checkpoint in {checkpoint} has a tag {tag!r} (checkpoints: {', '.join(found)})"
                )
            chosen = holding[-1]
        return dataclasses.replace(resolve_tag(checkpoint / chosen, tag), checkpoints=found)

    tags = _tags(checkpoint)
    if tag is None:
        latest = checkpoint / names.LATEST
        if latest.is_file():
            with open(latest, "rb") as f:
                raw = f.read(NAME_MAX + 2).strip()  # a folder's name, and its newline; anything longer is not one
            try:
                tag = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(
                    f"{latest} does not hold a tag name (not UTF-8 text): the file is damaged; pass --tag"
                ) from e
            if len(raw) > NAME_MAX:
                raise CheckpointError(f"{latest} does not hold a tag name (too long): the file is damaged; pass --tag")
        elif len(tags) == 1:
            tag = tags[0]
        else:
            raise CheckpointError(
                f"{checkpoint} has no '{names.LATEST}' file and several tags ({', '.join(tags)}); choose one with --tag"
            )
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise CheckpointError(f"tag {tag!r} is not a folder name inside {checkpoint}; refusing to leave it")
    if len(tag.encode()) > NAME_MAX or not (checkpoint / tag).is_dir():
        known = ", ".join(tags) or "none"
        raise CheckpointError(f"tag {tag!r} has no folder in {checkpoint} (tags found: {known})")
    return Location(checkpoint, tag, tags)

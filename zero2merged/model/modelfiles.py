"""Checks on a folder written by ``save_pretrained``: every weight of the model is in it, nothing else.

The files are read as ``from_pretrained`` reads them, through the model's conversion mapping (their names
and shapes may differ from the modules': :mod:`zero2merged.model.layouts`). ``save_pretrained`` writes tied weights
once (the other name is re-tied on load), so a weight missing from the files is fine only when its tensor
shares storage with one that was written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from zero2merged.core.errors import VerificationError
from zero2merged.files.atomic import fsync_dir
from zero2merged.files.safetensors_reader import Reader
from zero2merged.model.layouts import Layout


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Tensor name -> its dtype and shape (a meta tensor), over all safetensors files of a folder (headers)."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        reader = Reader(file)
        found.update({n: torch.empty(reader.shape(n), dtype=reader.dtype(n), device="meta") for n in reader.keys()})
    return found


def check_complete(folder: Path, model: Any) -> dict[str, Any]:
    """Raise unless the files in ``folder`` load into every weight of ``model`` (tied ones written once)
    with its shape, and into nothing else.

    Returns:
        Module name -> the :class:`~zero2merged.model.layouts.Group` of files' tensors it loads from.
    """
    state = model.state_dict(keep_vars=True)  # tied weights are one object under several names
    loaded = Layout(model, list(state)).loading(saved_tensors(folder))
    extra = sorted(loaded[name].sources[0] for name in set(loaded) - set(state))
    if extra:
        raise VerificationError(f"{folder} holds {len(extra)} tensors the model does not have, e.g. {extra[0]}")
    written = {id(state[name]) for name in loaded}
    for name, tensor in state.items():
        if name in loaded:
            shape = list(loaded[name].targets[name].shape)
            if shape != list(tensor.shape):
                raise VerificationError(f"{folder}: {name} was written as {shape}, not {list(tensor.shape)}")
        elif id(tensor) not in written:
            raise VerificationError(f"{folder} lacks {name}, and it is not tied to a written weight")
    return loaded


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def replace_dir(staged: Path, final: Path) -> None:
    """Move ``staged`` to ``final`` in one rename (``final`` absent or an empty folder)."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.replace(staged, final)
    fsync_dir(final.parent)


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path`` (a leftover of ours from an interrupted run is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path

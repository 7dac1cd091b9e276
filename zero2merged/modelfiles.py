"""Checks on a folder written by ``save_pretrained``: every weight of the model is in it, nothing else.

``save_pretrained`` writes tied weights once (the other name is re-tied on load), so a name missing from
the files is fine only when its tensor shares storage with one that was written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import safe_open

from zero2merged.errors import VerificationError
from zero2merged.manifest import fsync_dir


def saved_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over all safetensors files of a folder (headers only)."""
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def check_complete(folder: Path, model) -> None:
    """Raise unless ``folder`` holds every weight of ``model`` (tied ones once) with its shape."""
    saved = saved_shapes(folder)
    state = model.state_dict(keep_vars=True)  # tied weights are one object under several names
    extra = sorted(set(saved) - set(state))
    if extra:
        raise VerificationError(f"{folder} holds {len(extra)} tensors the model does not have, e.g. {extra[0]}")
    written = {id(state[name]) for name in saved}
    for name, tensor in state.items():
        if name in saved:
            if saved[name] != list(tensor.shape):
                raise VerificationError(f"{folder}: {name} was written as {saved[name]}, not {list(tensor.shape)}")
        elif id(tensor) not in written:
            raise VerificationError(f"{folder} lacks {name}, and it is not tied to a written weight")


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

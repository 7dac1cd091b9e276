"""``torch.save`` files read safely and lazily: nothing unpickled beyond an allow-list (a pickle can run
code) unless the user trusts the checkpoint, memory-mapped, and a piece's pages unmapped once used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import pickle
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

from zero2merged.core.errors import CheckpointError
from zero2merged.files.zipcheck import check_pickle


class _Record:
    """Stand-in for DeepSpeed's plain record classes (loss scalers, fragment addresses): their fields only."""


def _enum_value(value):
    """Stand-in for DeepSpeed's ``ZeroStageEnum``: the stage number."""
    return value


# The only non-tensor objects ZeRO checkpoints pickle, under DeepSpeed's names; nothing else is unpickled.
ALLOWED_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": _enum_value,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Record,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Record,
    "deepspeed.utils.tensor_fragment.fragment_address": _Record,
}


_trusted_pickles: ContextVar[bool] = ContextVar("trusted_pickles", default=False)


@contextlib.contextmanager
def trusting_pickles(trust: bool = True) -> Iterator[None]:
    """Within this block, rank files are unpickled in full (``weights_only=False``), whatever objects they
    hold: a pickle can run any code, so only for checkpoints from a source you trust."""
    token = _trusted_pickles.set(trust)
    try:
        yield
    finally:
        _trusted_pickles.reset(token)


def pickle_policy(unsafe_pickle: bool) -> contextlib.AbstractContextManager:
    """The block within which a run's rank files are read: trusting pickles in full if the user asked
    (``--unsafe-pickle``); otherwise as the caller's own :func:`trusting_pickles` (if any) says."""
    return trusting_pickles() if unsafe_pickle else contextlib.nullcontext()


def load_pt(path: Path) -> dict:
    """Load one checkpoint file memory-mapped, refusing any pickled object outside the allow-list
    (unless within :func:`trusting_pickles`).

    Raises:
        CheckpointError: the file is unreadable, truncated, damaged (its pickle fails its CRC-32), or holds
            objects that are not allowed.
    """
    check_pickle(path)  # the pickle's own bytes; a storage's are checked as they are read (ZeroReader.records)
    try:
        if _trusted_pickles.get():
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals([(obj, name) for name, obj in ALLOWED_GLOBALS.items()]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{path} holds pickled objects that DeepSpeed checkpoints do not ({first}); refusing to load it "
            "(a pickle can run code: pass --unsafe-pickle only if you trust where this checkpoint came from)"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {str(e).strip().splitlines()[0][:300]} "
            "(is the file truncated or still being written?)"
        ) from e


MADV_DONTNEED = 4  # Linux's value (and most other systems')


@functools.cache
def _madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
        return None


def release(piece: torch.Tensor) -> None:
    """Drop this process's mapping of the pages under a piece of a memory-mapped checkpoint file.

    Only for tensors of :func:`load_pt` (private, read-only file mappings that are never written): their
    pages are clean copies of the file, so MADV_DONTNEED just unmaps them; they stay in the page cache,
    and a later touch maps them again from the file. Without madvise, the pages simply stay mapped.
    """
    advise = _madvise()
    if advise is None or piece.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = piece.data_ptr() // page * page
    end = piece.data_ptr() + piece.numel() * piece.element_size()
    advise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

"""Weights in PyTorch's own files (``pytorch_model.bin``: older models, and anything saved with
``safe_serialization=False``), read like a safetensors :class:`~zero2merged.files.safetensors_reader.Reader`.

Loaded as transformers loads them, with ``torch.load(weights_only=True)``: nothing but tensors and plain
containers is unpickled (a pickle could otherwise run code), and a file holding anything else is refused
whole. Memory-mapped (``mmap=True``) where the file is a zip archive, as every file torch has written since
1.6 is: a tensor's pages are read when it is, and dropped from this process's memory after.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from zero2merged.core.errors import BaseModelError, first_line
from zero2merged.files.pickles import release
from zero2merged.files.safetensors_reader import Ranges, RowChunks


class PickledWeights(RowChunks):
    """The tensors of one ``.bin`` weight file.

    Raises:
        BaseModelError: the file cannot be read, or holds something other than named tensors.
    """

    def __init__(self, path: Path):
        self.path, self.mapped = path, True
        try:
            try:
                loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (pre-zip) file: no mmap
                self.mapped = False
        except pickle.UnpicklingError as e:
            raise BaseModelError(
                f"{path} holds pickled objects other than tensors ({first_line(e)}); refusing to load it "
                "(a pickle can run code): convert the base to safetensors where it came from"
            ) from e
        except (RuntimeError, OSError, EOFError, ValueError, MemoryError, OverflowError) as e:
            # Damaged: torch checks each record against the sizes the pickle claims (RuntimeError), a legacy
            # file's claim may be past what can be allocated (MemoryError, or RuntimeError from torch's own).
            raise BaseModelError(
                f"cannot read the base's weights {path}: {first_line(e)}; the file is damaged or not a "
                "PyTorch weight file"
            ) from e
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in loaded.items()
        ):
            raise BaseModelError(f"{path} is not a state dict (names to tensors); is it a model's weight file?")
        self.tensors: dict[str, torch.Tensor] = loaded

    def keys(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def nbytes(self, name: str) -> int:
        tensor = self.tensors[name]
        return tensor.numel() * tensor.element_size()

    def ranges(self, name: str) -> Ranges | None:
        """None: a tensor here is copied through memory (a piece at a time), not file to file."""
        return None

    def get(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` (or a range of its rows) in fresh memory, or in ``into`` where it fits."""
        stored = self.tensors[name]
        view = stored if rows is None else stored[rows]
        nbytes = view.numel() * view.element_size()
        if into is not None and into.numel() * into.element_size() >= nbytes:
            out = into.view(torch.uint8)[:nbytes].view(view.dtype).view(view.shape)
        else:
            out = torch.empty(view.shape, dtype=view.dtype)
        out.copy_(view)
        if self.mapped:
            release(view)  # the file's pages, read: out of this process's memory again (never for heap memory)
        return out

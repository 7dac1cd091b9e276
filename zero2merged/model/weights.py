"""Where the weights a merge reads come from: the base's files read in the model's module layout, and a
reader per file of the work directory's store.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from zero2merged.checkpoint.quantized import DequantizedWeights, as_trained, settings_dtype
from zero2merged.core.names import DEQUANTIZED
from zero2merged.core.results import RebuildResult
from zero2merged.files.pickled import PickledWeights
from zero2merged.files.safetensors_reader import CHUNK_BYTES, Ranges, Reader
from zero2merged.model.base import base_dir, weight_files
from zero2merged.model.layouts import Group, Layout


class Readers(dict):
    """A :class:`Reader` per file path, each header read once however many tensors are read from it."""

    def __missing__(self, path: str) -> Reader:
        if path.endswith(DEQUANTIZED):  # a QLoRA run's 4-bit weights, as its forward saw them
            self[path] = reader = DequantizedWeights(Path(path.removesuffix(DEQUANTIZED)))
            return reader
        self[path] = reader = Reader(Path(path))
        return reader


def read_base(model: Any, rebuilt: RebuildResult) -> BaseWeights:
    """The base's weights under the names of ``model``'s base (the PEFT wrapper's), from its files."""
    names = [name for base_names in rebuilt.base_keys.values() for name in base_names]
    return BaseWeights(base_dir(rebuilt.base_model), Layout(model.get_base_model(), names), in_4bit=rebuilt.in_4bit)


class BaseWeights:
    """The base model's weights under the names its modules use, read from its weight files (safetensors, or
    ``pytorch_model.bin`` ones) through the conversion mapping: a plain tensor straight from its file (by
    rows, or file range to file range), a converted one a group at a time (a block of experts at a time where
    they are fused). Reads like a
    :class:`~zero2merged.files.safetensors_reader.Reader`; stage 4 names it as a source by its folder.

    Args:
        folder: The base model's folder (the weight files ``from_pretrained`` would read are read).
        layout: The model's :class:`Layout` (reading marks the transforms the files use).
        in_4bit: Names of weights a QLoRA run trained in 4-bit -> their settings: each is read as loading
            the base in 4-bit made it, quantized and dequantized (:func:`~zero2merged.checkpoint.quantized.as_trained`).
    """

    def __init__(self, folder: Path, layout: Layout, *, in_4bit: dict[str, dict] | None = None):
        self.folder, self.layout = str(folder), layout
        files = weight_files(Path(folder))
        self.readers = {str(f): Reader(f) if f.suffix == ".safetensors" else PickledWeights(f) for f in files}
        self.file_of = {name: path for path, reader in self.readers.items() for name in reader.keys()}
        metas = {
            name: torch.empty(self.readers[path].shape(name), dtype=self.readers[path].dtype(name), device="meta")
            for name, path in self.file_of.items()
        }
        self.groups = layout.loading(metas)
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None  # one group, converted whole
        self.in_4bit = in_4bit or {}
        self._last_4bit: tuple[str, torch.Tensor] | None = None  # one weight, as a 4-bit run had it

    def keys(self) -> list[str]:
        return list(self.groups)

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def original(self) -> BaseWeights:
        """The same files read as they are stored, none made 4-bit (a QLoRA run merged into its base)."""
        plain = copy.copy(self)
        plain.in_4bit, plain._last_4bit = {}, None
        return plain

    def dtype(self, name: str) -> torch.dtype:
        if name in self.in_4bit:
            return settings_dtype(self.in_4bit[name])
        return self.groups[name].targets[name].dtype

    def shape(self, name: str) -> list[int]:
        return list(self.groups[name].targets[name].shape)

    def nbytes(self, name: str) -> int:
        meta = self.groups[name].targets[name]
        return meta.numel() * meta.element_size()

    def ranges(self, name: str) -> Ranges | None:
        """Where a tensor stored as it is lies in its file (None for a converted one, or one made 4-bit)."""
        group = self.groups[name]
        if group.transform is not None or name in self.in_4bit:
            return None
        return self.readers[self.file_of[group.sources[0]]].ranges(group.sources[0])

    def get(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor (or its ``rows``, along dimension 0: experts, for fused ones)."""
        if name in self.in_4bit:
            if self._last_4bit is None or self._last_4bit[0] != name:
                self._last_4bit = None
                self._last_4bit = name, as_trained(self.stored(name), self.in_4bit[name], name)
            return self._last_4bit[1] if rows is None else self._last_4bit[1][rows]
        return self.stored(name, rows, into)

    def stored(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`get`, of the weight as the base's files hold it (not made 4-bit)."""
        group = self.groups[name]
        if group.transform is None:
            source = group.sources[0]
            return self.readers[self.file_of[source]].get(source, rows, into)
        if group.experts and rows is not None:
            return self._experts(group, name, rows)
        if self._last is None or self._last[0] != id(group):
            tensors = {s: self.readers[self.file_of[s]].get(s) for s in group.sources}
            self._last = (id(group), group.convert(tensors, self.layout.model))
        whole = self._last[1][name]
        return whole if rows is None else whole[rows]

    def _experts(self, group: Group, name: str, rows: slice) -> torch.Tensor:
        tensors = {s: self.readers[self.file_of[s]].get(s) for s in group.expert_sources(rows)}
        return group.convert(tensors, self.layout.model)[name]

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES, into: torch.Tensor | None = None):
        """``(first row, rows)`` pieces of about ``chunk_bytes`` (a 1-D tensor comes whole)."""
        group = self.groups[name]
        if group.transform is None and name not in self.in_4bit:
            source = group.sources[0]
            yield from self.readers[self.file_of[source]].chunks(source, chunk_bytes, into)
            return
        shape = self.shape(name)
        if len(shape) < 2:
            yield 0, self.get(name)
            return
        step = max(1, chunk_bytes // max(self.nbytes(name) // max(shape[0], 1), 1))
        for first in range(0, shape[0], step):
            yield first, self.get(name, slice(first, min(first + step, shape[0])))

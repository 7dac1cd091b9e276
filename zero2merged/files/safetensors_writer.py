"""safetensors files written a tensor (or a chunk of one) at a time, byte for byte as ``save_file`` writes
them (see :mod:`zero2merged.files.safetensors_reader` for why by hand).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from zero2merged.files.safetensors_reader import CHUNK_BYTES, REFERENCES_KEY, SAFETENSORS_DTYPES, Ranges, tensor_bytes

_RANK = {name: rank for rank, name in enumerate(SAFETENSORS_DTYPES.values())}  # save_file's order
PREFIX_STEP = 256 << 20  # a file being written is handed on to be flushed (and hashed) in pieces of this size


def _size(extent: tuple[int, int]) -> int:
    return extent[1] - extent[0]


def writer_bytes(specs: dict[str, tuple[torch.dtype, list[int]]]) -> int:
    """The data bytes of the tensors ``specs`` describes."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())


class Writer:
    """Writes one safetensors file; tensors may come in any order, each whole or in row chunks.

    Args:
        path: File to write (created or truncated).
        specs: name -> (dtype, shape) of every tensor the file will hold.
        metadata: The ``__metadata__`` strings.
        references: name -> (dtype, shape, ranges) of tensors listed by reference (see the module's doc).
        sync: Flush the file to disk on closing; without it, the caller must (before relying on it).
        on_prefix: Called with ``n`` when the file's first ``n`` bytes are written for good (the header and
            every tensor before the first incomplete one), each :data:`PREFIX_STEP` bytes or so.
    """

    def __init__(
        self,
        path: Path,
        specs: dict[str, tuple[torch.dtype, list[int]]],
        metadata: dict[str, str],
        references: dict[str, tuple[torch.dtype, list[int], Ranges]] | None = None,
        *,
        sync: bool = True,
        on_prefix: Callable[[int], None] | None = None,
    ):
        self.path, self.sync, self.on_prefix = path, sync, on_prefix
        order = sorted(specs, key=lambda name: (-_RANK[SAFETENSORS_DTYPES[specs[name][0]]], name))
        if references:
            listed = {
                name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "ranges": [list(r) for r in ranges]}
                for name, (dtype, shape, ranges) in references.items()
            }
            metadata = {**metadata, REFERENCES_KEY: json.dumps(listed, sort_keys=True)}
        header: dict = {"__metadata__": metadata} if metadata else {}
        self.extent: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in order:
            dtype, shape = specs[name]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.extent[name] = (offset, offset + size)
            offset += size
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        self.data_start = 8 + len(blob)
        self.size = self.data_start + offset
        self.order = order
        self.specs = specs
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self.size)
        self._written: dict[str, int] = {name: 0 for name in order}
        self._sources: dict[str, int] = {}  # file descriptors of the files copied from
        self._complete = 0  # tensors in ``order`` written whole, from the first
        self._reported = 0  # the prefix last passed to on_prefix

    def write(self, name: str, data: torch.Tensor, start: int = 0) -> None:
        """Write ``data`` (a whole tensor, or consecutive rows of it from byte ``start`` on) of ``name``."""
        dtype, _ = self.specs[name]
        if data.dtype != dtype:
            raise ValueError(f"{name}: {data.dtype} written where {dtype} was declared")
        begin, end = self.extent[name]
        raw = tensor_bytes(data)
        if begin + start + raw.nbytes > end:
            raise ValueError(f"{name}: write past the end of its {end - begin} bytes")
        self._pwrite(raw, self.data_start + begin + start)
        self._wrote(name, raw.nbytes)

    def _wrote(self, name: str, nbytes: int) -> None:
        self._written[name] += nbytes
        order, extent, written = self.order, self.extent, self._written
        while self._complete < len(order) and written[order[self._complete]] == _size(extent[order[self._complete]]):
            self._complete += 1
        prefix = self.size if self._complete == len(order) else self.data_start + extent[order[self._complete]][0]
        if self.on_prefix is not None and prefix - self._reported >= PREFIX_STEP:
            self.on_prefix(prefix)
            self._reported = prefix

    def _pwrite(self, raw: memoryview, at: int) -> None:
        done = 0
        while done < raw.nbytes:  # one pwrite writes at most ~2 GB on Linux
            done += os.pwrite(self._file.fileno(), raw[done:], at + done)

    def copy(self, name: str, source: str, offset: int, nbytes: int, start: int = 0) -> None:
        """Write ``nbytes`` of ``name`` (from byte ``start`` on) straight from the file ``source`` at ``offset``.

        Copied file to file in the kernel (``copy_file_range``: the bytes never pass through this process),
        or through a small buffer where the filesystems do not support that.
        """
        begin, end = self.extent[name]
        if begin + start + nbytes > end:
            raise ValueError(f"{name}: copy past the end of its {end - begin} bytes")
        if source not in self._sources:
            self._sources[source] = os.open(source, os.O_RDONLY)
        src, dst = self._sources[source], self._file.fileno()
        at, done = self.data_start + begin + start, 0
        while done < nbytes:
            try:
                count = os.copy_file_range(src, dst, nbytes - done, offset + done, at + done)
            except OSError:  # EXDEV, ENOSYS, EOPNOTSUPP...: not between these files
                count = 0
            if count == 0:
                data = os.pread(src, min(CHUNK_BYTES, nbytes - done), offset + done)
                if not data:
                    raise OSError(f"{source} is truncated: {name} ends past the end of the file")
                self._pwrite(memoryview(data), at + done)
                count = len(data)
            done += count
        self._wrote(name, nbytes)

    def close(self) -> None:
        """Flush to disk (with ``sync``); raise if any tensor was left incomplete."""
        short = [n for n in self.order if self._written[n] != self.extent[n][1] - self.extent[n][0]]
        self._close_sources()
        self._file.flush()
        if self.sync:
            os.fsync(self._file.fileno())
        self._file.close()
        if short:
            raise ValueError(f"{self.path}: {len(short)} tensors were not written whole, e.g. {short[0]}")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_sources()
            self._file.close()

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

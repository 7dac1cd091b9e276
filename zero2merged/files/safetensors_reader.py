"""safetensors files read and written one tensor (or one chunk) at a time.

Written by hand because the library has neither half: ``save_file`` needs every tensor in memory at once,
and ``safe_open`` maps the whole file, so every page it touched counts toward our RSS until it is closed.
The format is simple and stable (8-byte header length, JSON header, raw little-endian data); the writer
produces the same bytes as ``safetensors.torch.save_file`` (a test holds it to that), so files written
here are indistinguishable from those ``save_pretrained`` writes.

One extension, for the work directory only: a file may also list *referenced* tensors, whose bytes stay
where they already are (byte ranges of other files, such as a checkpoint's rank files) instead of being
copied in; they are named in the ``zero2merged.references`` metadata entry, and :class:`Reader` reads them
like the others. Such a file holds no data for them, so other safetensors readers do not see them.

Nothing in a header is trusted: :func:`read_header` checks it whole against the file (and each reference
against the file it names) before anything is allocated or read by its word, and raises :class:`HeaderError`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import reprlib
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from zero2merged.core.errors import Zero2MergedError, first_line

# safetensors' dtype names, in the order of its Rust enum: save_file lays tensors out by this order
# (highest first), then by name.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_FROM_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
CHUNK_BYTES = 16 << 20  # large tensors are copied and cast in pieces of about this size
REFERENCES_KEY = "zero2merged.references"  # metadata: name -> dtype, shape and the byte ranges holding it

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers (its N_MAX)
DAMAGED = "the file is damaged or not a safetensors file"

# Where a tensor's bytes lie, in order: (file, byte offset in it, bytes).
Ranges = list[tuple[str, int, int]]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous), without a copy when it already is."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class RowChunks:
    """Reading a tensor a block of rows at a time, for a reader with ``shape``, ``nbytes`` and
    ``get(name, rows, into)`` (:class:`Reader`; :class:`~zero2merged.files.pickled.PickledWeights`)."""

    def chunks(
        self, name: str, chunk_bytes: int = CHUNK_BYTES, into: torch.Tensor | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, rows)`` pieces of a tensor, about ``chunk_bytes`` each (a 1-D tensor comes whole);
        with ``into`` (see :meth:`get`), a piece is only valid until the next one is read."""
        shape = self.shape(name)
        if len(shape) < 2:
            yield 0, self.get(name, into=into)
            return
        step = max(1, chunk_bytes // max(self.nbytes(name) // max(shape[0], 1), 1))
        for first in range(0, shape[0], step):
            yield first, self.get(name, slice(first, min(first + step, shape[0])), into)


class Reader(RowChunks):
    """Reads tensors of one safetensors file with ``pread``: no mapping, so nothing read stays resident.

    Referenced tensors (see the module's doc) are read from the files their ranges name.

    Args:
        path: The file.
        observe: Called with ``(file, offset, bytes)`` for every byte range read, as it is read (a
            :class:`~zero2merged.files.zipcheck.RecordCheck` of the files references lead to).
        read_once: The files references lead to are read once (by a conversion): drop each range read from
            the page cache (see :class:`~zero2merged.running.manifest.Flushing` for why).

    Raises:
        HeaderError: the header (or a reference) cannot describe this file (see :func:`read_header`).
    """

    def __init__(
        self, path: Path, observe: Callable[[str, int, memoryview], None] | None = None, *, read_once: bool = False
    ):
        self.path, self.observe, self.read_once = path, observe, read_once
        self.header, self.metadata, self.data_start, self.references = read_header(path)

    def keys(self) -> list[str]:
        return [*self.header, *self.references]

    def _entry(self, name: str) -> dict:
        return self.header[name] if name in self.header else self.references[name]

    def dtype(self, name: str) -> torch.dtype:
        return _FROM_NAME[self._entry(name)["dtype"]]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def nbytes(self, name: str) -> int:
        return sum(nbytes for _, _, nbytes in self.ranges(name))

    def ranges(self, name: str) -> Ranges:
        """Where the bytes of ``name`` lie: ``[(file, offset, bytes)]``, in order (one range unless referenced)."""
        if name in self.references:
            return [(file, offset, nbytes) for file, offset, nbytes in self.references[name]["ranges"]]
        begin, end = self.header[name]["data_offsets"]
        return [(str(self.path), self.data_start + begin, end - begin)]

    def get(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` (or a range of its rows), read into fresh memory; or into the start of the
        1-D tensor ``into`` where it is large enough (a buffer reused from read to read: the result is a
        view of it)."""
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = 0, self.nbytes(name)
        if rows is not None:
            row_bytes = end // max(shape[0], 1)
            begin, end = rows.start * row_bytes, rows.stop * row_bytes
            shape = [rows.stop - rows.start, *shape[1:]]
        if into is None or into.numel() * into.element_size() < end - begin:
            tensor = torch.empty(shape, dtype=dtype)  # not zero-filled, unlike a bytearray: it is read over at once
        else:
            tensor = into.view(torch.uint8)[: end - begin].view(dtype).view(shape)
        self._read(name, begin, tensor_bytes(tensor))
        return tensor

    def _read(self, name: str, begin: int, view: memoryview) -> None:
        """Bytes ``[begin, begin + len(view))`` of tensor ``name`` into ``view``."""
        at = 0  # where the current range starts within the tensor
        for file, offset, nbytes in self.ranges(name):
            lo, hi = max(begin, at), min(begin + view.nbytes, at + nbytes)
            if lo < hi:
                with open(file, "rb") as f:
                    done = 0
                    while done < hi - lo:
                        got = os.preadv(f.fileno(), [view[lo - begin + done : hi - begin]], offset + lo - at + done)
                        if got <= 0:
                            raise OSError(f"{file} is truncated: {name} ends past the end of the file")
                        done += got
                    if self.read_once and file != str(self.path):  # a rank file's bytes, not needed again
                        os.posix_fadvise(f.fileno(), offset + lo - at, hi - lo, os.POSIX_FADV_DONTNEED)
                if self.observe is not None:
                    self.observe(file, offset + lo - at, view[lo - begin : hi - begin])
            at += nbytes


class HeaderError(Zero2MergedError, OSError):
    """A safetensors file whose header cannot describe it (damaged, truncated, or not safetensors at all), or
    a store whose references cannot be right. The message is one line, naming the file and what is wrong.

    An ``OSError`` too, as a file found truncated while reading always was. Whoever knows whose file it is
    may say so with its own error (the base model's: ``BaseModelError``).
    """


Header = tuple[dict[str, dict], dict[str, str], int, dict[str, dict]]


def read_header(path: Path) -> Header:
    """The header of a safetensors file, every entry checked against the file before anything is allocated
    by its word: the length within the file (and safetensors' own bound), a UTF-8 JSON object, each tensor
    a known dtype and a shape of counts whose bytes its ``data_offsets`` span exactly, inside the data,
    overlapping no other; the metadata strings; each reference (see the module's doc) a byte range within
    its file, the ranges together the tensor's bytes. Costs one read of the header and a stat per file.

    Returns:
        ``(tensor entries, metadata, where the data starts, referenced entries)``.

    Raises:
        HeaderError: any of that is not so.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise HeaderError(f"{path}: {size} bytes, too short for a safetensors file (8 or more); {DAMAGED}")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(MAX_HEADER_BYTES, size - 8):
            bound = "" if length <= MAX_HEADER_BYTES else f" (safetensors allows {MAX_HEADER_BYTES})"
            raise HeaderError(
                f"{path}: the safetensors header claims {length} bytes{bound} but the file holds {size}; {DAMAGED}"
            )
        blob = f.read(length)
    if len(blob) != length:  # shrunk since the fstat
        raise HeaderError(f"{path}: the file ends inside its {length}-byte header; {DAMAGED}")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise HeaderError(f"{path}: the header is not UTF-8 JSON ({first_line(e)}); {DAMAGED}") from e
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: the header is a JSON {type(header).__name__}, not an object; {DAMAGED}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{path}: __metadata__ is not a map of strings to strings; {DAMAGED}")
    data_bytes = size - 8 - length
    extents = []
    for name, entry in header.items():
        nbytes = _entry_bytes(path, name, entry)
        offsets = entry.get("data_offsets")
        if type(offsets) is not list or len(offsets) != 2 or not _is_count(offsets[0]) or not _is_count(offsets[1]):
            raise HeaderError(
                f"{path}: tensor {_short(name)}: its data_offsets {_short(offsets)} are not [begin, end]; {DAMAGED}"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise HeaderError(
                f"{path}: tensor {_short(name)}: its data_offsets [{begin}, {end}] span {end - begin} bytes, "
                f"the dtype and shape need {nbytes}; {DAMAGED}"
            )
        if end > data_bytes:
            raise HeaderError(
                f"{path}: {_short(name)} ends at byte {end} of the data, which holds {data_bytes}; the file is "
                "truncated or damaged"
            )
        if end > begin:  # an empty tensor overlaps nothing
            extents.append((begin, end, name))
    extents.sort()
    for (_, end, name), (begin, _, other) in itertools.pairwise(extents):
        if begin < end:
            raise HeaderError(f"{path}: {_short(name)} and {_short(other)} overlap in the file; {DAMAGED}")
    references = _references(path, metadata, header)
    return header, metadata, 8 + length, references


def _references(path: Path, metadata: dict[str, str], header: dict) -> dict[str, dict]:
    """The referenced entries of the metadata, each checked: its ranges within their files, of its size."""
    if REFERENCES_KEY not in metadata:
        return {}
    try:
        listed = json.loads(metadata[REFERENCES_KEY])
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{path}: its {REFERENCES_KEY} are not JSON ({first_line(e)}); {DAMAGED}") from e
    if not isinstance(listed, dict):
        raise HeaderError(f"{path}: its {REFERENCES_KEY} are not a JSON object; {DAMAGED}")
    sizes: dict[str, int] = {}  # each referenced file stat'ed once
    for name, entry in listed.items():
        if name in header:
            raise HeaderError(f"{path}: {_short(name)} is both in the file and referenced; {DAMAGED}")
        nbytes = _entry_bytes(path, name, entry)
        ranges = entry.get("ranges")
        if not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and _is_count(r[1]) and _is_count(r[2])
            for r in ranges
        ):
            raise HeaderError(
                f"{path}: tensor {_short(name)}: its ranges are not [[file, offset, bytes], ...]; {DAMAGED}"
            )
        for file, offset, count in ranges:
            if file not in sizes:
                try:
                    sizes[file] = os.stat(file).st_size
                except (OSError, ValueError) as e:  # ValueError: a NUL in the name
                    raise HeaderError(
                        f"{path}: {_short(name)} is referenced in {_short(file)}, which cannot be read ({e})"
                    ) from e
            if offset + count > sizes[file]:
                raise HeaderError(
                    f"{path}: {_short(name)} is referenced at bytes [{offset}, {offset + count}) of "
                    f"{_short(file)}, which holds {sizes[file]}; the file changed since it was referenced, or the "
                    "reference is damaged"
                )
        if sum(count for _, _, count in ranges) != nbytes:
            raise HeaderError(
                f"{path}: tensor {_short(name)}: its ranges hold {sum(c for _, _, c in ranges)} bytes, "
                f"the dtype and shape need {nbytes}; {DAMAGED}"
            )
    return listed


def _entry_bytes(path: Path, name: str, entry) -> int:
    """The bytes a tensor entry's dtype and shape call for (both checked)."""
    if not isinstance(entry, dict):
        raise HeaderError(
            f"{path}: {_short(name)} is described by a JSON {type(entry).__name__}, not an object; {DAMAGED}"
        )
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if type(dtype) is not str or dtype not in _FROM_NAME:
        raise HeaderError(
            f"{path}: {_short(name)} has dtype {_short(dtype)}, not one zero2merged reads ({', '.join(_FROM_NAME)})"
        )
    if type(shape) is not list or not all(type(n) is int and 0 <= n <= _MAX_DIM for n in shape):
        raise HeaderError(f"{path}: tensor {_short(name)}: its shape {_short(shape)} is not a list of sizes; {DAMAGED}")
    return math.prod(shape) * _FROM_NAME[dtype].itemsize


_MAX_DIM = (1 << 63) - 1  # torch's sizes are int64


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not a bool, a float, or negative


def _short(value) -> str:
    return reprlib.repr(value)  # bounded, however large the value

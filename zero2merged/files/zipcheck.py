"""CRC-32 checks of the records of DeepSpeed's rank files, computed over the bytes as the conversion reads them.

``torch.save`` has written a zip archive since PyTorch 1.6: one stored (uncompressed) record for the pickle
and one for each storage's bytes, each with a CRC-32 in the archive's directory. ``torch.load`` does not
check them, nor does anything reading the records through a memory map, so a byte changed by a bad disk, an
interrupted ``rsync --inplace`` or a flaky object store loads silently, and the fp32 masters of a damaged
file would be merged into the model. Written by hand for that reason: :class:`RecordCheck` continues a
record's CRC-32 piece after piece as the conversion reads it (``zlib.crc32``, which runs without the GIL),
reads what was skipped (alignment padding, the tail of a record read only in part) when the stage ends, and
compares. Records the conversion never reads (the Adam moments) are not checked; :func:`check_files` checks
every record of a checkpoint (``zero2merged inspect --check``).
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from zero2merged.core.errors import CheckpointError
from zero2merged.core.results import Checked

LOCAL_HEADER = struct.Struct("<4s22sHH")  # signature, the fields up to the name and extra lengths
READ_BYTES = 8 << 20  # what is read from a file at a time to complete a record


@dataclass(frozen=True)
class ZipRecord:
    """One record of a zip archive: where its bytes lie in the file, and their CRC-32."""

    name: str
    start: int
    size: int
    crc: int


def zip_records(path: Path | str) -> list[ZipRecord]:
    """The stored records of a zip archive, by where their bytes start (none for a file that is not one: a
    pre-1.6 ``torch.save``).

    Raises:
        CheckpointError: the archive's directory or a record's header is damaged.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return []
    size = path.stat().st_size
    records = []
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                f.seek(info.header_offset)
                signature, _, name_length, extra_length = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
                start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
                if signature != b"PK\x03\x04" or info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: the zip record {info.filename} has a damaged header")
                if start + info.file_size > size or info.compress_size != info.file_size:
                    raise CheckpointError(f"{path}: the zip record {info.filename} runs past the end of the file")
                records.append(ZipRecord(info.filename, start, info.file_size, info.CRC))
    except (zipfile.BadZipFile, struct.error, OSError, ValueError, OverflowError) as e:
        raise CheckpointError(
            f"{path}: its zip directory is damaged ({e}); copy the file again from where the run saved it"
        ) from e
    records.sort(key=lambda record: record.start)
    for before, after in zip(records, records[1:], strict=False):
        if before.start + before.size > after.start:
            raise CheckpointError(f"{path}: the zip records {before.name} and {after.name} overlap")
    return records


def archive_name(path: Path | str) -> str | None:
    """The folder its records are in: ``torch.save`` names it after the file it writes (``archive`` when it
    writes to a stream); None for a file that is not a zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            first = archive.namelist()[:1]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # not one, or damaged: zip_records says which
    return first[0].split("/", 1)[0] if first and "/" in first[0] else None


def _damaged(path: str, record: ZipRecord) -> CheckpointError:
    return CheckpointError(
        f"{path}: record {record.name} fails its CRC-32 check: the file changed after it was written (a bad "
        "disk or an interrupted copy); copy it again from where the run saved it, or convert another --tag"
    )


class RecordCheck:
    """The CRC-32 of each record of some zip archives, continued as the record's bytes are read.

    Feed it every byte range read from the files (:meth:`feed`), in any order; :meth:`finish` reads the bytes
    of each touched record that were not fed and compares. Safe to feed from several threads.

    Args:
        paths: The archives to check; bytes fed from other files are ignored.
    """

    def __init__(self, paths: list[Path | str]):
        self._records: dict[str, list[ZipRecord]] = {}
        self._starts: dict[str, list[int]] = {}
        for path in paths:
            key = str(Path(path).resolve())
            self._records[key] = zip_records(key)
            self._starts[key] = [record.start for record in self._records[key]]
        self._state: dict[tuple[str, int], list[int]] = {}  # (file, record index) -> [bytes fed, crc so far]
        self._lock = threading.Lock()
        self.checked = Checked()  # what finish() checked, and the time the CRC-32s took

    def feed(self, path: str, offset: int, data: memoryview) -> None:
        """The bytes ``data`` were read from ``path`` at ``offset``."""
        starts = self._starts.get(path)
        if not starts or len(data) == 0:
            return
        began = time.perf_counter()
        data = data.cast("B")
        end = offset + len(data)
        index = max(bisect.bisect_right(starts, offset) - 1, 0)
        with self._lock:
            while index < len(starts) and starts[index] < end:
                record = self._records[path][index]
                lo, hi = max(offset, record.start), min(end, record.start + record.size)
                if lo < hi:
                    self._extend(path, index, record, lo - record.start, data[lo - offset : hi - offset])
                index += 1
            self.checked.seconds += time.perf_counter() - began

    def _extend(self, path: str, index: int, record: ZipRecord, at: int, data: memoryview) -> None:
        state = self._state.setdefault((path, index), [0, 0])
        if at > state[0]:  # skipped bytes (padding between the pieces read): read them now
            state[1] = _crc_of_file(path, record.start + state[0], at - state[0], state[1])
            state[0] = at
        if at + len(data) > state[0]:  # the part not fed already
            state[1] = zlib.crc32(data[state[0] - at :], state[1])
            state[0] = at + len(data)

    def finish(self) -> Checked:
        """Complete every touched record from its file and compare its CRC-32; returns what was checked, in
        all (this and earlier calls).

        Raises:
            CheckpointError: a record's bytes do not match the CRC-32 its archive holds.
        """
        began = time.perf_counter()
        with self._lock:
            for (path, index), (fed, crc) in sorted(self._state.items()):
                record = self._records[path][index]
                if fed < record.size:
                    crc = _crc_of_file(path, record.start + fed, record.size - fed, crc)
                if crc != record.crc:
                    raise _damaged(path, record)
                self.checked.records += 1
                self.checked.bytes += record.size
            self._state.clear()
            self.checked.seconds += time.perf_counter() - began
        return self.checked


def _crc_of_file(path: str, offset: int, size: int, crc: int = 0) -> int:
    """``crc`` continued over ``size`` bytes of ``path`` from ``offset``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < size:
            chunk = os.pread(fd, min(READ_BYTES, size - done), offset + done)
            if not chunk:
                raise CheckpointError(f"{path} is truncated: a zip record ends past the end of the file")
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
    finally:
        os.close(fd)
    return crc


def check_pickle(path: Path | str) -> None:
    """Check every record of an archive but the storages' bytes whole: the pickle, before it is unpickled,
    and the few small records beside it.

    Raises:
        CheckpointError: a record is damaged (or the archive's directory is).
    """
    for record in zip_records(path):
        if "/data/" not in record.name and _crc_of_file(str(path), record.start, record.size) != record.crc:
            raise _damaged(str(path), record)


def check_files(paths: list[Path | str]) -> Checked:
    """Check every record of every archive whole (``zero2merged inspect --check``).

    Raises:
        CheckpointError: the first damaged record (or archive directory).
    """
    checked, began = Checked(), time.perf_counter()
    for path in paths:
        for record in zip_records(path):
            if _crc_of_file(str(path), record.start, record.size) != record.crc:
                raise _damaged(str(path), record)
            checked.records += 1
            checked.bytes += record.size
    checked.seconds = time.perf_counter() - began
    return checked

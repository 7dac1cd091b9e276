"""The work directory's manifest: one record per stage, written atomically; and the file helpers it uses.

A record holds the stage's status, a fingerprint of its inputs, its typed result, its output files with
size and sha256, and its time. A stage is *current* when its record says done, the fingerprint of today's
inputs matches, and every output file still hashes to what was recorded: then a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zero2merged.files.atomic import write_text_atomic

FORMAT = 3  # bump when an artifact's layout changes: older work directories are then redone


def fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON of a stage's inputs."""
    blob = json.dumps({"format": FORMAT, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class FileHashes:
    """The sha256 of the files one run writes and checks, each read once; and the thread that flushes (and
    hashes) a finished file in the background while the next one is written.

    A file is known by device, inode, size and mtime, so a hard link of a file hashed before (the output's
    files are links of the merge stage's) is not read again, and a changed file is.
    """

    def __init__(self) -> None:
        self._done: dict[tuple, str] = {}
        self._pending: dict[tuple, Future] = {}  # a background flush (and hash) still running
        self._thread: ThreadPoolExecutor | None = None  # started by the first flush_as_written
        self._open: set[Flushing] = set()  # files being flushed, closed when done (or when abandoned)

    def sha256(self, path: Path) -> str:
        """The file's sha256 (waiting for its background flush, and raising what that raised)."""
        key = _key(path.stat())
        if key in self._pending:
            self._pending.pop(key).result()
        if key not in self._done:
            fd = os.open(path, os.O_RDONLY)
            try:
                self._done[key] = _sha256_fd(fd)
            finally:
                os.close(fd)
        return self._done[key]

    def flush_as_written(self, path: Path, *, hashing: bool = True) -> Flushing:
        """Flush a file being written to disk, and (with ``hashing``) hash it, on the background thread as its
        beginning is done (:meth:`Flushing.upto`), while the caller goes on writing: no second pass over a
        finished file, and its flushed bytes leave the page cache (see :class:`Flushing`).

        The caller must wait for :meth:`Flushing.done`'s future before relying on the file (a full disk may
        show only when it is flushed); :meth:`sha256` waits for it too. The file is opened now, so renaming
        its folder meanwhile does not matter. Hashing pays only in the process that writes the manifest.
        """
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zero2merged-flush")
        return Flushing(self, path, hashing)

    def close(self, *, abandon: bool = False) -> None:
        """Wait for the background work and stop its thread. With ``abandon`` (the run failed or was
        interrupted, so what is still queued belongs to the stage that did not finish), the flushes not yet
        started are dropped: the stop is not held up by gigabytes of them."""
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=abandon)
            self._thread = None
        for flushing in list(self._open):  # abandoned before done()
            flushing.close()

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abandon=exc_type is not None)


class Flushing:
    """A file being written, handed to :class:`FileHashes`' thread a finished beginning at a time: each piece
    is hashed (read back from the page cache, where it still is), flushed to disk, and dropped from the page
    cache. A conversion writes each byte once and never reads it again, and the model is larger than the
    page cache should give it: keeping it there evicts what the machine had cached, and on a VM whose host
    hands out fresh memory slowly, writing into recycled pages is what keeps a write at the disk's speed
    (docs/scaling.md measures it).
    """

    def __init__(self, hashes: FileHashes, path: Path, hashing: bool):
        self.hashes = hashes
        self.fd = os.open(path, os.O_RDONLY)
        self.digest = hashlib.sha256() if hashing else None
        self.at = 0  # bytes handed on so far
        self.error: BaseException | None = None  # a piece's flush failed: done()'s future raises it
        hashes._open.add(self)

    def upto(self, end: int) -> None:
        """Bytes ``[0, end)`` of the file are written for good: hash and flush them in the background."""
        if end > self.at:
            begin, self.at = self.at, end
            self.hashes._thread.submit(self._flush, begin, end)

    def done(self) -> Future:
        """The file is complete (and closed by its writer): the rest, then its hash recorded."""
        self.upto(os.fstat(self.fd).st_size)
        key = _key(os.fstat(self.fd))

        def finish() -> None:
            try:
                if self.error is not None:
                    raise self.error
                os.fsync(self.fd)
                if self.digest is not None:
                    self.hashes._done[key] = self.digest.hexdigest()
            finally:
                self.close()

        self.hashes._pending[key] = future = self.hashes._thread.submit(finish)
        return future

    def close(self) -> None:
        if self in self.hashes._open:
            self.hashes._open.discard(self)
            os.close(self.fd)

    def _flush(self, begin: int, end: int) -> None:
        if self.error is not None:
            return
        try:
            if self.digest is not None:
                _sha256_fd(self.fd, begin=begin, end=end, digest=self.digest)
            os.fdatasync(self.fd)  # reports a full disk once: kept for done()
            os.posix_fadvise(self.fd, 0, end, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            self.error = e


def _key(stat: os.stat_result) -> tuple:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _sha256_fd(fd: int, chunk: int = 1 << 22, *, begin: int = 0, end: int | None = None, digest=None) -> str:
    """The sha256 of a file's bytes ``[begin, end)`` (to its end by default), continuing ``digest`` if given."""
    digest, buffer, at = hashlib.sha256() if digest is None else digest, bytearray(chunk), begin
    view = memoryview(buffer)
    while end is None or at < end:
        got = os.preadv(fd, [view if end is None else view[: min(chunk, end - at)]], at)
        if not got:
            break
        digest.update(view[:got])  # one buffer, reused: no fresh pages per block
        at += got
    return digest.hexdigest()


def files_stat(paths: list[Path]) -> list[list]:
    """(name, size, mtime) of files: the cheap fingerprint of large inputs, as make and rsync use."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(paths)]


class Manifest:
    """The stage records of one work directory (``manifest.json``).

    Args:
        path: The manifest file (absent or damaged: every stage is redone).
        hashes: The run's file hashes (a fresh set if not given).
    """

    def __init__(self, path: Path, hashes: FileHashes | None = None):
        self.path = path
        self.hashes = hashes or FileHashes()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            data = {}
        self.stages: dict[str, dict] = data.get("stages", {})

    def describe(self, root: Path, files: list[Path]) -> dict[str, dict]:
        """Output files relative to ``root``, with size and sha256."""
        return {
            str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": self.hashes.sha256(f)}
            for f in sorted(files)
        }

    def current(self, stage: str, fingerprint_: str, root: Path) -> dict | None:
        """The stage's record if it is done, for these inputs, with its outputs intact; else None."""
        record = self.stages.get(stage)
        if not record or record.get("status") != "done" or record.get("fingerprint") != fingerprint_:
            return None
        for name, expected in record.get("outputs", {}).items():
            path = root / name
            if (
                not path.is_file()
                or path.stat().st_size != expected["bytes"]
                or self.hashes.sha256(path) != expected["sha256"]
            ):
                return None
        return record

    def put(self, stage: str, record: dict) -> None:
        self.stages[stage] = dict(record, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.write()

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps({"format": FORMAT, "stages": self.stages}, indent=2, sort_keys=True))

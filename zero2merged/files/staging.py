"""A folder written beside its destination and moved into place in one rename, once verified: each run its own.

Two runs may write one output at once (a job started twice, a scheduler's retry while the first still runs),
each with its own work directory. Each writes into a staging folder of its own beside the output,
``.<output>.zero2merged-partial-<pid>-<random>``, so neither ever writes into, or deletes, the other's. The
move into place is one ``rename``, which the system makes atomic and which fails when the output is no longer
absent or empty: the first run to get there puts its model in place whole, and the other stops with an
:class:`~zero2merged.core.errors.OutputError` (one line), its own files removed. The two runs' files are never
mixed, and a finished output is never overwritten.

A staging folder holds a marker file that its run keeps locked (``flock``) while it writes. A run killed
meanwhile (the lock goes with the process) leaves its folder behind; the next run on that output removes it.
A folder whose marker is locked belongs to a run still going, and one without a marker is not known to be
ours: both are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from zero2merged.core import names
from zero2merged.core.errors import OutputError
from zero2merged.files.atomic import fsync_dir


def staging_path(final: Path) -> Path:
    """A staging folder's path for ``final``, unique to this run (the process and a random token)."""
    return final.with_name(f".{final.name}{names.PARTIAL_SUFFIX}-{os.getpid()}-{secrets.token_hex(4)}")


def _staging_folders(final: Path) -> list[Path]:
    """The staging folders of every run on ``final`` (this one's included)."""
    prefix = f".{final.name}{names.PARTIAL_SUFFIX}-"
    try:
        return [p for p in final.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:  # the parent does not exist yet: nothing staged there
        return []


def clear_stale(final: Path) -> list[Path]:
    """Remove the staging folders for ``final`` left by runs that ended without finishing (killed, or their
    machine lost): those whose marker no process holds locked. Returns the folders removed."""
    removed = []
    for folder in _staging_folders(final):
        try:
            marker = open(folder / names.PARTIAL_MARKER, "rb")  # noqa: SIM115 - held while the folder is removed
        except OSError:  # no marker: being made, or not ours; left alone
            continue
        with marker:
            try:
                fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a run still writing it
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def staging(final: Path, path: Path | None = None) -> Iterator[Path]:
    """A new, empty staging folder for ``final`` (at ``path``, default :func:`staging_path`), marked and locked
    as this run's for as long as the block runs. Stale folders of ended runs are removed first. :func:`place`
    moves it into place; if the block ends without (an error, a failed check, Ctrl-C), it is removed.

    Raises:
        OutputError: the folder cannot be made.
    """
    path = path or staging_path(final)
    clear_stale(final)
    try:
        path.mkdir(parents=True)
        # Locked before it is named the marker: another run's clear_stale never finds it unlocked.
        marker = open(path / f"{names.PARTIAL_MARKER}.new", "x")  # noqa: SIM115 - held locked for the whole block
    except OSError as e:
        raise OutputError(f"cannot make the staging folder {path} beside the output: {e.strerror or e}") from e
    try:
        fcntl.flock(marker, fcntl.LOCK_EX)
        marker.write(f"{os.getpid()}\n")
        marker.flush()
        os.rename(marker.name, path / names.PARTIAL_MARKER)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # gone already once placed
        marker.close()


def place(staged: Path, final: Path) -> None:
    """Move the staging folder ``staged`` to ``final`` in one rename; ``final`` must be absent or an empty
    folder (one this run checked was free; the rename replaces it).

    Raises:
        OutputError: another run put something at ``final`` first (its files are left as they are, this
            run's are not moved), or ``final`` is now a file.
    """
    (staged / names.PARTIAL_MARKER).unlink(missing_ok=True)  # never into the output; the lock stays held
    try:
        os.rename(staged, final)  # POSIX: replaces an empty folder, fails on one that is not empty
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(
                f"the output {final} was written by another run while this one ran; it is left as that run "
                "wrote it (never mixed with this run's files), and this run's are removed; choose another "
                "--output to keep both"
            ) from e
        if e.errno in (errno.ENOTDIR, errno.EISDIR):
            raise OutputError(
                f"the output {final} became a file while this run ran; remove it or choose another"
            ) from e
        raise
    fsync_dir(final.parent)

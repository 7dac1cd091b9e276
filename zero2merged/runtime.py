"""Settings of the whole process that a conversion changes while it runs, in one place: they touch the
process of whoever called it (a training script, say), so each is handed back as it was found."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def sparing_the_collector() -> Iterator[None]:
    """Exempt the objects that exist now (the libraries' millions, which live as long as the process) from
    garbage collection during the run: every full collection would walk them all again, about 0.2 s each
    on our 2-core VM. They are handed back to the collector afterwards (unless the caller froze some)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def skip_last_collection() -> None:
    """For a process about to exit (the CLI, after its command): spare it the last garbage collection, which
    would walk every object the libraries made (about 0.7 s of a conversion's wall time on our 2-core VM)."""
    gc.freeze()


@contextlib.contextmanager
def core_left_for_flushing() -> Iterator[None]:
    """torch on one thread fewer meanwhile, so that the background flush and hash has a core of its own.
    (On 2 cores, sharing them made the merge a third slower: torch's threads wait on one another.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)

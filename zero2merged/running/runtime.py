"""Settings of the whole process that a conversion changes while it runs, in one place: they touch the
process of whoever called it (a training script, say), so each is handed back as it was found."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Iterator

from zero2merged.core.errors import Interrupted

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a scheduler's stop (before its SIGKILL), and Ctrl-C


def quiet_optional_kernels() -> None:
    """For a process the command owns (the CLI's, a --workers helper): bitsandbytes, installed for QLoRA runs
    and then imported by PEFT in every run, logs a warning on import that an optional CPU kernel package is
    missing: nothing a user must act on, and a line on stderr where an error is to be one line."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """For the command line only (a library must not take its caller's signals): SIGTERM and SIGINT raise
    :class:`~zero2merged.core.errors.Interrupted` in the main thread, so the run stops at once and the stages'
    cleanup (their half-written files) runs on the way out. Further signals are ignored meanwhile, as a second
    one would cut that cleanup short. A signal the process was started to ignore (``nohup``, a background
    job's SIGINT) stays ignored. The handlers found are handed back afterwards.

    Elsewhere than the main thread (where Python cannot install handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}
    taken = [signum for signum, handler in found.items() if handler not in (signal.SIG_IGN, None)]

    def stop(signum: int, frame) -> None:
        for other in taken:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in taken:
            signal.signal(signum, found[signum])

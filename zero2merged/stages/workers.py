"""More processes writing the merged model's shards: local ones (``--workers N``) or torch.distributed ranks.

The process running the conversion deals the shards out (:func:`~zero2merged.stages.merge.merge_streaming`)
and writes its own share; each helper is handed a :class:`ShardTask` (the run's inspect result and stage 4's
sources: small), rebuilds the same plan from it and writes its share into the same staged folder. Shards are
disjoint files, so nothing is coordinated but the hand-out and the results. Across machines, the work
directory and the checkpoint (whose rank files hold the frozen weights the consolidated store refers to)
must be on a filesystem every rank sees, at the same paths.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from zero2merged.core.dtypes import TORCH_DTYPES
from zero2merged.core.errors import Zero2MergedError
from zero2merged.core.results import CheckpointInfo, Parity
from zero2merged.running.manifest import FileHashes
from zero2merged.running.runtime import quiet_optional_kernels
from zero2merged.stages.rebuild import rebuild
from zero2merged.stages.shards import plan_shards, write_shards


@dataclass(frozen=True)
class ShardTask:
    """What writing a share of the merged model's shards needs (every process computes the same plan from it).

    Attributes:
        info: Stage 1's result.
        sources: Stage 4's plan: wrapper key -> ``[file, name in it]``.
        staged: The folder the shards are written into.
        dtype: The output dtype's short name.
        max_shard_size: The largest shard, in bytes.
        device: Where each layer is merged and checked.
        block_bytes: See :class:`~zero2merged.core.options.Tuning`.
        shards: The share to write.
    """

    info: CheckpointInfo
    sources: dict[str, list[str]]
    staged: str
    dtype: str
    max_shard_size: int
    device: str
    block_bytes: int
    shards: list[str] = field(default_factory=list)


def write_share(task: ShardTask) -> Parity:
    """In a helper: rebuild the plan and write ``task.shards``; returns their worst per-layer parity."""
    model, rebuilt = rebuild(task.info, on_meta=True)
    plan = plan_shards(model, rebuilt, TORCH_DTYPES[task.dtype], task.max_shard_size)
    with FileHashes() as hashes:  # flushed, not hashed: only the process recording the manifest hashes
        return write_shards(
            plan,
            task.shards,
            task.info.adapter_name,
            task.sources,
            Path(task.staged),
            flushing=functools.partial(hashes.flush_as_written, hashing=False),
            device=task.device,
            block_bytes=task.block_bytes,
        )


class Helpers:
    """What :func:`~zero2merged.stages.merge.merge_streaming` needs of its helpers: how many there are, and
    a way to start their shares."""

    size: int

    def start(self, tasks: list[ShardTask]) -> Callable[[], list[Parity]]:
        """Start writing ``tasks`` (one per helper); returns a wait for their results."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The run was interrupted (Ctrl-C, SIGTERM, SystemExit): stop without waiting for the shares, which
        are scratch the merge stage removes."""
        raise NotImplementedError


def make_helpers(channel, workers: int) -> Helpers | None:
    """Who else writes shards: the other ranks of a distributed job (``channel``), or ``workers - 1`` local
    processes; None when this process writes them all."""
    if channel is not None:
        return RankHelpers(channel)
    if workers > 1:
        return LocalHelpers(workers - 1)
    return None


class LocalHelpers(Helpers):
    """``size`` more processes on this machine (spawned: forking a process that has run torch is unsafe)."""

    def __init__(self, size: int):
        self.size = size
        self._pool: ProcessPoolExecutor | None = None

    def start(self, tasks):
        self._pool = pool = ProcessPoolExecutor(
            max_workers=self.size, mp_context=get_context("spawn"), initializer=_start_helper
        )
        futures = [pool.submit(write_share, task) for task in tasks]

        def wait():
            try:
                return [future.result() for future in futures]
            except Zero2MergedError:
                raise
            except Exception as e:
                raise Zero2MergedError(f"a --workers process failed: {type(e).__name__}: {e}") from e
            except BaseException:  # interrupted while waiting for them
                self.abandon()
                raise
            finally:
                pool.shutdown(cancel_futures=True)

        return wait

    def abandon(self):
        """End the helper processes now (SIGTERM; their files are removed with the stage's scratch)."""
        pool = self._pool
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # public only from Python 3.14 on
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        pool.shutdown(wait=False, cancel_futures=True)


def _start_helper() -> None:
    """In a helper: Ctrl-C reaches the terminal's whole process group, but the process leading the conversion
    decides and ends its helpers (a helper's own KeyboardInterrupt would print a traceback of its own); and
    the libraries' import-time chatter is kept off the command's stderr, as in the leading process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_optional_kernels()


class RankHelpers(Helpers):
    """The other ranks of a torch.distributed job, serving in :func:`zero2merged.api.distributed.on_rank_zero`."""

    def __init__(self, channel):
        self.channel = channel
        self.size = channel.world_size - 1

    def start(self, tasks):
        self.channel.send_tasks(tasks)
        return self.channel.gather_results

    def abandon(self):
        """The other ranks are the launcher's to stop (torchrun signals them all); the collective that ends
        their shares needs this rank too, so it is joined, whatever it brings."""
        with contextlib.suppress(Exception):
            self.channel.gather_results()

"""More processes writing the merged model's shards: local ones (``--workers N``) or torch.distributed ranks.

The process running the conversion deals the shards out (:func:`~zero2merged.stages.merge.merge_streaming`)
and writes its own share; each helper rebuilds the same plan from the work directory's files (the LoRA
config, the base's config, stage 4's sources: all small) and writes its share into the same staged folder.
Shards are disjoint files, so nothing is coordinated but the hand-out and the results. Across machines,
the work directory and the checkpoint (whose rank files hold the frozen weights the consolidated store
refers to) must be on a filesystem every rank sees, at the same paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from zero2merged import names
from zero2merged.errors import Zero2MergedError


def write_share(work_dir: str, staged: str, shards: list[str], dtype: str, max_shard_size: str | int,
                device: str) -> dict:
    """In a helper: rebuild the plan from ``work_dir`` and write ``shards`` into ``staged``."""
    from zero2merged.stages.inspect import CheckpointInfo
    from zero2merged.stages.merge import plan_shards, write_shards
    from zero2merged.stages.rebuild import rebuild
    from zero2merged.stages.save import DTYPES

    work = Path(work_dir)
    info = CheckpointInfo.from_json((work / names.INSPECT).read_text())
    model, _ = rebuild(info, on_meta=True)
    sources = json.loads((work / names.LOAD).read_text())["sources"]
    plan = plan_shards(model, DTYPES[dtype], max_shard_size)
    return write_shards(plan, shards, info.adapter_name, sources, Path(staged), device, hashing=False)


class _Helpers:
    """What :func:`merge_streaming` needs of its helpers: how many, and a way to start their shares."""

    size: int

    def __init__(self, work_dir: Path, staged: Path, dtype: str, max_shard_size: str | int, device: str):
        self.task = {"work_dir": str(work_dir), "staged": str(staged), "dtype": dtype,
                     "max_shard_size": max_shard_size, "device": device}

    def start(self, shares: list[list[str]]) -> Callable[[], list[dict]]:
        """Start writing ``shares`` (one per helper); returns a wait for their results."""
        raise NotImplementedError


def make_helpers(channel, workers: int, *task) -> _Helpers | None:
    """Who else writes shards: the other ranks of a distributed job (``channel``), or ``workers - 1``
    local processes; None when this process writes them all. ``task``: see :class:`_Helpers`."""
    if channel is not None:
        return RankHelpers(channel, *task)
    if workers > 1:
        return LocalHelpers(workers - 1, *task)
    return None


class LocalHelpers(_Helpers):
    """``size`` more processes on this machine (spawned: forking a process that has run torch is unsafe)."""

    def __init__(self, size: int, *args):
        super().__init__(*args)
        self.size = size

    def start(self, shares):
        pool = ProcessPoolExecutor(max_workers=self.size, mp_context=get_context("spawn"))
        futures = [pool.submit(write_share, shards=share, **self.task) for share in shares]

        def wait():
            try:
                return [future.result() for future in futures]
            except Zero2MergedError:
                raise
            except Exception as e:
                raise Zero2MergedError(f"a --workers process failed: {type(e).__name__}: {e}") from e
            finally:
                pool.shutdown(cancel_futures=True)
        return wait


class RankHelpers(_Helpers):
    """The other ranks of a torch.distributed job, serving in :func:`zero2merged.distributed.on_rank_zero`."""

    def __init__(self, channel, *args):
        super().__init__(*args)
        self.channel = channel
        self.size = channel.world_size - 1

    def start(self, shares):
        self.channel.send_tasks([dict(self.task, shards=share) for share in shares])
        return self.channel.gather_results

"""Inside a distributed job: rank 0 converts; the other ranks write shards when asked, then get its result."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from zero2merged.core.errors import Zero2MergedError, first_line
from zero2merged.stages.workers import write_share


class Channel:
    """Rank 0's line to the other ranks while it converts: hand each a task, gather what they did."""

    def __init__(self, group, world_size: int):
        self.group = group
        self.world_size = world_size

    def send_tasks(self, tasks: list) -> None:
        """``tasks[i]`` (a :class:`~zero2merged.stages.workers.ShardTask`) goes to rank ``i + 1``."""
        import torch.distributed as dist

        dist.broadcast_object_list([("tasks", tasks)], src=0, group=self.group)

    def gather_results(self) -> list:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.gather_object(("ok", None), gathered, dst=0, group=self.group)
        failures = [value for kind, value in gathered[1:] if kind == "error"]
        if failures:
            raise Zero2MergedError(failures[0])
        return [value for _, value in gathered[1:]]


def join_launched_group() -> None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), join its process group (gloo), so the
    command's ranks share the work; a plain run is left alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


@contextlib.contextmanager
def outside_training_zero3() -> Iterator[None]:
    """Build models as plain modules even inside a ZeRO-3 training process (a Trainer's callback): there
    transformers builds every model under ``deepspeed.zero.Init``, partitioning it across the ranks with
    collectives that only rank 0 would enter. Its switch is a module global with an unset function but no
    set-back, so it is saved and restored here."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without its DeepSpeed integration
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def on_rank_zero(work: Callable[[Channel | None], Any]) -> Any:
    """Run ``work`` on rank 0 of an initialized process group; the other ranks serve its tasks meanwhile,
    then return its result (or raise its error). Without a process group, ``work(None)`` runs here."""
    with outside_training_zero3():
        return _on_rank_zero(work)


def _on_rank_zero(work: Callable[[Channel | None], Any]) -> Any:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return work(None)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return work(None)
    group = _channel_group()
    if dist.get_rank() == 0:
        return _lead(work, Channel(group, dist.get_world_size()))
    return _serve(group, dist.get_rank())


# The job's process group -> the channel's group made for it (the job's group is held, so that a group made
# later for another job cannot take its place by having its id).
_CHANNEL_GROUPS: list[tuple[Any, Any]] = []


def _channel_group():
    """A gloo group of its own for the channel: it carries Python objects whatever the job's backend, and its
    long timeout lets the waiting ranks outlast a conversion of a large model. Made once per process group
    (every rank makes it at the same call, as new_group requires) and kept, never destroyed: destroying a
    gloo group hung with torch 2.6 (the callback's conversion never returned on rank 1)."""
    from datetime import timedelta

    import torch.distributed as dist

    world = dist.group.WORLD
    for job, group in _CHANNEL_GROUPS:
        if job is world:
            return group
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
    _CHANNEL_GROUPS.append((world, group))
    return group


def _lead(work, channel: Channel) -> Any:
    import torch.distributed as dist

    try:
        outcome, error = ("ok", work(channel)), None
    except Zero2MergedError as e:
        outcome, error = ("error", e), e
    except BaseException as e:
        failed = Zero2MergedError(f"conversion failed on rank 0: {type(e).__name__}: {first_line(e)}")
        outcome, error = ("error", failed), e
    dist.broadcast_object_list([outcome], src=0, group=channel.group)
    if error is not None:
        raise error
    return outcome[1]


def _serve(group, rank: int) -> Any:
    import torch.distributed as dist

    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        kind, value = box[0]
        if kind != "tasks":
            break
        try:
            result = ("ok", write_share(value[rank - 1]))
        except Exception as e:  # noqa: BLE001 - reported to rank 0, which stops the conversion
            result = ("error", f"rank {rank} failed writing its shards: {type(e).__name__}: {first_line(e)}")
        dist.gather_object(result, None, dst=0, group=group)
    if kind == "error":
        raise value
    return value

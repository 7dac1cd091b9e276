"""Inside a distributed job: one rank does the work, the others wait for its result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zero2merged.errors import Zero2MergedError


def on_rank_zero(work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 of an initialized process group; the other ranks wait and get its result."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return work()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return work()
    from datetime import timedelta

    # A gloo group of its own: it carries Python objects whatever the job's backend, and its long timeout
    # lets the waiting ranks outlast a conversion of a large model.
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=12))
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", work())]
        except Zero2MergedError as e:
            box, error = [("error", e)], e
        except BaseException as e:
            box, error = [("error", Zero2MergedError(f"conversion failed on rank 0: {type(e).__name__}: {e}"))], e
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    kind, value = box[0]
    if kind == "error":
        raise (error or value)
    return value

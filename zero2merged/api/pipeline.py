"""``convert``: the six stages in order, through the runner that skips what is still valid.

inspect → consolidate → (rebuild → load → merge) → save. Each stage is a small object in its own module
(:mod:`zero2merged.stages`); the runner (:mod:`zero2merged.running.runner`) fingerprints it, skips it when its
record in the work directory's manifest is current, or runs it and records its typed result. Rebuild, load
and merge share a model held in memory (on the meta device when streaming), so they are run or skipped as
one group. Streaming (the default) or in memory is chosen once, here, and handed to the stages; the files
written are the same either way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zero2merged.api.distributed import on_rank_zero
from zero2merged.checkpoint.location import Location, resolve_tag
from zero2merged.core import names
from zero2merged.core.environment import require_supported
from zero2merged.core.errors import OptionError, OutputError
from zero2merged.core.options import ConvertOptions, Source, convert_options
from zero2merged.files.atomic import write_text_atomic
from zero2merged.files.pickles import pickle_policy
from zero2merged.model.base import base_config, base_dtype
from zero2merged.model.modelfiles import files_in
from zero2merged.running.manifest import FileHashes, Manifest
from zero2merged.running.report import ConvertReport
from zero2merged.running.runner import Runner
from zero2merged.running.runtime import sparing_the_collector
from zero2merged.stages.consolidate import Consolidate
from zero2merged.stages.inspect import Inspect, refuse_quantized
from zero2merged.stages.load import Load
from zero2merged.stages.merge import Merge, OutputForm
from zero2merged.stages.rebuild import Rebuild
from zero2merged.stages.save import Save, check_output_free
from zero2merged.stages.workers import make_helpers

STAGES = ("inspect", "consolidate", "rebuild", "load", "merge", "save")


def convert(checkpoint: Path | str, output: Path | str, **options: Any) -> ConvertReport:
    """Convert a DeepSpeed ZeRO checkpoint of a LoRA run into one merged, verified model folder.

    When ``torch.distributed`` is initialized (inside a training job, or under ``torchrun``), rank 0 does
    the work, the other ranks write their share of the output's shards, and all get the same report (or
    the same error).

    Args:
        checkpoint: The folder holding ``latest``, a tag folder, or a run folder of checkpoints.
        output: The merged model's folder; must not exist or be empty.
        **options: Where the LoRA config and base come from, the fields of
            :class:`~zero2merged.core.options.Source` (``base_model``, ``tag``, ``adapter_config``, ``lora_alpha``,
            ``use_rslora``, ``unsafe_pickle``); and how to convert, the fields of
            :class:`~zero2merged.core.options.ConvertOptions` (``dtype``, ``work_dir``, ``max_shard_size``,
            ``force``, ``ignore_base_mismatch``, ``in_memory``, ``workers``, ``device``, ``merge_into``,
            ``tuning``).

    Returns:
        The run's report: each stage ran or skipped, its time and result, parity figures.

    Raises:
        Zero2MergedError: bad input (one clear line) or a failed verification (VerificationError).
        TypeError: an option that does not exist.
    """
    source, settings = convert_options(checkpoint, dict(options))
    require_supported()
    _import_libraries()
    with sparing_the_collector():
        return on_rank_zero(lambda channel: _convert(source, Path(output), settings, channel))


def _import_libraries() -> None:
    """Import PEFT (and with it transformers) before the first stage: importing is start-up, seconds of it
    on a small machine, and would otherwise be timed as whichever stage first needs them."""
    import peft  # noqa: F401


def _convert(source: Source, output: Path, options: ConvertOptions, channel) -> ConvertReport:
    with pickle_policy(source.unsafe_pickle):
        where = resolve_tag(source.checkpoint, source.tag)
        output = output.expanduser().resolve()
        work = options.work_dir.resolve() if options.work_dir else output.with_name(output.name + names.WORK_SUFFIX)
        _check_paths(where.folder, output, work)
        with _work_dir(work), FileHashes() as hashes:
            runner = Runner(work, force=options.force, hashes=hashes, order=STAGES)
            if not _output_is_ours(runner.manifest, output):
                check_output_free(output)  # up front, before any heavy work
            report = _stages(runner, source, where, output, options, hashes, channel)
            write_text_atomic(work / names.REPORT, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _stages(
    runner: Runner, source: Source, where: Location, output: Path, options: ConvertOptions, hashes: FileHashes, channel
) -> ConvertReport:
    """The stages of one conversion, in order."""
    work, streaming = runner.work_dir, options.streaming
    info = runner.run(Inspect(source, where))
    refuse_quantized(info, streaming=streaming)
    if options.merge_into != "dequantized" and not info.layout.quantized:
        raise OptionError(
            f"--merge-into {options.merge_into} applies to a QLoRA run (a LoRA trained on a 4-bit base); "
            f"{info.checkpoint} trained on a full-precision base"
        )
    dtype = base_dtype(base_config(info.base_model)) if options.dtype == "auto" else options.dtype
    runner.run(Consolidate(info, work / names.CONSOLIDATED, options.tuning))
    rebuild = Rebuild(info, streaming=streaming)
    load = Load(
        info,
        rebuild,
        work / names.CONSOLIDATED,
        ignore_base_mismatch=options.ignore_base_mismatch,
        merge_into=options.merge_into,
    )
    form = OutputForm(dtype, options.max_shard_size, options.device) if streaming else None
    merge = Merge(
        info,
        rebuild,
        load,
        work,
        form=form,
        helpers=make_helpers(channel, options.workers),
        hashes=hashes,
        block_bytes=options.tuning.block_bytes,
    )
    rebuilt, _, merged = runner.run_together(rebuild, load, merge)
    runner.run(
        Save(
            info, rebuilt, merged, work, output, dtype=dtype, max_shard_size=options.max_shard_size, streaming=streaming
        )
    )
    return ConvertReport(
        checkpoint=info.checkpoint,
        tag=info.tag,
        output=str(output),
        work_dir=str(work),
        dtype=dtype,
        stages=runner.reports,
        warnings=info.warnings,
    )


@contextlib.contextmanager
def _work_dir(work: Path) -> Iterator[None]:
    """Create ``work`` if needed and hold its lock; a first run that fails before any stage finished leaves
    nothing behind. Only the run holding the lock ever removes it: a second run on the same work directory
    (two runs on one output, its default work directory) stops without touching the first's."""
    created = not work.exists()
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a parent that cannot be made or written
        raise OutputError(
            f"cannot make the work directory {work}: {e.strerror or e}; pass --work-dir (or --output) somewhere "
            "you can write"
        ) from e
    with _locked(work):
        try:
            yield
        except BaseException:
            stages = Manifest(work / names.MANIFEST).stages.values()
            if created and not any(record.get("status") == "done" for record in stages):
                shutil.rmtree(work, ignore_errors=True)
            raise


@contextlib.contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    """Hold the work directory's lock: a second run on it stops instead of corrupting the first."""
    try:
        lock = open(work_dir / names.LOCK, "a+")  # noqa: SIM115 - held for the block
    except OSError as e:  # the folder removed meanwhile (another run's that failed), or not writable
        raise OutputError(f"cannot lock the work directory {work_dir}: {e.strerror or e}; run again") from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            raise OutputError(
                f"work directory {work_dir} is in use by another zero2merged run (pid {owner}); "
                "wait for it or pass another --work-dir"
            ) from e
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_paths(checkpoint: Path, output: Path, work_dir: Path) -> None:
    for what, path in (("output", output), ("work directory", work_dir)):
        if _is_within(path, checkpoint) or _is_within(checkpoint, path):
            raise OutputError(f"the {what} {path} overlaps the checkpoint {checkpoint}; write it elsewhere")
    if _is_within(work_dir, output) or _is_within(output, work_dir):
        raise OutputError(f"the work directory {work_dir} and the output {output} must not contain each other")
    if output.exists() and not output.is_dir():
        raise OutputError(f"the output {output} exists and is not a directory")
    # Up front, rather than after the conversion's work: the output is written beside its place
    existing = next(folder for folder in output.parents if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"the output {output} cannot be written: {existing} is not a folder you can write into")


def _output_is_ours(manifest: Manifest, output: Path) -> bool:
    """Whether ``output`` holds exactly what this work directory's last save wrote there."""
    record = manifest.stages.get("save", {})
    return (
        record.get("status") == "done"
        and record.get("result", {}).get("output") == str(output)
        and set(record.get("outputs", {})) == {str(p.relative_to(output)) for p in files_in(output)}
    )

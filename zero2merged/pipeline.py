"""The stage order, and the runner that skips what is still valid.

``convert`` runs inspect → consolidate → rebuild → load → merge → save. Each stage's inputs are
fingerprinted (options, input file stats, the sha256 of the upstream artifacts) and its record kept in the
work directory's manifest; a stage whose record matches and whose files still hash the same is skipped.
Rebuild, load and merge share a model held in memory (on the meta device when streaming), so they are
skipped or run together. Streaming (the default) or in memory, the files written are the same.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zero2merged import modelcard, names
from zero2merged.basemodel import base_config, base_dtype
from zero2merged.distributed import on_rank_zero
from zero2merged.errors import OutputError
from zero2merged.manifest import (
    Manifest,
    describe_outputs,
    files_stat,
    fingerprint,
    write_text_atomic,
)
from zero2merged.modelfiles import files_in, fresh_dir, replace_dir
from zero2merged.parity import MERGE_TOLERANCE, SAVE_TOLERANCES
from zero2merged.stages.consolidate import consolidate
from zero2merged.stages.inspect import CheckpointInfo, inspect_checkpoint, resolve_tag
from zero2merged.stages.load import load_weights, plan_sources, read_consolidated
from zero2merged.stages.merge import merge, merge_streaming
from zero2merged.stages.rebuild import rebuild
from zero2merged.stages.save import DTYPES, partial_path, publish, save
from zero2merged.workers import make_helpers
from zero2merged.zero import trusting_pickles

log = logging.getLogger(__name__)

STAGES = ("inspect", "consolidate", "rebuild", "load", "merge", "save")


@dataclass
class StageReport:
    """One stage of a run: ``ran`` or ``skipped`` (its earlier result still valid), its time and metrics."""

    name: str
    status: str
    seconds: float
    metrics: dict = field(default_factory=dict)


@dataclass
class ConvertReport:
    """What :func:`convert` did. ``stages`` lists all six in order."""

    checkpoint: str
    tag: str
    output: str
    work_dir: str
    dtype: str
    stages: list[StageReport]
    warnings: list[str]

    @property
    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]

    def stage(self, name: str) -> StageReport:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.checkpoint} [{self.tag}] -> {self.output} ({self.dtype})"]
        for s in self.stages:
            lines.append(f"  {s.name:12} {s.status:8} {s.seconds:8.2f} s  {_headline(s)}")
        merge_parity = self.stage("merge").metrics.get("parity", {})
        save_parity = self.stage("save").metrics.get("parity", {})
        if merge_parity:
            scope = "each LoRA layer" if "layers" in merge_parity else "model outputs"
            lines.append(f"  parity merged vs unmerged ({scope}, fp32): max abs diff {merge_parity['max_abs_diff']:.3g}, "
                         f"top-1 agreement {merge_parity['top1_agreement']:.4f}")
        if save_parity:
            lines.append(f"  parity saved ({self.dtype}) vs fp32 merge: max abs diff {save_parity['max_abs_diff']:.3g}, "
                         f"top-1 agreement {save_parity['top1_agreement']:.4f}")
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)


def _headline(stage: StageReport) -> str:
    m = stage.metrics
    if stage.name == "inspect":
        return f"ZeRO-{m.get('zero_stage')}, {m.get('world_size')} ranks, {m.get('dtype')}"
    if stage.name == "consolidate":
        return f"{m.get('trainable')} trainable + {m.get('frozen')} frozen tensors, {human_size(m.get('bytes', 0))}"
    if stage.name == "rebuild":
        return f"{m.get('model_class')} wrapped by {m.get('peft_class')}"
    if stage.name == "merge":
        layers = m.get("parity", {}).get("layers")
        return f"{layers} LoRA layers merged one at a time, each checked" if layers else "merge_and_unload, parity checked"
    if stage.name == "load":
        return f"{m.get('from_checkpoint')} tensors from the checkpoint, {m.get('from_base')} from the base"
    if stage.name == "save":
        return f"{m.get('files')} files, {human_size(m.get('bytes', 0))}"
    return ""


def human_size(count: float) -> str:
    """Bytes as people read them: 231.6 KB, 1.5 GB."""
    units = ("B", "KB", "MB", "GB", "TB")
    step = 0
    while count >= 1000 and step < len(units) - 1:
        count, step = count / 1000, step + 1
    return f"{count:.0f} B" if step == 0 else f"{count:.1f} {units[step]}"


class _Run:
    """The manifest of one work directory and the reports of the stages run or skipped."""

    def __init__(self, work_dir: Path, force: bool):
        self.work_dir = work_dir
        self.manifest = Manifest(work_dir / names.MANIFEST)
        self.force = force
        self.reports: list[StageReport] = []

    def current(self, name: str, fp: str, root: Path | None = None) -> dict | None:
        return None if self.force else self.manifest.current(name, fp, root or self.work_dir)

    def skip(self, name: str, record: dict) -> None:
        log.info("%s: skipped (its result is still valid)", name)
        self.reports.append(StageReport(name, "skipped", 0.0, record.get("metrics", {})))

    def run(self, name: str, fp: str, body: Callable[[], tuple[Any, dict]], outputs: Callable[[], list[Path]],
            root: Path | None = None, scratch: tuple[Path, ...] = ()) -> Any:
        """Run one stage's ``body`` (returning ``(product, metrics)``) and record it with its output files.

        If the body fails, the folders in ``scratch`` (its half-written files) are removed; the earlier
        stages' artifacts stay, so a rerun starts from this stage.
        """
        log.info("%s: running (stage %d of %d)", name, STAGES.index(name) + 1, len(STAGES))
        self.manifest.put(name, {"status": "running", "fingerprint": fp})
        start = time.perf_counter()
        try:
            product, metrics = body()
        except BaseException as e:
            for path in scratch:
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"{name}: no space left on the device ({e.filename or self.work_dir}); free some, "
                                  "or put --work-dir and --output on a larger filesystem, and run again (the "
                                  "finished stages are kept)") from e
            raise
        described = describe_outputs(root or self.work_dir, outputs())  # hashing is part of the stage's cost
        seconds = time.perf_counter() - start
        record = {"status": "done", "fingerprint": fp, "outputs": described, "metrics": metrics,
                  "seconds": round(seconds, 3)}
        self.manifest.put(name, record)
        self.reports.append(StageReport(name, "ran", seconds, metrics))
        log.info("%s: done in %.2f s", name, seconds)
        return product

    def digest(self, name: str) -> str:
        """Fingerprint of a finished stage's output files (what the next stage consumes)."""
        return fingerprint(self.manifest.stages[name]["outputs"])


@contextlib.contextmanager
def _work_dir(work: Path) -> Iterator[None]:
    """Create ``work`` if needed; a first run that fails before any stage finished leaves nothing behind."""
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
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
    with open(work_dir / names.LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            raise OutputError(f"work directory {work_dir} is in use by another zero2merged run (pid {owner}); "
                              "wait for it or pass another --work-dir") from e
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def _check_device(device: str) -> None:
    import torch

    try:
        wanted = torch.device(device)
    except RuntimeError as e:
        raise OutputError(f"--device {device!r} is not a device torch knows ({e}); use cpu or cuda[:N]") from e
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise OutputError(f"--device {device}: this machine has no CUDA device torch can use; use --device cpu")
    if wanted.type not in ("cpu", "cuda"):
        raise OutputError(f"--device {device}: only cpu and cuda are supported")


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


def _output_is_ours(run: _Run, output: Path) -> bool:
    """Whether ``output`` holds exactly what this work directory's last save wrote there."""
    record = run.manifest.stages.get("save", {})
    return (record.get("status") == "done" and record.get("metrics", {}).get("output") == str(output)
            and set(record.get("outputs", {})) == {str(p.relative_to(output)) for p in files_in(output)})


def _base_fingerprint(base: str) -> Any:
    path = Path(base)
    return files_stat(files_in(path)) if path.is_dir() else base


def _adapter_config_candidates(folder: Path, given: Path | str | None) -> list[Path]:
    """The files stage 1 may read the LoRA config from (for the fingerprint)."""
    if given:
        given = Path(given).expanduser()
        candidates = [given / names.ADAPTER_CONFIG if given.is_dir() else given]
    else:
        candidates = [folder / names.ADAPTER_CONFIG, folder.parent / names.ADAPTER_CONFIG]
    return [p for p in candidates if p.is_file()]


def _check_output_free(output: Path) -> None:
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(f"the output {output} is not empty (never overwritten); choose a new --output or empty it")


def convert(
    checkpoint: Path | str,
    output: Path | str,
    *,
    base_model: str | None = None,
    tag: str | None = None,
    adapter_config: Path | str | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    dtype: str = "auto",
    work_dir: Path | str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    ignore_base_mismatch: bool = False,
    in_memory: bool = False,
    workers: int = 1,
    device: str = "cpu",
    unsafe_pickle: bool = False,
) -> ConvertReport:
    """Convert a DeepSpeed ZeRO checkpoint of a LoRA run into one merged, verified model folder.

    When ``torch.distributed`` is initialized (inside a training job, or under ``torchrun``), rank 0 does
    the work, the other ranks write their share of the output's shards, and all get the same report (or
    the same error).

    Args:
        checkpoint: The folder holding ``latest`` (or a tag folder).
        output: The merged model's folder; must not exist or be empty.
        base_model: Base model path or hub id; default: the adapter config's ``base_model_name_or_path``.
        tag: Tag to convert; default: the one ``latest`` names.
        adapter_config: ``adapter_config.json`` (or its folder) if the checkpoint has none beside it.
        lora_alpha: With no adapter config anywhere, infer one from the checkpoint's keys with this alpha.
        use_rslora: With ``lora_alpha``: the run used rsLoRA scaling.
        dtype: Output dtype: ``auto`` (the base's), ``fp32``, ``bf16`` or ``fp16``.
        work_dir: Where stage artifacts and the manifest live; default ``<output>.zero2merged-work``.
        max_shard_size: Largest safetensors shard, e.g. ``"5GB"``.
        force: Redo every stage even if its earlier result is still valid.
        ignore_base_mismatch: Go on when saved frozen weights differ from the base's (use the checkpoint's).
        in_memory: Load the whole model and check the merged model's outputs end to end, in several times
            the model's size of RAM. The default streams one layer at a time in memory that does not grow
            with the model, checking each merged layer's outputs; both write identical files.
        device: Where the streaming merge merges and checks each layer: ``cpu`` or ``cuda[:N]``.
        unsafe_pickle: Unpickle the rank files in full, whatever objects they hold (a pickle can run code:
            only for checkpoints you trust); by default only DeepSpeed's own classes are allowed.
        workers: Processes writing the output's shards (streaming). Inside a distributed job every rank
            writes a share instead (the work directory and the checkpoint must be on a filesystem they all
            see, at the same paths).

    Returns:
        The run's report: each stage ran or skipped, times, parity figures.

    Raises:
        Zero2MergedError: bad input (one clear line) or a failed verification (VerificationError).
    """
    if dtype not in ("auto", *DTYPES):
        raise OutputError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    lora = dict(base_model=base_model, adapter_config=adapter_config, lora_alpha=lora_alpha, use_rslora=use_rslora)
    options = dict(tag=tag, lora=lora, dtype=dtype, work_dir=work_dir, max_shard_size=max_shard_size, force=force,
                   ignore_base_mismatch=ignore_base_mismatch, in_memory=in_memory, workers=workers, device=device)
    if workers < 1:
        raise OutputError(f"workers must be at least 1; got {workers}")
    _check_device(device)
    if in_memory and (workers > 1 or device != "cpu"):
        raise OutputError("--workers and --device apply to the streaming conversion; drop --in-memory to use them")
    _import_libraries()

    def work(channel):
        with trusting_pickles() if unsafe_pickle else contextlib.nullcontext():  # or the caller's choice
            return _convert(Path(checkpoint), Path(output), channel=channel, **options)
    with _sparing_the_collector():
        return on_rank_zero(work)


def _import_libraries() -> None:
    """Import PEFT (and with it transformers) before the first stage: importing is start-up, seconds of it
    on a small machine, and would otherwise be timed as whichever stage first needs them."""
    import peft  # noqa: F401


@contextlib.contextmanager
def _sparing_the_collector() -> Iterator[None]:
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


def _convert(checkpoint: Path, output: Path, *, tag, lora, dtype, work_dir, max_shard_size, force,
             ignore_base_mismatch, in_memory, workers, device, channel) -> ConvertReport:
    where = resolve_tag(checkpoint, tag)
    folder, tag = where.folder, where.tag
    output = output.expanduser().resolve()
    work = Path(work_dir).expanduser().resolve() if work_dir else output.with_name(output.name + names.WORK_SUFFIX)
    _check_paths(folder, output, work)
    with _work_dir(work), _locked(work):
        run = _Run(work, force)
        if not _output_is_ours(run, output):
            _check_output_free(output)  # up front, before any heavy work
        conversion = _Conversion(run, folder, tag, output, streaming=not in_memory, device=device,
                                 helpers=functools.partial(make_helpers, channel, workers))
        info = conversion.inspect(**lora)
        out_dtype = base_dtype(base_config(info.base_model)) if dtype == "auto" else dtype
        conversion.consolidate(info)
        conversion.merge(info, ignore_base_mismatch=ignore_base_mismatch, dtype=out_dtype,
                         max_shard_size=max_shard_size)
        conversion.save(info, dtype=out_dtype, max_shard_size=max_shard_size)
        report = ConvertReport(checkpoint=info.checkpoint, tag=info.tag, output=str(output), work_dir=str(work),
                               dtype=out_dtype, stages=run.reports, warnings=info.warnings)
        write_text_atomic(work / names.REPORT, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


class _Conversion:
    """The six stages of one conversion, each run or skipped through the manifest.

    Streaming (the default), rebuild builds the model on the meta device, load plans where each weight
    comes from, merge merges one LoRA layer at a time straight into the output's files (in the output
    dtype) and save puts them in place. In memory, load fills the whole model, merge writes it in fp32
    with probe outputs, and save casts, reloads and compares.
    """

    def __init__(self, run: _Run, folder: Path, tag: str, output: Path, *, streaming: bool,
                 helpers: Callable[..., Any], device: str):
        self.run, self.folder, self.tag, self.output = run, folder, tag, output
        # helpers(work, staged, dtype, max_shard_size, device): the other processes writing shards, or None
        self.streaming, self.helpers, self.device = streaming, helpers, device
        self.work = run.work_dir
        # The rank files, by name, size and mtime: a new save under the same tag changes them.
        self.tag_files = files_stat([p for p in (folder / tag).iterdir() if p.is_file()])

    def inspect(self, *, adapter_config, **options) -> CheckpointInfo:
        """Stage 1; ``options``: base_model, lora_alpha, use_rslora (see :func:`inspect_checkpoint`)."""
        # Cheap, but keyed on the files: a new save or a changed adapter config redoes everything after it.
        fp = fingerprint({
            "checkpoint": str(self.folder), "tag": self.tag, "options": options, "files": self.tag_files,
            "adapter_config": files_stat(_adapter_config_candidates(self.folder, adapter_config)),
        })
        path = self.work / names.INSPECT
        if record := self.run.current("inspect", fp):
            self.run.skip("inspect", record)
            return CheckpointInfo.from_json(path.read_text())

        def body():
            info = inspect_checkpoint(self.folder, tag=self.tag, adapter_config=adapter_config, **options)
            write_text_atomic(path, info.to_json())
            layout = info.layout
            return info, {"zero_stage": layout.zero_stage, "world_size": layout.world_size, "dtype": layout.dtype,
                          "trainable": len(layout.trainable_shapes), "frozen": len(layout.frozen),
                          "frozen_saved": layout.frozen_source is not None}
        return self.run.run("inspect", fp, body, lambda: [path])

    def consolidate(self, info: CheckpointInfo) -> None:
        path = self.work / names.CONSOLIDATED
        # inspect.json holds shapes, not values: the rank files themselves are inputs here.
        fp = fingerprint({"inspect": self.run.digest("inspect"), "files": self.tag_files})
        if record := self.run.current("consolidate", fp):
            self.run.skip("consolidate", record)
        else:
            self.run.run("consolidate", fp, lambda: (None, consolidate(info, path)), lambda: [path])

    def merge(self, info: CheckpointInfo, *, ignore_base_mismatch: bool, dtype: str, max_shard_size) -> None:
        """Rebuild, load and merge: their model lives in memory only, so they are skipped or run together."""
        run, streaming = self.run, self.streaming
        fp_rebuild = fingerprint({"inspect": run.digest("inspect"), "base": _base_fingerprint(info.base_model),
                                  "streaming": streaming})
        fp_load = fingerprint({"rebuild": fp_rebuild, "consolidated": run.digest("consolidate"),
                               "ignore_base_mismatch": ignore_base_mismatch})
        # Streaming, merge writes the output's files: their dtype and sharding are its inputs too.
        output_options = {"dtype": dtype, "max_shard_size": max_shard_size, "device": self.device} if streaming else None
        fp_merge = fingerprint({"load": fp_load, "tolerance": asdict(MERGE_TOLERANCE), "output": output_options})
        records = [run.current(name, fp) for name, fp in (("rebuild", fp_rebuild), ("load", fp_load), ("merge", fp_merge))]
        if all(records):
            for name, record in zip(("rebuild", "load", "merge"), records):
                run.skip(name, record)
            return

        rebuild_path, load_path = self.work / names.REBUILD, self.work / names.LOAD
        consolidated, merged = self.work / names.CONSOLIDATED, self.work / names.MERGED

        def do_rebuild():
            model, record = rebuild(info, on_meta=streaming)
            write_text_atomic(rebuild_path, _json(record))
            return (model, record), record

        def do_load():
            if streaming:
                plan = plan_sources(model, consolidated, info, rebuilt, ignore_base_mismatch=ignore_base_mismatch)
            else:
                plan = load_weights(model, read_consolidated(consolidated), info,
                                    resized_vocab=rebuilt["resized_vocab"], ignore_base_mismatch=ignore_base_mismatch)
            write_text_atomic(load_path, _json(plan))
            return plan, {k: v for k, v in plan.items() if k != "sources"}

        def do_merge():
            if not streaming:
                return merge(model, self.work)
            staged = fresh_dir(self.work / f".{names.MERGED}.tmp")
            helpers = self.helpers(self.work, staged, dtype, max_shard_size, self.device)
            metrics = merge_streaming(model, info.adapter_name, plan["sources"], staged, dtype=DTYPES[dtype],
                                      max_shard_size=max_shard_size, base_model=info.base_model, device=self.device,
                                      helpers=helpers)
            shutil.rmtree(merged, ignore_errors=True)
            replace_dir(staged, merged)
            return None, metrics

        model, rebuilt = run.run("rebuild", fp_rebuild, do_rebuild, lambda: [rebuild_path])
        plan = run.run("load", fp_load, do_load, lambda: [load_path])
        run.run("merge", fp_merge, do_merge,
                lambda: files_in(merged) + ([] if streaming else [self.work / names.PROBES]),
                scratch=(self.work / f".{names.MERGED}.tmp",))

    def save(self, info: CheckpointInfo, *, dtype: str, max_shard_size) -> None:
        """Write the output in ``dtype`` and move it into place, verified."""
        run = self.run
        auto_class = run.manifest.stages["rebuild"]["metrics"]["auto_class"]
        tokenizer_sources = [self.folder, info.base_model]
        tolerance = None if self.streaming else asdict(SAVE_TOLERANCES[dtype])
        fp = fingerprint({"merge": run.digest("merge"), "output": str(self.output), "dtype": dtype,
                          "max_shard_size": max_shard_size, "tolerance": tolerance,
                          "tokenizer": [_base_fingerprint(str(s)) for s in tokenizer_sources]})
        if record := run.current("save", fp, root=self.output):
            run.skip("save", record)
            return
        _check_output_free(self.output)

        merge_parity = run.manifest.stages["merge"]["metrics"]["parity"]

        def card(save_parity: dict | None) -> str:
            return modelcard.render(info, dtype=dtype, merge_parity=merge_parity, save_parity=save_parity)

        def body():
            if self.streaming:
                metrics = publish(self.work, self.output, auto_class=auto_class, dtype=dtype,
                                  tokenizer_sources=tokenizer_sources, card=card)
            else:
                metrics = save(self.work, self.output, auto_class=auto_class, dtype=dtype,
                               max_shard_size=max_shard_size, tokenizer_sources=tokenizer_sources, card=card)
            return None, {**metrics, "output": str(self.output)}
        run.run("save", fp, body, lambda: files_in(self.output), root=self.output,
                scratch=(partial_path(self.output),))


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)

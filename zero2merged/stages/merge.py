"""Stage 5, merge: PEFT's own merge, then parity of the merged model with the unmerged one.

The merge maths (W0 + s·B·A, rsLoRA's scaling, DoRA's row norms, fan_in_fan_out) stays PEFT's: nothing
here re-implements it. In memory, ``merge_and_unload`` merges the whole model and both models run on the
same probe inputs. Streaming, each LoRA layer is merged on its own by PEFT's layer ``merge`` (a linear layer
a block of rows at a time: :mod:`zero2merged.checks.layers`) and checked on probe activations, and the merged
weights go straight into the output's files (:mod:`zero2merged.stages.shards`), shared out among helper processes
when there are any (:mod:`zero2merged.stages.workers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from zero2merged.checks.parity import MERGE_TOLERANCE, compare_routed, probe_inputs, routed_outputs, routes_to_tensors
from zero2merged.core import names
from zero2merged.core.dtypes import TORCH_DTYPES
from zero2merged.core.errors import VerificationError
from zero2merged.core.results import CheckpointInfo, MergeResult, RebuildResult
from zero2merged.files.atomic import replacing
from zero2merged.model.layouts import untie_if_diverged
from zero2merged.model.modelfiles import check_complete, files_in, fresh_dir, replace_dir
from zero2merged.running.manifest import FileHashes
from zero2merged.running.runner import Stage
from zero2merged.stages.load import Load
from zero2merged.stages.rebuild import Rebuild
from zero2merged.stages.shards import deal, plan_shards, record_check, write_configs, write_index, write_shards
from zero2merged.stages.workers import Helpers, ShardTask


@dataclasses.dataclass(frozen=True)
class OutputForm:
    """What the streaming merge writes: the output's weights in ``dtype`` (a short name), in shards of at most
    ``max_shard_size`` bytes, each layer merged and checked on ``device``."""

    dtype: str
    max_shard_size: int
    device: str = "cpu"


class Merge(Stage[MergeResult]):
    """Stage 5 in a conversion, run with rebuild and load, on their model. It writes ``merged/`` in the work
    directory: streaming, the output's own files; in memory, the merged model in fp32 (with the probes and
    both models' outputs on them, for save's check).

    Args:
        info: Stage 1's result.
        rebuild: Stage 3, which holds the model.
        load: Stage 4 (streaming: where each weight is read from).
        work_dir: The work directory.
        form: Streaming: what to write (the merge then writes the output's files, so this is an input);
            None in memory.
        helpers: Streaming: other processes writing shards, or None.
        hashes: The run's file hashes (the shards are flushed and hashed in the background as they are done).
        block_bytes: See :class:`~zero2merged.core.options.Tuning`.
    """

    name = "merge"
    result_type = MergeResult

    def __init__(
        self,
        info: CheckpointInfo,
        rebuild: Rebuild,
        load: Load,
        work_dir: Path,
        *,
        form: OutputForm | None,
        helpers: Helpers | None,
        hashes: FileHashes,
        block_bytes: int,
    ):
        self.info, self.rebuild, self.load, self.work_dir = info, rebuild, load, work_dir
        self.form, self.helpers, self.hashes, self.block_bytes = form, helpers, hashes, block_bytes
        self.merged = work_dir / names.MERGED
        self.staged = work_dir / f".{names.MERGED}.tmp"

    def inputs(self) -> dict:
        return {"tolerance": MERGE_TOLERANCE.to_dict(), "output": dataclasses.asdict(self.form) if self.form else None}

    def outputs(self) -> list[Path]:
        return files_in(self.merged) + ([] if self.form else [self.work_dir / names.PROBES])

    def scratch(self) -> list[Path]:
        return [self.staged]

    def run(self) -> MergeResult:
        model = self.rebuild.model
        if self.form is None:
            return merge(model, self.work_dir)
        fresh_dir(self.staged)
        task = ShardTask(
            self.info,
            self.load.result.sources,
            str(self.staged),
            self.form.dtype,
            self.form.max_shard_size,
            self.form.device,
            self.block_bytes,
        )
        result = merge_streaming(model, self.rebuild.result, task, helpers=self.helpers, hashes=self.hashes)
        result.qlora = self.load.result.qlora
        shutil.rmtree(self.merged, ignore_errors=True)
        replace_dir(self.staged, self.merged)
        return result


def merge(model: Any, work_dir: Path) -> MergeResult:
    """Stage 5 (in memory): merge the adapter into the base and check the merged model against the unmerged one.

    Writes ``merged/`` (the merged model in fp32, ``save_pretrained`` layout) and ``probes.safetensors``
    (probe inputs, unmerged and merged outputs, the merged model's MoE routes) into ``work_dir``.

    Args:
        model: The loaded PEFT wrapper from stage 4 (merged in place).

    Raises:
        VerificationError: the merge produced NaN/inf or outputs beyond tolerance.
    """
    inputs = probe_inputs(model.get_base_model().config)
    unmerged, routes = routed_outputs(model, inputs)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT's safe_merge found NaNs
        raise VerificationError(f"merging the adapter failed: {e}") from e
    untie_if_diverged(merged)
    parity = compare_routed(merged, inputs, unmerged, routes)
    parity.check(MERGE_TOLERANCE, "merged vs unmerged model")
    merged_outputs, merged_routes = routed_outputs(merged, inputs)  # the saved model is held to these

    staged = fresh_dir(work_dir / f".{names.MERGED}.tmp")
    merged.save_pretrained(staged)
    check_complete(staged, merged)
    final = work_dir / names.MERGED
    shutil.rmtree(final, ignore_errors=True)
    replace_dir(staged, final)
    with replacing(work_dir / names.PROBES) as tmp:
        save_file({**inputs, "unmerged": unmerged, "merged": merged_outputs, **routes_to_tensors(merged_routes)}, tmp)
    return MergeResult(parity=parity)


def merge_streaming(
    model: Any, rebuilt: RebuildResult, task: ShardTask, *, helpers: Helpers | None, hashes: FileHashes
) -> MergeResult:
    """Stage 5 (streaming): merge one LoRA layer at a time and write the merged weights as they come.

    ``model`` is the PEFT wrapper on the meta device. Each LoRA layer is given its weights (fp32; a linear
    layer a block of rows at a time), run on seeded probe activations, merged by PEFT's own ``merge``, run
    again (the two outputs must agree), and its merged weight written; then it goes back to the meta device.
    Names, shards, index, configs and bytes are those ``save_pretrained`` writes for the merged model (a
    test holds the two paths to identical files). The shards are dealt out to ``helpers`` too, if any.

    Args:
        model: The PEFT wrapper from stage 3, on the meta device.
        rebuilt: Stage 3's result.
        task: What to write, and where (its ``shards`` are dealt out here).
        helpers: Other processes to write shards too; None: this one only.
        hashes: Flushes and hashes each shard written here in the background.

    Raises:
        VerificationError: a layer merged to NaN/inf, or its merged output left tolerance.
    """
    plan = plan_shards(model, rebuilt, TORCH_DTYPES[task.dtype], task.max_shard_size)
    sizes = {shard: plan.shard_bytes(shard) for shard in plan.split.filename_to_tensors}
    mine, *theirs = deal(sizes, 1 + (helpers.size if helpers else 0))
    pending = helpers.start([dataclasses.replace(task, shards=share) for share in theirs]) if helpers else list
    records = record_check(plan.readers, task.sources)  # each helper checks what it reads
    try:
        worst = write_shards(
            plan,
            mine,
            task.info.adapter_name,
            task.sources,
            Path(task.staged),
            flushing=hashes.flush_as_written,
            device=task.device,
            block_bytes=task.block_bytes,
            records=records,
        )
    except Exception:
        with contextlib.suppress(Exception):
            pending()  # let the helpers finish before stopping: none is left waiting
        raise
    except BaseException:  # interrupted (Ctrl-C, SIGTERM, SystemExit): stop now, the helpers too
        if helpers is not None:
            helpers.abandon()
        raise
    worst = functools.reduce(lambda a, b: a.worse(b), pending(), worst)
    write_index(plan, Path(task.staged))
    write_configs(plan.final, Path(task.staged), TORCH_DTYPES[task.dtype], task.info.base_model)
    return MergeResult(
        parity=worst,
        layers=len(plan.layers),
        files=len(sizes),
        processes=len([share for share in (mine, *theirs) if share]),
        checked=records.checked,
    )

"""Stage 6, save: the merged model as ``save_pretrained`` writes it, verified before it is put in place.

The model is assembled beside the output, in a staging folder of this run's own
(``.<name>.zero2merged-partial-<pid>-<random>``: :mod:`zero2merged.files.staging`), in the chosen dtype, sharded
with an index, tied weights written once, with the tokenizer, chat template, generation config (their special
token ids made to agree: see :mod:`zero2merged.model.serving`) and model card, and renamed into place only once
verified: the output folder never holds a model that looks complete but is not, nor two runs' files mixed (a
run that finds the output taken by another when it gets there stops in one line).

Streaming (:func:`publish`), stage 5 already wrote the weights and configs: they are hard-linked in and
checked against the model the plain Auto class builds from the saved config. In memory (:func:`save`),
``save_pretrained`` writes them, and a reload with the plain Auto class must give back every tensor exactly
and reproduce the merged outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from zero2merged.checks.parity import SAVE_TOLERANCES, compare_routed, routes_from_tensors
from zero2merged.core import names
from zero2merged.core.dtypes import TORCH_DTYPES
from zero2merged.core.errors import OutputError, VerificationError
from zero2merged.core.results import CheckpointInfo, MergeResult, Parity, RebuildResult, SaveResult, Served
from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.staging import place, staging, staging_path
from zero2merged.model.base import load_base, saved_dtypes
from zero2merged.model.modelfiles import check_complete, files_in
from zero2merged.model.serving import generation_config_sources, serve
from zero2merged.running import modelcard
from zero2merged.running.manifest import files_stat
from zero2merged.running.runner import Stage
from zero2merged.stages.rebuild import base_fingerprint


class Save(Stage[SaveResult]):
    """Stage 6 in a conversion: its outputs are the output folder's files (a rerun redoes it if any changed).

    Args:
        info: Stage 1's result.
        rebuilt: Stage 3's result (the Auto class that loads the output).
        merged: Stage 5's result (its parity, for the model card).
        work_dir: Holds stage 5's ``merged/``.
        output: The output folder (absent or empty).
        dtype: The output dtype's short name.
        max_shard_size: The largest shard, in bytes (in memory: ``save_pretrained`` shards here).
        streaming: Stage 5 wrote the output's files already; otherwise they are written, reloaded and checked here.
    """

    name = "save"
    result_type = SaveResult

    def __init__(
        self,
        info: CheckpointInfo,
        rebuilt: RebuildResult,
        merged: MergeResult,
        work_dir: Path,
        output: Path,
        *,
        dtype: str,
        max_shard_size: int,
        streaming: bool,
    ):
        self.info, self.rebuilt, self.merged, self.work_dir, self.output = info, rebuilt, merged, work_dir, output
        self.dtype, self.max_shard_size, self.streaming = dtype, max_shard_size, streaming
        self.staged = staging_path(output)  # this run's own

    def inputs(self) -> dict:
        return {
            "output": str(self.output),
            "dtype": self.dtype,
            "max_shard_size": self.max_shard_size,
            "tolerance": None if self.streaming else SAVE_TOLERANCES[self.dtype].to_dict(),
            "serving": [base_fingerprint(source) for source in (self.info.checkpoint, self.info.base_model)],
            "generation_config": files_stat(
                [p for p in generation_config_sources(self.info.checkpoint) if p.is_file()]
            ),
        }

    def root(self, work_dir: Path) -> Path:
        return self.output

    def outputs(self) -> list[Path]:
        return files_in(self.output)

    def scratch(self) -> list[Path]:
        return [self.staged]

    def run(self) -> SaveResult:
        check_output_free(self.output)

        def card(save_parity: Parity | None, served: Served) -> str:
            return modelcard.render(
                self.info, dtype=self.dtype, merged=self.merged, save_parity=save_parity, served=served
            )

        if self.streaming:
            return publish(
                self.work_dir,
                self.output,
                auto_class=self.rebuilt.auto_class,
                dtype=self.dtype,
                info=self.info,
                card=card,
                staged=self.staged,
            )
        return save(
            self.work_dir,
            self.output,
            auto_class=self.rebuilt.auto_class,
            dtype=self.dtype,
            max_shard_size=self.max_shard_size,
            info=self.info,
            card=card,
            staged=self.staged,
        )


def check_output_free(output: Path) -> None:
    """Raise unless ``output`` is absent or an empty folder: an output is never overwritten."""
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(f"the output {output} is not empty (never overwritten); choose a new --output or empty it")


def save(
    work_dir: Path,
    output: Path,
    *,
    auto_class: str,
    dtype: str,
    max_shard_size: int,
    info: CheckpointInfo,
    card: Callable[[Parity | None, Served], str],
    staged: Path | None = None,
) -> SaveResult:
    """Stage 6 (in memory): write the merged model to ``output`` in ``dtype``; verify; move into place.

    Args:
        work_dir: Holds stage 5's ``merged/`` and ``probes.safetensors``.
        output: Final folder (absent or empty).
        auto_class: transformers Auto class name that loads the model.
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        max_shard_size: Largest shard, e.g. ``"5GB"``.
        info: Stage 1's result (the run's and the base's folders, for the serving files).
        card: The model card's text, given this stage's parity figures and the serving files' sources.
        staged: This run's staging folder (default: a new one).

    Returns:
        What was written, with the parity of the saved model with the fp32 merge.

    Raises:
        VerificationError: the reloaded model differs from what was written or from the merge.
        OutputError: another run put a model at ``output`` first.
    """
    model = load_base(auto_class, str(work_dir / names.MERGED), TORCH_DTYPES[dtype])
    with staging(output, staged) as staged:
        model.save_pretrained(staged, max_shard_size=max_shard_size)
        served = serve(staged, info.checkpoint, info.base_model)

        probes = load_file(work_dir / names.PROBES)
        reference = probes.pop("merged")
        probes.pop("unmerged")
        routes = routes_from_tensors(probes)
        parity = _check_reload(staged, model, auto_class, TORCH_DTYPES[dtype], probes, reference, routes)
        parity.check(SAVE_TOLERANCES[dtype], f"the saved {dtype} model vs the fp32 merge")
        (staged / names.MODEL_CARD).write_text(card(parity, served))
        place(staged, output)
    return _written(output, dtype, served, parity)


def publish(
    work_dir: Path,
    output: Path,
    *,
    auto_class: str,
    dtype: str,
    info: CheckpointInfo,
    card: Callable[[Parity | None, Served], str],
    staged: Path | None = None,
) -> SaveResult:
    """Stage 6 (streaming): put the model files stage 5 wrote in place, with the tokenizer, verified.

    The files are hard-linked from ``merged/`` (copied across filesystems), so publishing costs no I/O.
    Verification, without loading weights: the saved config builds the model with the plain Auto class (on
    the meta device), and the files hold exactly its weights (tied ones once), shapes and dtype as declared,
    every one where the index says. Stage 5 already checked each merged layer's outputs and wrote the bytes.

    Args:
        staged: This run's staging folder (default: a new one).

    Returns:
        What was written, and where its serving files came from.

    Raises:
        VerificationError: the files do not describe a model the Auto class loads without complaint.
        OutputError: another run put a model at ``output`` first.
    """
    with staging(output, staged) as staged:
        for file in files_in(work_dir / names.MERGED):
            _link_or_copy(file, staged / file.name)
        served = serve(staged, info.checkpoint, info.base_model)
        _check_structure(staged, auto_class, TORCH_DTYPES[dtype])
        (staged / names.MODEL_CARD).write_text(card(None, served))
        place(staged, output)
    return _written(output, dtype, served, None)


def _written(output: Path, dtype: str, served: Served, parity: Parity | None) -> SaveResult:
    files = files_in(output)
    return SaveResult(
        output=str(output),
        dtype=dtype,
        files=len(files),
        bytes=sum(f.stat().st_size for f in files),
        served=served,
        parity=parity,
    )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(source, target)


def _check_structure(staged: Path, auto_class: str, dtype: torch.dtype) -> None:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(staged, trust_remote_code=False)
        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(config)
    except (OSError, ValueError) as e:
        raise VerificationError(f"the config written to {staged} does not build {auto_class}: {e}") from e
    loaded = check_complete(staged, model)
    dtype_of = saved_dtypes(model, dtype)
    module_of = {source: name for name, group in loaded.items() for source in group.sources}
    where: dict[str, str] = {}
    for file in sorted(staged.glob("*.safetensors")):
        reader = Reader(file)
        for name in reader.keys():
            wanted = dtype_of(module_of[name])
            if reader.dtype(name).is_floating_point and reader.dtype(name) != wanted:
                raise VerificationError(f"{file}: {name} is {reader.dtype(name)}, not {wanted}")
            where[name] = file.name
    index = staged / names.WEIGHTS_INDEX
    if index.is_file() and json.loads(index.read_text())["weight_map"] != where:
        raise VerificationError(f"{index} does not map every weight to the shard holding it")
    if not index.is_file() and list(set(where.values())) != [names.WEIGHTS]:
        raise VerificationError(f"{staged} holds several weight files but no {names.WEIGHTS_INDEX}")


def _check_reload(
    staged: Path, model, auto_class: str, dtype: torch.dtype, probes: dict, reference: torch.Tensor, routes: list
) -> Parity:
    """Reload with the plain Auto class: no key missing or unexpected, every tensor identical, ties kept; and
    its outputs vs the fp32 merge's (its MoE routers following the merge's choices: see zero2merged.checks.parity)."""
    import transformers

    check_complete(staged, model)
    reloaded, info = getattr(transformers, auto_class).from_pretrained(
        staged, dtype=dtype, output_loading_info=True, trust_remote_code=False
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise VerificationError(f"reloading {staged} with {auto_class} reported {problems or info['error_msgs']}")
    expected, got = model.state_dict(), reloaded.state_dict()
    for name, tensor in expected.items():
        if name not in got or got[name].dtype != tensor.dtype or not torch.equal(got[name], tensor):
            raise VerificationError(f"{name} did not reload from {staged} as it was written")
    _check_ties(expected, got, staged)
    return compare_routed(reloaded.float(), probes, reference, routes)


def _check_ties(expected: dict, got: dict, staged: Path) -> None:
    """Weights that share storage in the merged model share it after the reload too, and no others."""

    def groups(state):
        by_ptr: dict[int, set[str]] = {}
        for name, tensor in state.items():
            by_ptr.setdefault(tensor.data_ptr(), set()).add(name)
        return sorted(sorted(g) for g in by_ptr.values() if len(g) > 1)

    if groups(expected) != groups(got):
        raise VerificationError(
            f"tied weights changed on reload from {staged}: {groups(expected)} became {groups(got)}"
        )

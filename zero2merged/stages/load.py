"""Stage 4, load: the consolidated weights into the PEFT wrapper, with every key accounted for.

* No unexpected key: each consolidated tensor has a place in the wrapper, with the same shape.
* A missing key only where the checkpoint did not save frozen params; then the base supplies it.
* Saved frozen params must equal the base's (cast to the dtype they were saved in): if not, the user gave
  the wrong base model, or another revision of it, and the output would carry its config and tokenizer.
  In memory every value is compared (both models are loaded whole anyway). Streaming, a sample of rows of
  each tensor is: the output's weights come from the checkpoint where it saved them, so the compare guards
  only against a wrong ``--base-model``, whose every tensor differs; reading the whole base for it cost a
  third of a 2.4B conversion (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from zero2merged.checkpoint.quantized import (
    DequantizedWeights,
    is_quant_state,
    quant_kind,
    round_trip,
    settings_dtype,
)
from zero2merged.core import names
from zero2merged.core.errors import BaseModelError, CheckpointError
from zero2merged.core.names import DEQUANTIZED, ORIGINAL
from zero2merged.core.results import CheckpointInfo, LoadResult, RebuildResult, ResizedVocab
from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.zipcheck import RecordCheck
from zero2merged.model.weights import BaseWeights, read_base
from zero2merged.running.progress import Progress
from zero2merged.running.runner import Stage
from zero2merged.stages.base_compare import (
    difference,
    sampled_4bit_difference,
    sampled_4bit_scales,
    sampled_difference,
    sampled_rows,
)
from zero2merged.stages.rebuild import Rebuild


class Load(Stage[LoadResult]):
    """Stage 4 in a conversion, run with rebuild and merge: it fills (in memory) or plans (streaming) the
    model :class:`~zero2merged.stages.rebuild.Rebuild` built.

    Args:
        info: Stage 1's result.
        rebuild: Stage 3, which holds the model.
        consolidated: Stage 2's store.
        ignore_base_mismatch: Use the checkpoint's frozen weights even where they differ from the base's.
    """

    name = "load"
    result_type = LoadResult

    def __init__(
        self,
        info: CheckpointInfo,
        rebuild: Rebuild,
        consolidated: Path,
        *,
        ignore_base_mismatch: bool,
        merge_into: str = "dequantized",
    ):
        self.info, self.rebuild, self.consolidated = info, rebuild, consolidated
        self.ignore_base_mismatch, self.merge_into = ignore_base_mismatch, merge_into

    def inputs(self) -> dict:
        return {"ignore_base_mismatch": self.ignore_base_mismatch, "merge_into": self.merge_into}

    def run(self) -> LoadResult:
        model, rebuilt = self.rebuild.model, self.rebuild.result
        if self.rebuild.streaming:
            return plan_sources(
                model,
                self.consolidated,
                self.info,
                rebuilt,
                ignore_base_mismatch=self.ignore_base_mismatch,
                merge_into=self.merge_into,
            )
        saved, records = open_consolidated(self.consolidated)
        result = load_weights(
            model,
            read_consolidated(saved, records),
            self.info,
            resized_vocab=rebuilt.resized_vocab,
            ignore_base_mismatch=self.ignore_base_mismatch,
        )
        result.checked = records.checked
        return result


def open_consolidated(path: Path) -> tuple[Reader, RecordCheck]:
    """Stage 2's store, and a CRC-32 check of the rank files' records its referenced tensors (the saved
    frozen params, which stage 2 did not copy) are read from, fed as they are read."""
    saved = Reader(path)
    records = RecordCheck(sorted({file for key in saved.references for file, _, _ in saved.ranges(key)}))
    saved.observe = records.feed
    return saved, records


def read_consolidated(saved: Reader, records: RecordCheck) -> Iterator[tuple[str, torch.Tensor]]:
    """Stage 2's store (:func:`open_consolidated`), one tensor at a time; the rank files' records are checked
    once all are read, before the accounting could blame the base for a damaged copy."""
    for key in saved.keys():
        yield key, saved.get(key)
    records.finish()


def load_weights(
    model,
    tensors: Iterable[tuple[str, torch.Tensor]],
    info: CheckpointInfo,
    *,
    resized_vocab: ResizedVocab | None = None,
    ignore_base_mismatch: bool = False,
) -> LoadResult:
    """Stage 4 (in memory): copy the checkpoint's tensors into ``model`` (the wrapper from stage 3).

    Args:
        model: The PEFT wrapper; its non-saved params keep the base's values.
        tensors: ``(name, tensor)`` pairs: :func:`read_consolidated` of stage 2's store, or a
            :class:`~zero2merged.checkpoint.reader.ZeroReader`'s tensors straight from the checkpoint.
        info: Stage 1's result.
        resized_vocab: Stage 3's record of a vocabulary resized to the checkpoint's: the base's values then
            exist only for its first ``base_rows`` rows.
        ignore_base_mismatch: Use the checkpoint's frozen weights even where they differ from the base's.

    Returns:
        The key accounting: counts from the checkpoint and from the base, and any frozen mismatches.

    Raises:
        CheckpointError: a consolidated key has no place in the wrapper, or another shape.
        BaseModelError: saved frozen weights differ from the base's, or the base has params the
            checkpoint saved no value for although it saved frozen params.
    """
    state = model.state_dict(keep_vars=True)
    resized = _resized_keys(state, resized_vocab)
    mismatched: list[tuple[str, float]] = []
    keys = []
    for key, tensor in tensors:
        target = _place(state, key, list(tensor.shape))
        if key in info.layout.frozen:
            rows = resized.get(key)
            diff = difference(tensor, target) if rows is None else difference(tensor[:rows], target[:rows])
            if diff is not None:
                mismatched.append((key, diff))
        with torch.no_grad():
            target.copy_(tensor)
        keys.append(key)
    accounting, _ = _account(state, keys, info, resized_vocab, mismatched, ignore_base_mismatch)
    return accounting


def plan_sources(
    model,
    consolidated: Path,
    info: CheckpointInfo,
    rebuilt: RebuildResult,
    *,
    ignore_base_mismatch: bool = False,
    merge_into: str = "dequantized",
) -> LoadResult:
    """Stage 4 (streaming): where every weight of ``model`` (the wrapper, on the meta device) comes from.

    A QLoRA run's 4-bit weights come dequantized (``merge_into="dequantized"``: from the saved 4-bit data, or
    the base quantized as the run did where it saved none) or from the original base (``"base"``); either way
    the result says how far the original base's lie from the dequantized ones, on the rows sampled.

    The same accounting as :func:`load_weights`, without loading anything: saved frozen weights are
    compared with the base's on a sample of their rows (:func:`sampled_difference`). The base's files are
    read in the model's layout (through its conversion mapping, where transformers has one for it). The
    rank files' records are not read here: stage 5 reads them, and checks their CRC-32s.

    Returns:
        The accounting, with ``sources``: wrapper key -> ``[file, name in that file]``, where the file is the
        consolidated store or the base model's folder (read in the model's layout).
    """
    state = model.state_dict(keep_vars=True)
    resized = _resized_keys(state, rebuilt.resized_vocab)
    saved = Reader(consolidated)
    base = read_base(model, rebuilt)
    sources: dict[str, list[str]] = {}
    mismatched: list[tuple[str, float]] = []
    frozen = [key for key in saved.keys() if key in info.layout.frozen]
    quantized = DequantizedWeights(consolidated) if info.layout.quantized else None
    with Progress("load: frozen vs base", sum(saved.nbytes(key) for key in frozen), len(frozen)) as progress:
        for key in saved.keys():
            if quantized is not None and key not in state and is_quant_state(key):
                continue  # what dequantizes a 4-bit weight, not a param
            in_4bit = quantized is not None and key in quantized
            _place(state, key, quantized.shape(key) if in_4bit else saved.shape(key))
            sources[key] = [f"{consolidated}{DEQUANTIZED}" if in_4bit else str(consolidated), key]
            if key in info.layout.frozen:
                where = _in_base(key, rebuilt, base)
                if where is None:
                    names = " or ".join(rebuilt.base_keys.get(key, [key]))
                    raise BaseModelError(
                        f"the base model's weight files, read as transformers loads them into "
                        f"{rebuilt.model_class}, give no {names} (saved in the checkpoint as {key}): "
                        "--base-model is another architecture than the run trained, or its files are in a "
                        "layout transformers does not map to this class"
                    )
                if in_4bit:
                    diff = sampled_4bit_difference(quantized, key, info.layout.quantized[key], base, where[1])
                else:
                    diff = sampled_difference(saved, key, base, where[1], resized.get(key))
                if diff is not None:
                    mismatched.append((key, diff))
                progress.update(saved.nbytes(key), tensor_done=True)
    if mismatched and not ignore_base_mismatch:  # a damaged copy of the checkpoint is not the base's fault
        worst = max(mismatched, key=lambda m: m[1])[0]
        records = RecordCheck(sorted({file for file, _, _ in saved.ranges(worst)}))
        for _ in Reader(consolidated, observe=records.feed).chunks(worst):
            pass
        records.finish()
    accounting, from_base = _account(
        state, list(sources), info, rebuilt.resized_vocab, mismatched, ignore_base_mismatch
    )
    for key in from_base:
        if key in resized and ".original_module." in key:
            continue  # a frozen copy only the unmerged forward reads: not written
        where = _in_base(key, rebuilt, base)
        if where is None:  # the model needs it, the checkpoint did not save it: only the base can give it
            raise BaseModelError(
                f"the base model's weight files, read as transformers loads them into {rebuilt.model_class}, give "
                f"no {' or '.join(rebuilt.base_keys.get(key, [key]))}, and the checkpoint did not save it: the base "
                "is damaged, or another architecture than the run trained"
            )
        sources[key] = where
        settings = info.layout.quantized.get(key)
        if settings is not None:  # trained in 4-bit, no 4-bit data saved: the base quantized as the run did
            diff = sampled_4bit_scales(saved, key, settings, base, where[1])
            if diff is not None and not ignore_base_mismatch:
                raise BaseModelError(
                    f"the base's {where[1]}, quantized in 4-bit with the run's settings "
                    f"({settings['quant_type']}, block size {settings['blocksize']}), does not give the scales the "
                    f"checkpoint saved (max abs diff {diff:.3g}): --base-model is not the base this QLoRA run loaded"
                )
    if info.layout.quantized:
        accounting.qlora = _qlora_sources(sources, info, rebuilt, base, merge_into)
    accounting.sources = sources
    return accounting


def _qlora_sources(
    sources: dict[str, list[str]], info: CheckpointInfo, rebuilt: RebuildResult, base: BaseWeights, merge_into: str
) -> dict:
    """Point a QLoRA run's 4-bit weights at the original base's for ``merge_into="base"``; and measure how far
    the original base's weights lie from the dequantized ones, on the rows :func:`sampled_rows` picks."""
    worst_abs = worst_rel = 0.0
    for key, settings in info.layout.quantized.items():
        name = _in_base(key, rebuilt, base)[1]
        if merge_into == "base":
            sources[key] = [f"{base.folder}{ORIGINAL}", name]
        dtype = settings_dtype(settings)
        rows = settings["shape"][0]
        for row in sampled_rows(rows, settings["shape"][-1] * dtype.itemsize):
            original = base.stored(name, slice(row, row + 1)).to(dtype).float()
            diff = (round_trip(original, settings) - original).abs().max().item()
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(original.abs().max().item(), torch.finfo(torch.float32).tiny))
    settings = "; ".join(sorted({quant_kind(q) for q in info.layout.quantized.values()}))
    return {"merged_into": merge_into, "settings": settings, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def _place(state: dict, key: str, shape: list[int]) -> torch.Tensor:
    """The wrapper's tensor for a checkpoint key, which must exist and have the same shape."""
    target = state.get(key)
    if target is None:
        raise CheckpointError(
            f"checkpoint param {key} has no place in the rebuilt model; is --base-model the "
            "architecture the run trained?"
        )
    if list(target.shape) != shape:
        raise BaseModelError(
            f"{key} is {shape} in the checkpoint but {list(target.shape)} in the base model; "
            "--base-model is not the model this run trained"
        )
    return target


def _in_base(key: str, rebuilt: RebuildResult, base: BaseWeights) -> list[str] | None:
    """``[base folder, name]`` of a wrapper key among the base's weights (a tied weight is saved under one
    name)."""
    for name in rebuilt.base_keys.get(key, []):
        if name in base:
            return [base.folder, name]
    return None


def _account(
    state: dict,
    keys: list[str],
    info: CheckpointInfo,
    resized_vocab: ResizedVocab | None,
    mismatched: list[tuple[str, float]],
    ignore_base_mismatch: bool,
) -> tuple[LoadResult, list[str]]:
    """The checks both load variants end with; returns their accounting and the keys left to the base."""
    frozen = info.layout.frozen
    if mismatched and not ignore_base_mismatch:
        name, diff = max(mismatched, key=lambda m: m[1])
        raise BaseModelError(
            f"{len(mismatched)} of {len(frozen)} frozen weights saved in the checkpoint differ from the base model's "
            f"(largest: {name}, max abs diff {diff:.3g}): {info.base_model} is not the base this run trained "
            "(or another revision); pass the right --base-model, or --ignore-base-mismatch to use the checkpoint's"
        )
    # Tied weights are one object under several names: a key is accounted for when its object was loaded.
    loaded = {id(state[key]) for key in keys}
    from_base = sorted(k for k in state if id(state[k]) not in loaded and k not in info.layout.shared)
    if from_base and info.layout.frozen_source is not None:
        raise BaseModelError(
            f"the base model has {len(from_base)} params the checkpoint saved no value for, e.g. "
            f"{from_base[0]}; --base-model is not the architecture this run trained"
        )
    # Rows added to the vocabulary for training have no value in the base: the checkpoint must hold them
    # (a frozen copy only PEFT's unmerged forward would read, ``original_module``, may go without).
    resized = _resized_keys(state, resized_vocab)
    unsaved = [k for k in from_base if k in resized and ".original_module." not in k]
    if unsaved:
        raise CheckpointError(
            f"the vocabulary was grown from {resized_vocab.base_rows} to {resized_vocab.rows} tokens before training, "
            f"but the checkpoint holds no values for the new rows of {unsaved[0]} (frozen params were not saved and "
            "the embeddings are not in modules_to_save): the trained model cannot be reproduced"
        )
    return LoadResult(
        from_checkpoint=len(keys),
        from_base=len(from_base),
        frozen_checked=len([k for k in keys if k in frozen]),
        frozen_mismatched=[name for name, _ in mismatched],
    ), from_base


def _resized_keys(state: dict, resized_vocab: ResizedVocab | None) -> dict[str, int]:
    """Keys of the resized embedding modules, each with the number of rows the base really had."""
    if not resized_vocab:
        return {}
    prefixes = tuple(f"{names.PEFT_PREFIX}{module}." for module in resized_vocab.modules)
    return {
        k: resized_vocab.base_rows
        for k, t in state.items()
        if k.startswith(prefixes) and t.dim() > 0 and t.shape[0] == resized_vocab.rows
    }

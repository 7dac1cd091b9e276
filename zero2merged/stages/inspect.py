"""Stage 1, inspect: what the checkpoint holds, which LoRA config and which base model go with it.

Reads only metadata (the rank files are memory-mapped, no weight is touched), so it is fast on any size and
catches most bad input before the heavy work starts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from zero2merged.checkpoint.adapter_file import adapter_layout
from zero2merged.checkpoint.adapter_keys import AdapterKeys, describe, infer_lora_config, read_adapter_keys
from zero2merged.checkpoint.layout import read_layout
from zero2merged.checkpoint.location import Location, resolve_tag
from zero2merged.checkpoint.naming import choose
from zero2merged.checkpoint.quantized import quant_kind
from zero2merged.core import names
from zero2merged.core.environment import require_supported
from zero2merged.core.errors import AdapterConfigError, BaseModelError, CheckpointError, Zero2MergedError, first_line
from zero2merged.core.options import Source
from zero2merged.core.results import CheckpointInfo, ZeroLayout
from zero2merged.files.pickles import pickle_policy
from zero2merged.model.adapter_names import saved_adapter_names
from zero2merged.model.base import base_config, checkpoint_vocab, choose_base, embedding_modules, is_vision_language
from zero2merged.model.layouts import describe as describe_layout
from zero2merged.model.serving import notes as serving_notes
from zero2merged.model.serving import serving_files
from zero2merged.running.manifest import files_stat
from zero2merged.running.runner import Stage

INFERRED = "inferred from the checkpoint's keys"  # adapter_config_path when no config was saved


def adapter_config_candidates(checkpoint: Path, given: Path | None, adapter: str | None = None) -> list[Path]:
    """Where the LoRA config is looked for, in order: ``--adapter-config`` (a file or the folder holding one),
    else the checkpoint folder and its parent; for an adapter not named ``default``, first the folder of its
    name in each (where ``PeftModel.save_pretrained`` puts it)."""
    if given is not None:
        return [given / names.ADAPTER_CONFIG if given.is_dir() else given]
    found = []
    for folder in (checkpoint, checkpoint.parent):
        if adapter and adapter != "default":
            found.append(folder / adapter / names.ADAPTER_CONFIG)
        found.append(folder / names.ADAPTER_CONFIG)
    return found


def find_adapter_config(checkpoint: Path, given: Path | None, adapter: str | None = None) -> Path:
    """The first of :func:`adapter_config_candidates` that exists.

    Raises:
        AdapterConfigError: none does.
    """
    candidates = adapter_config_candidates(checkpoint, given, adapter)
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        return found
    if given is not None:
        raise AdapterConfigError(f"adapter config {candidates[0]} does not exist")
    named = f" (or their {adapter}/ folders)" if adapter and adapter != "default" else ""
    raise AdapterConfigError(
        f"no {names.ADAPTER_CONFIG} in {checkpoint} or its parent{named}; pass --adapter-config "
        "with the LoRA config the run was trained with, or --lora-alpha (and --base-model) to "
        "infer the rest from the checkpoint"
    )


def _read_lora_config(path: Path) -> dict:
    """A saved LoRA config, with what the merge depends on present: PEFT would take a default for a key
    that is missing (``lora_alpha`` 8, say), a model other than the one trained, with no word said."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8
        raise AdapterConfigError(f"cannot read the adapter config {path}: {first_line(e)}") from e
    if not isinstance(config, dict):
        raise AdapterConfigError(f"the adapter config {path} is not a JSON object: the file is damaged")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterConfigError(f"{path} describes a {peft_type} adapter; zero2merged merges LoRA adapters only")
    missing = [key for key in ("r", "lora_alpha") if key not in config]
    if "target_modules" not in config and not config.get("target_parameters"):
        missing.append("target_modules")
    if missing:
        raise AdapterConfigError(
            f"the adapter config {path} lacks {', '.join(missing)}, which PEFT's save_pretrained always writes and "
            "the merge depends on: the file is damaged or was edited; pass the run's own with --adapter-config"
        )
    r, alpha = config["r"], config["lora_alpha"]
    if not (type(r) is int and r > 0) or not (isinstance(alpha, int | float) and not isinstance(alpha, bool)):
        raise AdapterConfigError(
            f"the adapter config {path} sets r={r!r}, lora_alpha={alpha!r}: r must be a positive integer and "
            "lora_alpha a number; the file is damaged or was edited"
        )
    if not math.isfinite(alpha):
        raise AdapterConfigError(f"the adapter config {path} sets lora_alpha={alpha}: the file is damaged")
    return config


def _adapter_name(keys: AdapterKeys, layout: ZeroLayout, tag_dir: Path) -> str:
    """The adapter converted (:func:`~zero2merged.checkpoint.naming.choose` picked it among several)."""
    if not keys.ranks:
        raise CheckpointError(
            f"{tag_dir}: no LoRA weights among the trained params "
            f"({', '.join(list(layout.trainable_shapes)[:3])}, ...); is this a LoRA run?"
        )
    return layout.adapter or next(iter(keys.adapters))


def _lora_config(folder: Path, source: Source, keys: AdapterKeys, adapter: str) -> tuple[str, dict, list[str]]:
    """(where from, config, what was inferred): the saved config, else one inferred from the keys."""
    try:
        path = find_adapter_config(folder, source.adapter_config, adapter)
    except AdapterConfigError:
        if source.adapter_config or source.lora_alpha is None:
            raise
        config, inferred = infer_lora_config(keys, lora_alpha=source.lora_alpha, use_rslora=source.use_rslora)
        return INFERRED, config, inferred
    return str(path), _read_lora_config(path), []


def _base_features(base: str, lora: dict, layout: ZeroLayout, keys: AdapterKeys) -> tuple[list[str], list[str]]:
    """Vocabulary and tied-embedding facts, from the base's module tree on the meta device (no weights).

    Returns (features, warnings); a base that cannot be read is a warning here (convert will stop on it).
    """
    try:
        config = base_config(base)
        auto_name, model = choose_base(lora, config, list(layout.trainable_shapes))
    except Zero2MergedError as e:
        return [], [f"base model not examined: {e}"]
    except Exception as e:  # noqa: BLE001 - a model class that cannot be built on the meta device
        return [], [f"base model not examined: {type(e).__name__}: {e}"]
    features = []
    if is_vision_language(model):
        features.append(f"vision-language model ({type(model).__name__}), built with {auto_name}")
    conversions = describe_layout(model)
    if conversions:
        features.append(
            f"saved in a layout other than its modules' ({type(model).__name__}, transformers' weight "
            f"conversion mapping): {'; '.join(conversions)}"
        )
    shapes = {**layout.trainable_shapes, **layout.frozen}
    modules = embedding_modules(model)
    base_rows = model.get_input_embeddings().weight.shape[0]
    rows = set().union(*(checkpoint_vocab(shapes, m) for m in modules)) - {base_rows}
    if rows:
        features.append(
            f"vocabulary resized before training: {base_rows} -> {', '.join(map(str, sorted(rows)))} tokens"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is model.get_input_embeddings().weight:
        untied = [m for m in keys.modules_to_save if m in modules]
        features.append(
            "tied input/output embeddings"
            + (f", untied by training {', '.join(untied)} in full: saved untied" if untied else ": saved tied")
        )
    return features, []


# Accelerate's save_state names the engine checkpoint of its first prepared model ``pytorch_model`` and of
# the next ones ``pytorch_model_1``, ...; DeepSpeed points ``latest`` at each in turn, so at the last.
ACCELERATE_TAG = re.compile(r"pytorch_model(_\d+)?")


def _warnings(layout: ZeroLayout, where: Location) -> list[str]:
    folder, notes = where.folder, []
    if where.gathered:
        return [
            f"a PEFT adapter folder saved gathered (no ZeRO files): the trained weights are the run's "
            f"{layout.dtype} copies in {layout.model_files[0]}, not its fp32 masters; the base's weights come "
            "from the base"
        ]
    models = [tag for tag in where.tags if ACCELERATE_TAG.fullmatch(tag)]
    if len(models) > 1:
        notes.append(
            f"Accelerate saved {len(models)} models here ({', '.join(models)}): {where.tag} is converted; "
            "--tag names another (the first prepared model is pytorch_model)"
        )
    if (folder / "adapter_model.safetensors").is_file():
        notes.append(
            "the checkpoint's adapter_model.safetensors holds the Trainer's 16-bit copies of the adapter "
            "(empty under ZeRO-3 unless gathered): the fp32 masters are used instead, and "
            "'zero2merged export-adapter' writes them as a PEFT adapter"
        )
    if layout.frozen_source is None:
        notes.append("frozen params were not saved (exclude_frozen_parameters): they are taken from the base model")
    elif layout.frozen_source == "module":
        notes.append(
            f"ZeRO-{layout.zero_stage} keeps frozen params only in the module state dict (which "
            "zero_to_fp32 drops): read from there and checked against the base model"
        )
    return notes


def inspect_checkpoint(checkpoint: Path | str | Source, **source: Any) -> CheckpointInfo:
    """Stage 1: read a ZeRO checkpoint's metadata and find its LoRA config and base model.

    Args:
        checkpoint: The folder holding ``latest``, a tag folder, or a run folder of checkpoints (or a whole
            :class:`~zero2merged.core.options.Source`).
        **source: The rest of :class:`~zero2merged.core.options.Source`: ``tag``, ``adapter_config``,
            ``base_model``, ``lora_alpha``, ``use_rslora``, ``unsafe_pickle``.

    Raises:
        CheckpointError, AdapterConfigError, BaseModelError: what is missing or wrong, and where.
        OptionError: an option's value is not accepted.
    """
    run = checkpoint if isinstance(checkpoint, Source) else Source(checkpoint, **source)
    require_supported()
    with pickle_policy(run.unsafe_pickle):
        return inspect(run, resolve_tag(run.checkpoint, run.tag))


def inspect(source: Source, where: Location) -> CheckpointInfo:
    """:func:`inspect_checkpoint` of the tag ``where`` names."""
    folder, tag = where.folder, where.tag
    if where.gathered:  # a PEFT adapter folder: its config says what its keys are
        path = find_adapter_config(folder, source.adapter_config)
        adapter_path, lora, inferred, adapter_name = str(path), _read_lora_config(path), [], "default"
        base = _base_model(source, adapter_path, lora)
        layout = adapter_layout(folder, saved_adapter_names(lora, base, adapter_name))
        keys = read_adapter_keys(layout.trainable_shapes)
    else:
        layout = read_layout(folder / tag)
        layout = choose(layout, folder / tag, peft_model=source.peft_model, adapter=source.adapter_name)
        keys = read_adapter_keys(layout.trainable_shapes)
        adapter_name = _adapter_name(keys, layout, folder / tag)
        adapter_path, lora, inferred = _lora_config(folder, source, keys, adapter_name)
        base = _base_model(source, adapter_path, lora)
    base_traits, base_warnings = _base_features(base, lora, layout, keys)
    return CheckpointInfo(
        checkpoint=str(folder),
        tag=tag,
        tags=where.tags,
        checkpoints=where.checkpoints,
        layout=layout,
        adapter_config_path=adapter_path,
        lora_config=lora,
        adapter_name=adapter_name,
        base_model=base,
        features=describe(lora, keys) + base_traits + _quantization(layout),
        inferred=inferred,
        warnings=_naming(layout)
        + _warnings(layout, where)
        + base_warnings
        + _unused_options(source, adapter_path, lora)
        + serving_notes(folder, base),
    )


def _base_model(source: Source, adapter_path: str, lora: dict) -> str:
    """The base: ``--base-model``, else the one the adapter config names (resolved where it is a folder)."""
    base = source.base_model or lora.get("base_model_name_or_path")
    if not base:
        raise BaseModelError(f"{adapter_path} names no base model (base_model_name_or_path); pass --base-model")
    if source.base_model is None and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise BaseModelError(
            f"the base model recorded in {adapter_path} ({base}) does not exist here; "
            "pass --base-model with its current location"
        )
    return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base


def _naming(layout: ZeroLayout) -> list[str]:
    """Where the PEFT model sat in the saved names, which adapter is converted, and what is left out."""
    found = []
    if layout.prefix:
        found.append(
            f"the PEFT model sits under '{layout.prefix.removesuffix('.')}' in the saved names (the script's module "
            "holds it): the prefix is stripped"
        )
    if layout.adapter and layout.adapter != "default":
        found.append(f"the adapter merged is '{layout.adapter}'")
    if layout.outside:
        found.append(
            f"left out, not part of the PEFT model or its adapter: {len(layout.outside)} saved tensors "
            f"({', '.join(layout.outside[:3])}{', ...' if len(layout.outside) > 3 else ''})"
        )
    return found


def _quantization(layout: ZeroLayout) -> list[str]:
    """A QLoRA run's 4-bit base, as ``inspect`` shows it."""
    if not layout.quantized:
        return []
    kinds = sorted({quant_kind(q) for q in layout.quantized.values()})
    first = next(iter(layout.quantized))
    return [f"QLoRA: {len(layout.quantized)} base weights saved in 4-bit ({'; '.join(kinds)}), e.g. {first}"]


def refuse_quantized(info: CheckpointInfo, *, streaming: bool) -> None:
    """Stop, in one line, on a QLoRA run on the in-memory path: its saved base weights are packed 4-bit
    bytes, which no merge may take for weights; streaming merges into them dequantized
    (:mod:`zero2merged.checkpoint.quantized`).

    Raises:
        CheckpointError: the run trained its LoRA on a 4-bit base, and this is the in-memory path.
    """
    quantized = info.layout.quantized
    if not quantized:
        return
    found = (
        f"{info.checkpoint} is a QLoRA run: its base was trained in 4-bit "
        f"({'; '.join(sorted({quant_kind(q) for q in quantized.values()}))}; {len(quantized)} weights)"
    )
    if not streaming:
        raise CheckpointError(f"{found}: it is merged streaming only (without --in-memory)")


def _unused_options(source: Source, adapter_path: str, lora: dict) -> list[str]:
    """--lora-alpha (and --use-rslora) infer a config only when the run saved none: said when one was found."""
    if source.lora_alpha is None or adapter_path == INFERRED:
        return []
    saved = lora.get("lora_alpha")
    return [f"--lora-alpha not used: the run saved its LoRA config ({adapter_path}, lora_alpha={saved})"]


class Inspect(Stage[CheckpointInfo]):
    """Stage 1 in a conversion: cheap, but keyed on the files it reads, so that a new save under the tag or
    a changed adapter config redoes every stage after it.

    Args:
        source: The run and its options.
        where: The tag to convert (:func:`resolve_tag`).
    """

    name = "inspect"
    result_type = CheckpointInfo

    def __init__(self, source: Source, where: Location):
        self.source, self.where = source, where

    def inputs(self) -> dict:
        tag_dir = self.where.folder / self.where.tag
        return {
            "checkpoint": str(self.where.folder),
            "tag": self.where.tag,
            # the rank files by name, size and mtime: the later stages read them too
            "files": files_stat([p for p in tag_dir.iterdir() if p.is_file()]),
            "options": {
                **self.source.inference,
                "peft_model": self.source.peft_model,
                "adapter": self.source.adapter_name,
            },
            "adapter_config": files_stat(
                [
                    *(
                        p
                        for p in adapter_config_candidates(self.where.folder, self.source.adapter_config)
                        if p.is_file()
                    ),
                    *self.where.folder.glob(f"*/{names.ADAPTER_CONFIG}"),  # a named adapter's
                    *self.where.folder.parent.glob(f"*/{names.ADAPTER_CONFIG}"),
                ]
            ),
            "serving": files_stat(serving_files(self.where.folder)),
        }

    def run(self) -> CheckpointInfo:
        return inspect(self.source, self.where)

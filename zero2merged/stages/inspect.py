"""Stage 1, inspect: what the checkpoint holds, which LoRA config and which base model go with it.

Reads only metadata (the rank files are memory-mapped, no weight is touched), so it is fast on any size and
catches most bad input before the heavy work starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from zero2merged import names
from zero2merged.adapter_keys import (
    AdapterKeys,
    describe,
    infer_lora_config,
    read_adapter_keys,
)
from zero2merged.errors import (
    AdapterConfigError,
    BaseModelError,
    CheckpointError,
    Zero2MergedError,
)
from zero2merged.zero import ZeroLayout, read_layout

INFERRED = "inferred from the checkpoint's keys"  # adapter_config_path when no config was saved


@dataclass
class CheckpointInfo:
    """Everything stage 1 found; saved as ``inspect.json`` and read by the later stages.

    Attributes:
        checkpoint: The folder holding ``latest`` and the tag folders.
        tag: The tag converted (``global_stepN``).
        tags: Every tag folder found, oldest first.
        checkpoints: When a run folder was given, its checkpoint folders (the newest is converted unless
            ``--tag`` names another).
        layout: The ZeRO metadata of the tag (stage, world size, dtype, param tables).
        adapter_config_path: Where the LoRA config came from (or ``INFERRED``).
        lora_config: The LoRA config, as PEFT saves it.
        adapter_name: PEFT's adapter name in the param keys (``default`` unless training chose another).
        base_model: Path or hub id of the base model.
        features: What kind of checkpoint this is, beyond the plain case (DoRA, tied embeddings, ...).
        inferred: When no LoRA config was saved: what was inferred from the keys, and from where.
        warnings: Things the user should know; none of them stops the conversion.
    """

    checkpoint: str
    tag: str
    tags: list[str]
    checkpoints: list[str]
    layout: ZeroLayout
    adapter_config_path: str
    lora_config: dict
    adapter_name: str
    base_model: str
    features: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tag_dir(self) -> Path:
        return Path(self.checkpoint) / self.tag

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointInfo:
        data = json.loads(text)
        data["layout"] = ZeroLayout(**data["layout"])
        return cls(**data)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _tags(checkpoint: Path) -> list[str]:
    found = [p.name for p in checkpoint.iterdir() if p.is_dir() and any(p.glob(names.MODEL_STATES_GLOB))]
    return sorted(found, key=_natural)


@dataclass(frozen=True)
class Location:
    """Where the tag to convert is.

    Attributes:
        folder: The checkpoint folder (holding ``latest`` and the tag folders).
        tag: The tag folder's name.
        tags: Every tag in ``folder``, oldest first.
        checkpoints: When a run folder was given: its checkpoint folders, oldest first.
    """

    folder: Path
    tag: str
    tags: list[str]
    checkpoints: list[str] = field(default_factory=list)


def _is_checkpoint(folder: Path) -> bool:
    return (folder / names.LATEST).is_file() or bool(_tags(folder))


def resolve_tag(checkpoint: Path, tag: str | None) -> Location:
    """Find the checkpoint folder, the tag to convert and every tag present.

    ``checkpoint`` may be the folder holding ``latest``, a tag folder itself, or a run folder holding
    several checkpoint folders (the Trainer's ``checkpoint-N``): then the newest is taken, or the one
    ``tag`` names (a checkpoint folder or a tag inside one).

    Raises:
        CheckpointError: no checkpoint there, or the tag is missing or unsafe.
    """
    checkpoint = checkpoint.expanduser().resolve()
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a directory; pass the folder holding '{names.LATEST}'")
    if tag is None and not (checkpoint / names.LATEST).exists() and any(checkpoint.glob(names.MODEL_STATES_GLOB)):
        return Location(checkpoint.parent, checkpoint.name, _tags(checkpoint.parent))
    if not _is_checkpoint(checkpoint):
        found = sorted((p.name for p in checkpoint.iterdir() if p.is_dir() and _is_checkpoint(p)), key=_natural)
        if not found:
            raise CheckpointError(f"{checkpoint} is not a DeepSpeed checkpoint: no '{names.LATEST}' file, no tag "
                                  f"folder with {names.MODEL_STATES_GLOB} and no checkpoint folder inside")
        chosen = found[-1]
        if tag in found:
            chosen, tag = tag, None
        elif tag is not None:
            holding = [name for name in found if (checkpoint / name / tag).is_dir()]
            if not holding:
                raise CheckpointError(f"no checkpoint in {checkpoint} has a tag {tag!r} (checkpoints: {', '.join(found)})")
            chosen = holding[-1]
        return dataclasses.replace(resolve_tag(checkpoint / chosen, tag), checkpoints=found)

    tags = _tags(checkpoint)
    if tag is None:
        latest = checkpoint / names.LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
        elif len(tags) == 1:
            tag = tags[0]
        else:
            raise CheckpointError(f"{checkpoint} has no '{names.LATEST}' file and several tags ({', '.join(tags)}); "
                                  "choose one with --tag")
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise CheckpointError(f"tag {tag!r} is not a folder name inside {checkpoint}; refusing to leave it")
    if not (checkpoint / tag).is_dir():
        known = ", ".join(tags) or "none"
        raise CheckpointError(f"tag {tag!r} has no folder in {checkpoint} (tags found: {known})")
    return Location(checkpoint, tag, tags)


def find_adapter_config(checkpoint: Path, given: Path | None) -> Path:
    """``--adapter-config`` (a file or the folder holding one), else the checkpoint folder or its parent."""
    if given is not None:
        path = given / names.ADAPTER_CONFIG if given.is_dir() else given
        if not path.is_file():
            raise AdapterConfigError(f"adapter config {path} does not exist")
        return path
    for folder in (checkpoint, checkpoint.parent):
        if (folder / names.ADAPTER_CONFIG).is_file():
            return folder / names.ADAPTER_CONFIG
    raise AdapterConfigError(f"no {names.ADAPTER_CONFIG} in {checkpoint} or its parent; pass --adapter-config "
                             "with the LoRA config the run was trained with, or --lora-alpha (and --base-model) to "
                             "infer the rest from the checkpoint")


def _read_lora_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterConfigError(f"cannot read the adapter config {path}: {e}") from e
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterConfigError(f"{path} describes a {peft_type} adapter; zero2merged merges LoRA adapters only")
    return config


def _adapter_name(keys: AdapterKeys, layout: ZeroLayout, tag_dir: Path) -> str:
    found = set(keys.adapters)
    if not keys.ranks:
        raise CheckpointError(f"{tag_dir}: no LoRA weights among the trained params "
                              f"({', '.join(list(layout.trainable_shapes)[:3])}, ...); is this a LoRA run?")
    if len(found) > 1:
        raise CheckpointError(f"{tag_dir}: several adapters were trained ({', '.join(sorted(found))}); "
                              "zero2merged merges one adapter per conversion")
    return found.pop()


def _lora_config(folder: Path, given, keys: AdapterKeys, lora_alpha, use_rslora) -> tuple[str, dict, list[str]]:
    """(where from, config, what was inferred): the saved config, else one inferred from the keys."""
    try:
        path = find_adapter_config(folder, Path(given).expanduser() if given else None)
    except AdapterConfigError:
        if given or lora_alpha is None:
            raise
        config, inferred = infer_lora_config(keys, lora_alpha=lora_alpha, use_rslora=use_rslora)
        return INFERRED, config, inferred
    return str(path), _read_lora_config(path), []


def _base_features(base: str, lora: dict, layout: ZeroLayout, keys: AdapterKeys) -> tuple[list[str], list[str]]:
    """Vocabulary and tied-embedding facts, from the base's module tree on the meta device (no weights).

    Returns (features, warnings); a base that cannot be read is a warning here (convert will stop on it).
    """
    from zero2merged.basemodel import (
        auto_class_name,
        base_config,
        checkpoint_vocab,
        embedding_modules,
        meta_model,
    )

    try:
        config = base_config(base)
        model = meta_model(auto_class_name(lora, config), config)
    except Zero2MergedError as e:
        return [], [f"base model not examined: {e}"]
    except Exception as e:  # noqa: BLE001 - a model class that cannot be built on the meta device
        return [], [f"base model not examined: {type(e).__name__}: {e}"]
    features = []
    shapes = {**layout.trainable_shapes, **layout.frozen}
    modules = embedding_modules(model)
    base_rows = model.get_input_embeddings().weight.shape[0]
    rows = set().union(*(checkpoint_vocab(shapes, m) for m in modules)) - {base_rows}
    if rows:
        features.append(f"vocabulary resized before training: {base_rows} -> {', '.join(map(str, sorted(rows)))} tokens")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is model.get_input_embeddings().weight:
        untied = [m for m in keys.modules_to_save if m in modules]
        features.append("tied input/output embeddings" + (f", untied by training {', '.join(untied)} in full: "
                                                          "saved untied" if untied else ": saved tied"))
    return features, []


def _warnings(layout: ZeroLayout, folder: Path) -> list[str]:
    notes = []
    if (folder / "adapter_model.safetensors").is_file():
        notes.append("the checkpoint's adapter_model.safetensors holds the Trainer's 16-bit copies of the adapter "
                     "(empty under ZeRO-3 unless gathered): the fp32 masters are used instead, and "
                     "'zero2merged export-adapter' writes them as a PEFT adapter")
    if layout.frozen_source is None:
        notes.append("frozen params were not saved (exclude_frozen_parameters): they are taken from the base model")
    elif layout.frozen_source == "module":
        notes.append(f"ZeRO-{layout.zero_stage} keeps frozen params only in the module state dict (which "
                     "zero_to_fp32 drops): read from there and checked against the base model")
    return notes


def inspect_checkpoint(
    checkpoint: Path | str,
    *,
    tag: str | None = None,
    adapter_config: Path | str | None = None,
    base_model: str | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> CheckpointInfo:
    """Stage 1: read a ZeRO checkpoint's metadata and find its LoRA config and base model.

    Args:
        checkpoint: The folder holding ``latest``, a tag folder, or a run folder of checkpoints.
        tag: Tag (or checkpoint folder) to convert instead of the newest.
        adapter_config: ``adapter_config.json`` (or its folder) when the checkpoint has none.
        base_model: Base model path or hub id; defaults to the adapter config's ``base_model_name_or_path``.
        lora_alpha: With no adapter config anywhere: infer one from the checkpoint's keys, with this alpha.
        use_rslora: With ``lora_alpha``: the run used rsLoRA scaling.

    Raises:
        CheckpointError, AdapterConfigError, BaseModelError: what is missing or wrong, and where.
    """
    where = resolve_tag(Path(checkpoint), tag)
    folder, tag = where.folder, where.tag
    layout = read_layout(folder / tag)
    keys = read_adapter_keys(layout.trainable_shapes)
    adapter_name = _adapter_name(keys, layout, folder / tag)
    adapter_path, lora, inferred = _lora_config(folder, adapter_config, keys, lora_alpha, use_rslora)
    base = base_model or lora.get("base_model_name_or_path")
    if not base:
        raise BaseModelError(f"{adapter_path} names no base model (base_model_name_or_path); pass --base-model")
    if base_model is None and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise BaseModelError(f"the base model recorded in {adapter_path} ({base}) does not exist here; "
                             "pass --base-model with its current location")
    base = str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base
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
        features=describe(lora, keys) + base_traits,
        inferred=inferred,
        warnings=_warnings(layout, folder) + base_warnings,
    )

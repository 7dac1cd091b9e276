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
from zero2merged.errors import AdapterConfigError, BaseModelError, CheckpointError
from zero2merged.zero import ZeroLayout, read_layout

_ADAPTER_KEY = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)\.([^.]+)\.weight$")


@dataclass
class CheckpointInfo:
    """Everything stage 1 found; saved as ``inspect.json`` and read by the later stages.

    Attributes:
        checkpoint: The folder holding ``latest`` and the tag folders.
        tag: The tag converted (``global_stepN``).
        tags: Every tag folder found, oldest first.
        layout: The ZeRO metadata of the tag (stage, world size, dtype, param tables).
        adapter_config_path: Where the LoRA config came from.
        lora_config: The LoRA config, as PEFT saves it.
        adapter_name: PEFT's adapter name in the param keys (``default`` unless training chose another).
        base_model: Path or hub id of the base model.
        warnings: Things the user should know; none of them stops the conversion.
    """

    checkpoint: str
    tag: str
    tags: list[str]
    layout: ZeroLayout
    adapter_config_path: str
    lora_config: dict
    adapter_name: str
    base_model: str
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


def resolve_tag(checkpoint: Path, tag: str | None) -> tuple[Path, str, list[str]]:
    """Find the checkpoint folder, the tag to convert and every tag present.

    ``checkpoint`` may be the folder holding ``latest`` or a tag folder itself.

    Raises:
        CheckpointError: no checkpoint there, or the tag is missing or unsafe.
    """
    checkpoint = checkpoint.expanduser().resolve()
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a directory; pass the folder holding '{names.LATEST}'")
    if tag is None and not (checkpoint / names.LATEST).exists() and any(checkpoint.glob(names.MODEL_STATES_GLOB)):
        return checkpoint.parent, checkpoint.name, _tags(checkpoint.parent)

    tags = _tags(checkpoint)
    if tag is None:
        latest = checkpoint / names.LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
        elif len(tags) == 1:
            tag = tags[0]
        elif tags:
            raise CheckpointError(f"{checkpoint} has no '{names.LATEST}' file and several tags ({', '.join(tags)}); "
                                  "choose one with --tag")
        else:
            hint = [p.name for p in sorted(checkpoint.iterdir()) if (p / names.LATEST).is_file()]
            did_you_mean = f"; did you mean {checkpoint / hint[-1]}?" if hint else ""
            raise CheckpointError(f"{checkpoint} is not a DeepSpeed checkpoint: no '{names.LATEST}' file and no "
                                  f"tag folder with {names.MODEL_STATES_GLOB}{did_you_mean}")
    if not tag or Path(tag).name != tag or tag in (".", ".."):
        raise CheckpointError(f"tag {tag!r} is not a folder name inside {checkpoint}; refusing to leave it")
    if not (checkpoint / tag).is_dir():
        known = ", ".join(tags) or "none"
        raise CheckpointError(f"tag {tag!r} has no folder in {checkpoint} (tags found: {known})")
    return checkpoint, tag, tags


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
                             "with the LoRA config the run was trained with")


def _read_lora_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterConfigError(f"cannot read the adapter config {path}: {e}") from e
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterConfigError(f"{path} describes a {peft_type} adapter; zero2merged merges LoRA adapters only")
    return config


def _adapter_name(layout: ZeroLayout, tag_dir: Path) -> str:
    found = {m.group(1) for name in layout.trainable_shapes if (m := _ADAPTER_KEY.search(name))}
    if not found:
        raise CheckpointError(f"{tag_dir}: no LoRA weights among the trained params "
                              f"({', '.join(list(layout.trainable_shapes)[:3])}, ...); is this a LoRA run?")
    if len(found) > 1:
        raise CheckpointError(f"{tag_dir}: several adapters were trained ({', '.join(sorted(found))}); "
                              "zero2merged merges one adapter per conversion")
    return found.pop()


def _warnings(layout: ZeroLayout) -> list[str]:
    notes = []
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
) -> CheckpointInfo:
    """Stage 1: read a ZeRO checkpoint's metadata and find its LoRA config and base model.

    Args:
        checkpoint: The folder holding ``latest`` (or a tag folder).
        tag: Tag to convert instead of the one ``latest`` names.
        adapter_config: ``adapter_config.json`` (or its folder) when the checkpoint has none.
        base_model: Base model path or hub id; defaults to the adapter config's ``base_model_name_or_path``.

    Raises:
        CheckpointError, AdapterConfigError, BaseModelError: what is missing or wrong, and where.
    """
    folder, tag, tags = resolve_tag(Path(checkpoint), tag)
    layout = read_layout(folder / tag)
    adapter_path = find_adapter_config(folder, Path(adapter_config).expanduser() if adapter_config else None)
    lora = _read_lora_config(adapter_path)
    base = base_model or lora.get("base_model_name_or_path")
    if not base:
        raise BaseModelError(f"{adapter_path} names no base model (base_model_name_or_path); pass --base-model")
    if base_model is None and base.startswith(("/", ".", "~")) and not Path(base).expanduser().exists():
        raise BaseModelError(f"the base model recorded in {adapter_path} ({base}) does not exist here; "
                             "pass --base-model with its current location")
    return CheckpointInfo(
        checkpoint=str(folder),
        tag=tag,
        tags=tags,
        layout=layout,
        adapter_config_path=str(adapter_path),
        lora_config=lora,
        adapter_name=_adapter_name(layout, folder / tag),
        base_model=str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base,
        warnings=_warnings(layout),
    )

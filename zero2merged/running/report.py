"""What a conversion reports, and how ``inspect``'s findings read: rendered from the stages' typed results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from zero2merged.checkpoint.quantized import merged_into
from zero2merged.core.records import StageResult
from zero2merged.core.results import Checked, CheckpointInfo, MergeResult, SaveResult, human_size


@dataclass
class StageReport:
    """One stage of a run: ``ran`` or ``skipped`` (its earlier result still valid), its time and result."""

    name: str
    status: str
    seconds: float
    result: StageResult

    @property
    def metrics(self) -> dict:
        return self.result.metrics()

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": self.seconds, "metrics": self.metrics}


@dataclass
class ConvertReport:
    """What :func:`zero2merged.convert` did. ``stages`` lists all six in order."""

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
        return {
            "checkpoint": self.checkpoint,
            "tag": self.tag,
            "output": self.output,
            "work_dir": self.work_dir,
            "dtype": self.dtype,
            "stages": [s.to_dict() for s in self.stages],
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        lines = [f"{self.checkpoint} [{self.tag}] -> {self.output} ({self.dtype})"]
        for s in self.stages:
            lines.append(f"  {s.name:12} {s.status:8} {s.seconds:8.2f} s  {s.result.headline()}")
        merged: MergeResult = self.stage("merge").result
        saved: SaveResult = self.stage("save").result
        scope = "each LoRA layer" if merged.layers is not None else "model outputs"
        lines.append(
            f"  parity merged vs unmerged ({scope}, fp32): max abs diff {merged.parity.max_abs_diff:.3g}, "
            f"top-1 agreement {merged.parity.top1_agreement:.4f}"
        )
        if saved.parity is not None:
            lines.append(
                f"  parity saved ({self.dtype}) vs fp32 merge: max abs diff {saved.parity.max_abs_diff:.3g}, "
                f"top-1 agreement {saved.parity.top1_agreement:.4f}"
            )
        checked = [s.result.checked for s in self.stages if s.status == "ran" and getattr(s.result, "checked", None)]
        if any(c.records for c in checked):
            lines.append(
                f"  rank files: the CRC-32 of the {sum(c.records for c in checked)} records read matches "
                f"({human_size(sum(c.bytes for c in checked))})"
            )
        if merged.qlora:
            lines.append(f"  {merged_into(merged.qlora)}")
        lines += [f"  special token ids rewritten: {change}" for change in saved.served.changed]
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)


def _targets(lora: dict) -> str:
    targets = lora.get("target_modules")
    if not isinstance(targets, list):
        return str(targets)
    leaves = list(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
    return ", ".join(sorted(leaves)) + (f" ({len(targets)} modules)" if len(leaves) != len(targets) else "")


def format_info(info: CheckpointInfo) -> str:
    """Stage 1's findings as a readable block (``zero2merged inspect``)."""
    layout = info.layout
    trainable = sum(math.prod(s) for s in layout.trainable_shapes.values())
    frozen = sum(math.prod(s) for s in layout.frozen.values())
    lora = info.lora_config
    saved = f"saved ({layout.frozen_source})" if layout.frozen_source else "not saved: taken from the base"
    chosen = Path(info.checkpoint).name
    rows = [
        ("checkpoints", ", ".join(f"{c} (chosen)" if c == chosen else c for c in info.checkpoints)),
        ("checkpoint", info.checkpoint),
        ("tags", ", ".join(f"{t} (chosen)" if t == info.tag else t for t in info.tags)),
        ("step", layout.global_step),
        (
            ("saved as", f"a PEFT adapter folder, gathered ({layout.dtype}): no ZeRO files")
            if layout.kind == "adapter"
            else (
                "ZeRO",
                f"stage {layout.zero_stage}, {layout.world_size} ranks, {layout.dtype}, DeepSpeed {layout.ds_version}",
            )
        ),
        (
            "trainable",
            f"{len(layout.trainable_shapes)} tensors, {trainable:,} params, "
            + (
                f"the run's {layout.dtype} copies"
                if layout.kind == "adapter"
                else f"{human_size(4 * trainable)} (fp32 masters)"
            ),
        ),
        (
            "frozen",
            f"{len(layout.frozen)} tensors, {frozen:,} params, "
            f"{human_size(frozen * (4 if layout.dtype == 'fp32' else 2))}, {saved}",
        ),
        (
            "LoRA",
            f"r={lora.get('r')}, alpha={lora.get('lora_alpha'):g}, targets {_targets(lora)}, "
            f"adapter '{info.adapter_name}'",
        ),
        ("LoRA config", info.adapter_config_path),
        ("base model", info.base_model),
    ]
    rows += [("detected" if i == 0 else "", feature) for i, feature in enumerate(info.features)]
    rows += [("inferred" if i == 0 else "", note) for i, note in enumerate(info.inferred)]
    lines = [f"{name:12} {value}" for name, value in rows if value not in ("", None)]
    lines += [f"note: {w}" for w in info.warnings]
    return "\n".join(lines)


def format_checked(checked: Checked, files: int) -> str:
    """``inspect --check``'s finding (a damaged record is an error instead)."""
    return (
        f"{'records':12} every one of the {checked.records} records of the {files} rank files is intact "
        f"(CRC-32 of {human_size(checked.bytes)} in {checked.seconds:.1f} s)"
    )

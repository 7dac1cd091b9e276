"""``export-adapter``: the trained adapter as a PEFT adapter folder, from the fp32 masters.

The Trainer's own ``adapter_model.safetensors`` holds the 16-bit copies of the weights (and under ZeRO-3
without gathering, empty tensors); this writes the fp32 masters with PEFT's own ``save_pretrained``, and
checks that ``PeftModel.from_pretrained`` on a fresh base gives back the trained model's outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zero2merged.api.distributed import on_rank_zero
from zero2merged.api.verify import unmerged_model
from zero2merged.checks.parity import MERGE_TOLERANCE, compare_models, probe_inputs
from zero2merged.core.environment import require_supported
from zero2merged.core.errors import CheckpointError, VerificationError
from zero2merged.core.options import Source
from zero2merged.core.results import CheckpointInfo, Parity, RebuildResult
from zero2merged.files.pickles import pickle_policy
from zero2merged.files.staging import place, staging
from zero2merged.model.base import load_base
from zero2merged.model.modelfiles import files_in
from zero2merged.model.serving import carry_tokenizer
from zero2merged.stages.inspect import inspect_checkpoint
from zero2merged.stages.rebuild import resize_to_checkpoint
from zero2merged.stages.save import check_output_free


@dataclass
class ExportReport:
    """What :func:`export_adapter` wrote and how closely the reloaded adapter reproduces the run."""

    output: str
    checkpoint: str
    tag: str
    files: list[str]
    tensors: int
    parity: dict

    def to_dict(self) -> dict:
        return asdict(self)


def export_adapter(checkpoint: Path | str, output: Path | str, **source: Any) -> ExportReport:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32 masters) for the checkpoint's adapter.

    Args:
        checkpoint: As for :func:`zero2merged.convert`.
        output: The adapter's folder; must not exist or be empty.
        **source: The rest of :class:`~zero2merged.core.options.Source` (``base_model``, ``tag``, ...).

    Inside a distributed job rank 0 does the work.

    Raises:
        Zero2MergedError: bad input, or the written adapter does not reproduce the trained model.
    """
    run = Source(checkpoint, **source)
    require_supported()
    return on_rank_zero(lambda _channel: _export(run, Path(output).expanduser().resolve()))


def _export(source: Source, output: Path) -> ExportReport:
    check_output_free(output)
    with pickle_policy(source.unsafe_pickle):
        info = inspect_checkpoint(source)
        if info.layout.quantized:  # its model in memory would take the packed 4-bit bytes for weights
            raise CheckpointError(
                f"{info.checkpoint} is a QLoRA run (a LoRA on a 4-bit base): export-adapter does not handle one "
                "yet; zero2merged convert merges it into the 4-bit weights dequantized, as training saw them"
            )
        model, rebuilt = unmerged_model(info)
    with staging(output) as staged:  # a failed check, Ctrl-C, SIGTERM: nothing half-written is left beside it
        parity = _write_checked(info, model, rebuilt, staged)
        place(staged, output)
    return ExportReport(
        output=str(output),
        checkpoint=info.checkpoint,
        tag=info.tag,
        files=[str(p.relative_to(output)) for p in files_in(output)],
        tensors=len(info.layout.trainable_shapes),
        parity=parity.to_dict(),
    )


def _write_checked(info: CheckpointInfo, model: Any, rebuilt: RebuildResult, staged: Path) -> Parity:
    """Save the adapter into ``staged``; returns how closely PEFT reloads it to the trained model's outputs.

    Raises:
        VerificationError: it does not reload to them, or lacks trained tensors.
    """
    from peft import PeftModel

    model.save_pretrained(staged)
    carry_tokenizer([info.checkpoint], staged)

    fresh = load_base(rebuilt.auto_class, info.base_model)
    resize_to_checkpoint(fresh, info)
    reloaded = PeftModel.from_pretrained(fresh, staged, adapter_name=info.adapter_name)
    inputs = probe_inputs(fresh.config)
    parity = compare_models(reloaded, model, inputs)
    parity.check(MERGE_TOLERANCE, f"the adapter reloaded from {staged} vs the trained model")
    saved = {
        k
        for k, v in reloaded.state_dict().items()
        if f".{info.adapter_name}." in k or k.endswith(f".{info.adapter_name}")
    }
    if not set(info.layout.trainable_shapes) <= saved:
        raise VerificationError(
            f"{staged} lacks trained tensors, e.g. {sorted(set(info.layout.trainable_shapes) - saved)[0]}"
        )
    return parity

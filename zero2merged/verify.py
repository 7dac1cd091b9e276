"""``verify``: does a merged model behave like the unmerged model its checkpoint describes?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zero2merged.basemodel import base_config, base_dtype, load_base
from zero2merged.errors import VerificationError
from zero2merged.parity import SAVE_TOLERANCES, compare, outputs, probe_inputs
from zero2merged.stages.inspect import CheckpointInfo, inspect_checkpoint
from zero2merged.stages.load import load_weights
from zero2merged.stages.rebuild import rebuild
from zero2merged.zero import ZeroReader


def unmerged_model(info: CheckpointInfo):
    """The model as training left it: the base wrapped by PEFT, holding the checkpoint's weights (fp32
    masters) read straight from the rank files, with no work directory.

    Returns:
        ``(peft_model, rebuild_record)``.
    """
    model, rebuilt = rebuild(info)
    tensors = ZeroReader(info.tag_dir, info.layout).tensors()
    load_weights(model, tensors, info, resized_vocab=rebuilt["resized_vocab"])
    return model, rebuilt


@dataclass
class VerifyReport:
    """Parity of a merged model with the unmerged model rebuilt from the checkpoint."""

    merged: str
    checkpoint: str
    tag: str
    merged_dtype: str
    parity: dict
    tolerance: dict
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def verify(
    merged: Path | str,
    checkpoint: Path | str,
    *,
    base_model: str | None = None,
    tag: str | None = None,
    adapter_config: Path | str | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> VerifyReport:
    """Compare a merged model's outputs with the unmerged model rebuilt from the checkpoint.

    Both run in fp32 on the same probe inputs; the tolerance is the one for the merged model's stored
    dtype. The merged model may come from anywhere (zero2merged or a manual recipe).

    Returns:
        The report; ``passed`` says whether the parity is within tolerance.

    Raises:
        Zero2MergedError: the inputs cannot be read.
    """
    info = inspect_checkpoint(checkpoint, tag=tag, adapter_config=adapter_config, base_model=base_model,
                              lora_alpha=lora_alpha, use_rslora=use_rslora)
    unmerged, rebuilt = unmerged_model(info)
    merged_dtype = base_dtype(base_config(str(merged)))
    merged_model = load_base(rebuilt["auto_class"], str(merged), torch.float32)
    inputs = probe_inputs(merged_model.config)
    parity = compare(outputs(merged_model, inputs), outputs(unmerged, inputs))
    tolerance = SAVE_TOLERANCES[merged_dtype]
    try:
        parity.check(tolerance, "merged vs unmerged")
        passed = True
    except VerificationError:
        passed = False
    return VerifyReport(merged=str(Path(merged).resolve()), checkpoint=info.checkpoint, tag=info.tag,
                        merged_dtype=merged_dtype, parity=parity.to_dict(), tolerance=asdict(tolerance), passed=passed)

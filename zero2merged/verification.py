"""``verify``: does a merged model behave like the unmerged model its checkpoint describes?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zero2merged import names
from zero2merged.basemodel import (
    auto_class_name,
    base_config,
    base_dtype,
    load_base,
)
from zero2merged.errors import AdapterConfigError, BaseModelError, OptionError, VerificationError, first_line
from zero2merged.options import Source
from zero2merged.parity import SAVE_TOLERANCES, compare_models, probe_inputs
from zero2merged.results import CheckpointInfo, RebuildResult
from zero2merged.stages.inspect import inspect_checkpoint
from zero2merged.stages.load import load_weights
from zero2merged.stages.rebuild import rebuild
from zero2merged.zero import ZeroReader


def unmerged_model(info: CheckpointInfo) -> tuple[Any, RebuildResult]:
    """The model as training left it: the base wrapped by PEFT, holding the checkpoint's weights (fp32
    masters) read straight from the rank files, with no work directory.

    Returns:
        ``(peft_model, rebuild's result)``.
    """
    model, rebuilt = rebuild(info)
    tensors = ZeroReader(info.tag_dir, info.layout).tensors()
    load_weights(model, tensors, info, resized_vocab=rebuilt.resized_vocab)
    return model, rebuilt


@dataclass
class VerifyReport:
    """Parity of a merged model with the unmerged model (from a checkpoint, or a base + PEFT adapter)."""

    merged: str
    source: str
    tag: str | None
    merged_dtype: str
    inputs: str
    parity: dict
    tolerance: dict
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def verify(
    merged: Path | str,
    checkpoint: Path | str | None = None,
    *,
    adapter: Path | str | None = None,
    prompts: Path | str | None = None,
    **source: Any,
) -> VerifyReport:
    """Compare a merged model's outputs with the unmerged model's.

    The unmerged model is rebuilt from a DeepSpeed ``checkpoint`` (its fp32 masters), or is ``base_model``
    with a PEFT ``adapter`` folder. Both run in fp32 on the same inputs: seeded random token ids, or the
    lines of a ``prompts`` text file tokenized with the base's tokenizer. The tolerance is the one for the
    merged model's stored dtype. The merged model may come from anywhere (zero2merged or a manual recipe).

    Args:
        merged: The merged model's folder.
        checkpoint: The DeepSpeed checkpoint it was made from; or
        adapter: a PEFT adapter folder, with ``base_model``.
        prompts: A text file, one prompt per line [default: seeded random token ids].
        **source: With ``checkpoint``, the rest of :class:`~zero2merged.options.Source` (``base_model``,
            ``tag``, ``adapter_config``, ``lora_alpha``, ``use_rslora``, ``unsafe_pickle``); with
            ``adapter``, ``base_model``.

    Returns:
        The report; ``passed`` says whether the parity is within tolerance.

    Raises:
        Zero2MergedError: the inputs cannot be read, or neither (or both) of checkpoint and adapter given.
    """
    if (checkpoint is None) == (adapter is None):
        raise OptionError(
            "give the unmerged model as a DeepSpeed checkpoint or as a PEFT adapter folder "
            "(--checkpoint or --adapter), one of them"
        )
    lines = None if prompts is None else read_prompts(Path(prompts))  # up front: before minutes of loading
    if checkpoint is not None:
        run = Source(checkpoint, **source)
        with run.pickle_policy():
            info = inspect_checkpoint(run)
            unmerged, rebuilt = unmerged_model(info)
        auto_class, base, origin, tag = rebuilt.auto_class, info.base_model, info.checkpoint, info.tag
    else:
        base = source.get("base_model")
        if base is None or not str(base).strip():
            raise OptionError("--adapter needs --base-model: the model the adapter was trained on")
        ignored = [name for name, value in source.items() if name != "base_model" and value not in (None, False)]
        if ignored:
            raise OptionError(f"--{ignored[0].replace('_', '-')} applies with --checkpoint, not with --adapter")
        unmerged, auto_class = _adapter_model(Path(adapter), base)
        origin, tag = str(Path(adapter).resolve()), None
    merged_dtype = base_dtype(base_config(str(merged)))
    merged_model = load_base(auto_class, str(merged), torch.float32)
    if prompts is None:
        inputs, described = probe_inputs(merged_model.config), "seeded random token ids"
    else:
        inputs = prompt_inputs(lines, base, merged_model.config)
        described = f"{len(inputs['input_ids'])} prompts from {Path(prompts).resolve()}"
    parity = compare_models(merged_model, unmerged, inputs)
    tolerance = SAVE_TOLERANCES[merged_dtype]
    try:
        parity.check(tolerance, "merged vs unmerged")
        passed = True
    except VerificationError:
        passed = False
    return VerifyReport(
        merged=str(Path(merged).resolve()),
        source=origin,
        tag=tag,
        merged_dtype=merged_dtype,
        inputs=described,
        parity=parity.to_dict(),
        tolerance=asdict(tolerance),
        passed=passed,
    )


def _adapter_model(adapter: Path, base_model: str):
    """The base with a PEFT adapter folder loaded on it (fp32), and the Auto class used."""
    import json

    from peft import PeftModel

    config_path = adapter / names.ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterConfigError(f"{adapter} is not a PEFT adapter folder: no {names.ADAPTER_CONFIG}")
    auto_class = auto_class_name(json.loads(config_path.read_text()), base_config(base_model))
    base = load_base(auto_class, base_model, torch.float32)
    try:
        return PeftModel.from_pretrained(base, str(adapter)).eval(), auto_class
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterConfigError(f"PEFT cannot load the adapter {adapter} on {base_model}: {first_line(e)}") from e


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a ``--prompts`` file.

    Raises:
        OptionError: it cannot be read, is not UTF-8 text, or holds no prompt.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"--prompts {path} is not UTF-8 text (byte {e.start}): give one prompt per line") from e
    except OSError as e:
        raise OptionError(f"--prompts {path} cannot be read: {e.strerror or e}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise OptionError(f"{path} holds no prompts (one per line)")
    return lines


def prompt_inputs(lines: list[str], base_model: str, config) -> dict:
    """``lines`` tokenized with the base's tokenizer and padded to one batch."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load the tokenizer of {base_model} for --prompts: {first_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(lines, padding=True, truncation=True, max_length=512, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, : max(1, inputs["input_ids"].shape[1] // 2)].clone()
    return inputs

"""``verify``: does a merged model behave like the unmerged model its checkpoint describes?"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zero2merged.checkpoint.reader import ZeroReader
from zero2merged.checks.blockwise import DiskWeights, aliases, meta_failure, run_from_disk
from zero2merged.checks.parity import SAVE_TOLERANCES, compare_models, probe_inputs
from zero2merged.core import names
from zero2merged.core.environment import require_supported
from zero2merged.core.errors import AdapterConfigError, BaseModelError, OptionError, VerificationError, first_line
from zero2merged.core.options import Source
from zero2merged.core.results import CheckpointInfo, RebuildResult
from zero2merged.files.pickles import pickle_policy
from zero2merged.model.base import auto_class_name, base_config, base_dir, base_dtype, load_base, meta_model
from zero2merged.model.layouts import Layout
from zero2merged.model.serving import load_tokenizer
from zero2merged.model.weights import BaseWeights, Readers, read_base
from zero2merged.stages.consolidate import consolidate
from zero2merged.stages.inspect import inspect_checkpoint, refuse_quantized
from zero2merged.stages.load import load_weights, plan_sources
from zero2merged.stages.rebuild import rebuild


def unmerged_from_disk(info: CheckpointInfo, scratch: Path) -> tuple[Any, RebuildResult]:
    """The model as training left it, run a block at a time (:mod:`zero2merged.checks.blockwise`): the base wrapped
    by PEFT on the meta device, each block's weights read when it runs, the trained ones from the fp32
    masters. Stage 2 writes its store of the masters into ``scratch`` (the frozen weights by reference: a few
    hundred MB at most), and stage 4 finds every weight's source, comparing the saved frozen ones with the
    base's, as a conversion does.

    Returns:
        ``(peft_model, rebuild's result)``.
    """
    store = scratch / names.CONSOLIDATED
    consolidate(info, store)
    model, rebuilt = rebuild(info, on_meta=True, real_buffers=True)
    sources = plan_sources(model, store, info, rebuilt).sources
    readers = Readers()
    base = read_base(model, rebuilt)
    readers[base.folder] = base
    where = {}
    for key, names_of in aliases(model).items():
        found = next((sources[name] for name in names_of if name in sources), None)
        if found is not None:
            where[key] = (readers[found[0]], found[1])
    run_from_disk(model, DiskWeights(where))
    return model, rebuilt


def merged_from_disk(auto_class: str, folder: Path) -> Any:
    """A merged model's folder as ``from_pretrained`` would load it in fp32 (through its conversion mapping),
    run a block at a time (:mod:`zero2merged.checks.blockwise`)."""
    model = meta_model(auto_class, base_config(str(folder)), real_buffers=True)
    names_of = aliases(model)
    files = BaseWeights(base_dir(str(folder)), Layout(model, list(names_of)))
    where = {}
    for key, tied in names_of.items():
        stored = next((name for name in tied if name in files), None)  # a tied weight is stored once
        if stored is not None:
            where[key] = (files, stored)
        elif key in dict(model.named_parameters()):
            raise VerificationError(f"the merged model's files in {folder} give no {key}")
    run_from_disk(model, DiskWeights(where))
    return model


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
    """Parity of a merged model with the unmerged model (from a checkpoint, or a base + PEFT adapter);
    ``reference`` says which model that is (a QLoRA run's: the trained one, its 4-bit weights dequantized)."""

    merged: str
    source: str
    tag: str | None
    merged_dtype: str
    inputs: str
    parity: dict
    tolerance: dict
    passed: bool
    reference: str = "the unmerged model"

    def to_dict(self) -> dict:
        return asdict(self)


def verify(
    merged: Path | str,
    checkpoint: Path | str | None = None,
    *,
    adapter: Path | str | None = None,
    prompts: Path | str | None = None,
    in_memory: bool = False,
    **source: Any,
) -> VerifyReport:
    """Compare a merged model's outputs with the unmerged model's.

    The unmerged model is rebuilt from a DeepSpeed ``checkpoint`` (its fp32 masters), or is ``base_model``
    with a PEFT ``adapter`` folder. Both run in fp32 on the same inputs: seeded random token ids, or the
    lines of a ``prompts`` text file tokenized with the base's tokenizer. The tolerance is the one for the
    merged model's stored dtype. The merged model may come from anywhere (zero2merged or a manual recipe).

    Against a checkpoint, both models run a block at a time side by side (:mod:`zero2merged.checks.blockwise`):
    the memory one block's weights take in fp32, whatever the model's size. ``in_memory`` loads both whole
    (as ``from_pretrained`` does), as does the ``adapter`` form; the figures are the same either way.

    Args:
        merged: The merged model's folder.
        checkpoint: The DeepSpeed checkpoint it was made from; or
        adapter: a PEFT adapter folder, with ``base_model``.
        prompts: A text file, one prompt per line [default: seeded random token ids].
        in_memory: Load both models whole instead of a block at a time.
        **source: With ``checkpoint``, the rest of :class:`~zero2merged.core.options.Source` (``base_model``,
            ``tag``, ``adapter_config``, ``lora_alpha``, ``use_rslora``, ``unsafe_pickle``); with
            ``adapter``, ``base_model``.

    Returns:
        The report; ``passed`` says whether the parity is within tolerance.

    Raises:
        Zero2MergedError: the inputs cannot be read, or neither (or both) of checkpoint and adapter given.
    """
    require_supported()
    if (checkpoint is None) == (adapter is None):
        raise OptionError(
            "give the unmerged model as a DeepSpeed checkpoint or as a PEFT adapter folder "
            "(--checkpoint or --adapter), one of them"
        )
    lines = None if prompts is None else read_prompts(Path(prompts))  # up front: before minutes of loading
    with tempfile.TemporaryDirectory(prefix="zero2merged-verify-") as scratch:
        return _verify(
            merged, checkpoint, adapter, lines, prompts, in_memory or checkpoint is None, Path(scratch), source
        )


def _verify(merged, checkpoint, adapter, lines, prompts, in_memory: bool, scratch: Path, source: dict) -> VerifyReport:
    reference = "the unmerged model"
    if checkpoint is not None:
        run = Source(checkpoint, **source)
        with pickle_policy(run.unsafe_pickle):
            info = inspect_checkpoint(run)
            refuse_quantized(info, streaming=not in_memory)
            unmerged, rebuilt = unmerged_model(info) if in_memory else unmerged_from_disk(info, scratch)
        auto_class, base, origin, tag = rebuilt.auto_class, info.base_model, info.checkpoint, info.tag
        if info.layout.quantized:  # what the run computed with: not the original base
            reference = "the trained model (its 4-bit base weights dequantized, with the adapter)"
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
    if in_memory:
        merged_model = load_base(auto_class, str(merged), torch.float32)
    else:
        merged_model = merged_from_disk(auto_class, Path(merged))
    if prompts is None:
        inputs, described = probe_inputs(merged_model.config), "seeded random token ids"
    else:
        inputs = prompt_inputs(lines, base, merged_model.config)
        described = f"{len(inputs['input_ids'])} prompts from {Path(prompts).resolve()}"
    try:
        parity = compare_models(merged_model, unmerged, inputs)
    except (NotImplementedError, RuntimeError, KeyError) as e:
        if in_memory:
            raise
        raise meta_failure(e) from e
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
        reference=reference,
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
    try:
        tokenizer = load_tokenizer(base_model)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load the tokenizer of {base_model} for --prompts: {first_line(e)}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(lines, padding=True, truncation=True, max_length=512, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = inputs["input_ids"][:, : max(1, inputs["input_ids"].shape[1] // 2)].clone()
    return inputs

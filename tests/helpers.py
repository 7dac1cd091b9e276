"""Independent references and comparisons the tests judge zero2merged by."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fixtures import Fixture
from fixtures.models import auto_class


def reference_consolidated(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def reference_merged(fixture: Fixture) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation + PEFT's merge in fp32, from the fixture's own spec.

    Nothing here goes through zero2merged: the LoraConfig comes from the spec the run was trained with
    (and the vocabulary is grown as the run grew it), the weights from DeepSpeed's reader, the frozen
    params it does not return from the base.
    """
    return {name: tensor.detach().clone() for name, tensor in reference_model(fixture).state_dict().items()}


def reference_model(fixture: Fixture):
    """The merged model of :func:`reference_merged`, as a module (ties intact)."""
    from peft import LoraConfig, get_peft_model

    spec = fixture.spec
    state = reference_consolidated(fixture.checkpoint)
    base = auto_class(spec.task).from_pretrained(fixture.base, dtype=torch.float32)
    if spec.add_tokens:
        base.resize_token_embeddings(base.get_input_embeddings().weight.shape[0] + spec.add_tokens)
    model = get_peft_model(base, LoraConfig(**spec.lora))
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys
    return model.merge_and_unload()


def tied_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names that share storage, grouped."""
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(tensor.data_ptr(), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def base_state(fixture: Fixture) -> dict[str, torch.Tensor]:
    model = auto_class(fixture.spec.task).from_pretrained(fixture.base, dtype=torch.float32)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder, all shards."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def assert_within_one_rounding(ours: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """``ours`` (16-bit) is the fp32 ``reference`` rounded once: at most one unit in the last place off."""
    eps = torch.finfo(ours.dtype).eps
    tiny = torch.finfo(ours.dtype).tiny
    magnitude = reference.abs().clamp_min(tiny)
    ulp = eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    error = (ours.float() - reference).abs()
    worst = (error / ulp).max().item()
    assert worst <= 1.0, f"{name}: {worst:.2f} ulp from the fp32 reference"


def live_outputs(fixture: Fixture) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The probe inputs and the live engine's main output on them, recorded at training time."""
    recorded = load_file(fixture.live_outputs)
    return recorded, recorded.pop("outputs")


def main_output(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    value = getattr(output, "logits", None)
    return (value if value is not None else output.last_hidden_state).float()


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


def numel(shape) -> int:
    return math.prod(shape)


def convert_fixture(fixture: Fixture, output: Path, **kwargs):
    """``zero2merged.convert`` on a fixture; for a run saved without adapter_config.json, the LoRA config is
    written from the spec and passed with ``adapter_config`` (and the base with ``base_model``)."""
    import zero2merged

    if fixture.spec.adapter_config == "none" and "adapter_config" not in kwargs:
        from peft import LoraConfig

        adapter = output.parent / f"{output.name}-adapter"
        LoraConfig(**fixture.spec.lora).save_pretrained(str(adapter))
        kwargs.update(adapter_config=adapter, base_model=kwargs.get("base_model") or str(fixture.base))
    return zero2merged.convert(fixture.checkpoint, output, **kwargs)

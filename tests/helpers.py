"""Independent references and comparisons the tests judge zero2merged by."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fixtures import Fixture, routes
from fixtures.models import VOCAB_SIZE, auto_class


def reference_consolidated(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation (``get_fp32_state_dict_from_zero_checkpoint``). A ZeRO stage 0 save it
    cannot read: there the fp32 masters the live engine's optimizer held, recorded beside the run at training
    time, and the frozen params as the model-state file holds them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    recorded = Path(checkpoint).parent / "reference_masters.safetensors"
    if recorded.is_file():
        masters = load_file(recorded)
        tag = (Path(checkpoint) / "latest").read_text().strip()
        module = torch.load(Path(checkpoint) / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {**{name: t for name, t in module.items() if name not in masters}, **masters}
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
    base = auto_class(spec.task).from_pretrained(fixture.base, dtype=torch.float32)
    if fixture.vocabulary > base.get_input_embeddings().weight.shape[0]:  # as the run grew it
        base.resize_token_embeddings(fixture.vocabulary)
    if spec.gathered:  # a plain PEFT adapter folder: PEFT's own loader
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(fixture.checkpoint)).merge_and_unload()
    # DeepSpeed names params by their path in the script's module: the PEFT model's names start after the
    # prefix the script put there (known from the spec, not found); another PEFT model's or adapter's are not
    # this merge's.
    state = {
        name.removeprefix(spec.prefix): tensor
        for name, tensor in reference_consolidated(fixture.checkpoint).items()
        if name.startswith(spec.prefix) and not (spec.second_adapter and f".{spec.second_adapter}." in name)
    }
    model = get_peft_model(base, LoraConfig(**spec.lora), adapter_name=spec.adapter_name)
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys
    return model.merge_and_unload()


def as_saved(model) -> dict[str, torch.Tensor]:
    """The model's tensors named and shaped as ``save_pretrained`` writes them (transformers' own reversal of
    the conversion mapping it loaded the model with: fused experts split again, renamed heads, ...). Under
    transformers 4, which has no such mapping, the renaming its ``save_pretrained`` does in place: a
    vision-language class's ``_checkpoint_conversion_mapping`` reverted, the first pattern that matches."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {_saved_name_4(model, name): tensor.detach() for name, tensor in model.state_dict().items()}
    return {name: tensor.detach() for name, tensor in revert_weight_conversion(model, model.state_dict()).items()}


def _saved_name_4(model, name: str) -> str:
    """transformers 4's ``save_pretrained`` (modeling_utils, 4.56): for classes named in its ``VLMS``, each
    ``{pattern: target}`` of ``_checkpoint_conversion_mapping`` applied as ``target -> pattern`` with the
    pattern's ``^`` and groups dropped."""
    import re

    from transformers.modeling_utils import VLMS

    if not any(vlm in cls.__name__.lower() for cls in type(model).__mro__[:-1] for vlm in VLMS):
        return name
    for pattern, target in model._checkpoint_conversion_mapping.items():
        name, count = re.subn(target, re.sub(r"\(.*\)", "", pattern.lstrip("^")), name)
        if count:
            break
    return name


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


# fp32 weights merged by PEFT on both sides, ours a block of rows at a time: each element of the delta B·A is a
# sum of r products, and summed in another order it may differ by r roundings of its largest term (r <= 16 here:
# 16 · 2^-24 ≈ 1e-6 relative); 1e-5 leaves a margin of ten, and 1e-7 absolute covers elements near zero.
FP32_RTOL, FP32_ATOL = 1e-5, 1e-7


def assert_within_one_rounding(ours: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """``ours`` (16-bit) is the fp32 ``reference`` rounded once: at most one unit in the last place off."""
    eps = torch.finfo(ours.dtype).eps
    tiny = torch.finfo(ours.dtype).tiny
    magnitude = reference.abs().clamp_min(tiny)
    ulp = eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    error = (ours.float() - reference).abs()
    worst = (error / ulp).max().item()
    assert worst <= 1.0, f"{name}: {worst:.2f} ulp from the fp32 reference"


def live_outputs(fixture: Fixture) -> tuple[dict[str, torch.Tensor], torch.Tensor, list]:
    """The probe inputs, the live engine's main output on them, recorded at training time, and a MoE model's
    routes in that run (:mod:`fixtures.routes`; empty for others)."""
    recorded = load_file(fixture.live_outputs)
    taken = routes.from_tensors(recorded)
    return recorded, recorded.pop("outputs"), taken


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _run_in(model, dtype: torch.dtype, inputs: dict[str, torch.Tensor], taken: list) -> torch.Tensor:
    """``model``'s main output with its weights and arithmetic in ``dtype`` and its routers (a MoE model's)
    taking the recorded routes (the model is left as it was)."""
    return main_output(copy.deepcopy(model).to(dtype), inputs, taken).double()


def live_rounding_budget(fixture: Fixture, inputs: dict, scale: torch.Tensor, taken: list) -> float:
    """How far, at most, rounding alone can put a correct conversion's outputs from the live engine's, in units
    of ``scale`` (the live outputs' largest magnitude).

    Both sides are the trained model up to rounding: the live engine computed in the training dtype, and a
    converted model holds the merged weights rounded once to the output dtype (and runs here in fp32). Each
    side's rounding is measured on the independent reference (DeepSpeed's consolidation + PEFT's merge in
    fp32), for this model and these inputs, on this machine, against the same model run in float64: the
    reference run in the training dtype, and the reference with its weights rounded to the output dtype run
    in fp32. Their sum is the budget. Measured on the fixtures, a correct conversion's distance from the live
    engine is 0.57 to 1.18 times this budget (bf16 and fp32 runs alike), so callers allow twice it. A MoE
    model's runs all take the live engine's routes (rounding elsewhere would send some tokens to other
    experts: a jump, not a rounding); its experts do not run in float64, so fp32 stands for exact there
    (2^-24 against the training dtype's 2^-8).
    """
    spec = fixture.spec
    trained_in, saved_in = DTYPES[spec.dtype], DTYPES[spec.base_dtype or spec.dtype]
    return rounding_budget(reference_model(fixture), trained_in, saved_in, inputs, scale, taken)


def rounding_budget(
    reference, trained_in: torch.dtype, saved_in: torch.dtype, inputs: dict, scale: torch.Tensor, taken: list = ()
) -> float:
    """:func:`live_rounding_budget` for any reference model (merged, fp32): the live engine computed in
    ``trained_in``, the converted model holds weights rounded to ``saved_in`` and runs in fp32."""
    model = reference.eval()
    exact = _run_in(model, torch.float32 if taken else torch.float64, inputs, taken)
    live_side = _run_in(model, trained_in, inputs, taken)
    ours_side = _run_in(copy.deepcopy(model).to(saved_in), torch.float32, inputs, taken)
    return (((live_side - exact).abs().max() + (ours_side - exact).abs().max()) / scale).item()


def assert_reproduces_live(fixture: Fixture, model=None, *, logits: torch.Tensor | None = None) -> None:
    """A converted ``model`` (or its ``logits`` on the fixture's probe inputs) reproduces the live engine up to
    rounding: within twice :func:`live_rounding_budget` (measured: at most 1.18 times it), a bound the bare
    base model, what a conversion that dropped the adapter would write, must fall outside; and the same top-1
    token wherever the live engine's choice leads the runner-up by more than either side's rounding could
    move it. A MoE model's distance is measured with its routers taking the live engine's routes, its top-1
    tokens with them free, where they route as the live engine did (:func:`free_run`)."""
    inputs, live, taken = live_outputs(fixture)
    scale = live.abs().max()
    allowed = 2 * live_rounding_budget(fixture, inputs, scale, taken)
    pinned = logits if model is None else main_output(model, inputs, taken)
    relative = ((pinned - live).abs().max() / scale).item()
    assert relative <= allowed, f"{relative:.4g} from the live engine, rounding allows {allowed:.4g}"
    if fixture.spec.task != "feature_extraction":  # logits: the same top-1 token or label where it is clear
        top2 = live.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * allowed * scale
        free = pinned
        if model is not None and taken:
            free, steady = free_run(model, inputs, taken)
            clear &= steady if live.dim() == steady.dim() + 1 else steady.all(-1)  # a label: its whole sequence
            assert clear.any(), "no clear position routed where the live engine routed it: nothing to judge"
        assert (free.argmax(-1) == live.argmax(-1))[clear].all()
    if fixture.vocabulary == VOCAB_SIZE:  # the bound tells a dropped adapter apart (the base cannot read new tokens)
        base = auto_class(fixture.spec.task).from_pretrained(fixture.base, dtype=torch.float32)
        assert ((main_output(base, inputs, taken) - live).abs().max() / scale).item() > allowed


def free_run(model, inputs: dict[str, torch.Tensor], taken: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE ``model``'s main output with its routers free, and a (batch, position) mask: True where every
    router sent this token, and each before it in its sequence (attention carries a route's effect forward),
    to the experts the live engine's ``taken`` routes did. Where a router was near a tie, rounding alone can
    send a token elsewhere (a jump, not a rounding), so the output there is not the conversion's to answer for;
    the router weights themselves are held to the reference tensor by tensor."""
    with routes.recording(model) as free_routes:
        free = main_output(model, inputs)
    shape = inputs["input_ids"].shape
    steady = torch.ones(math.prod(shape), dtype=torch.bool)
    top_k = getattr(model.config.get_text_config(), "num_experts_per_tok", None)
    for ours, live in zip(free_routes, taken, strict=True):
        steady &= _same_experts(ours, live, top_k, steady.numel())
    return free, steady.reshape(shape).int().cumprod(-1).bool()


def _same_experts(ours, live, top_k: int | None, tokens: int) -> torch.Tensor:
    """Per token, whether two outputs of one router choose the same experts: its integer outputs (the expert
    indices) compared, or, for a router that returns its logits alone, their ``top_k``."""
    ours, live = (ours if isinstance(ours, tuple) else (ours,)), (live if isinstance(live, tuple) else (live,))
    pairs = [(a, b) for a, b in zip(ours, live, strict=True) if not a.is_floating_point()]
    if not pairs:
        pairs = [(ours[0].topk(top_k, dim=-1).indices, live[0].topk(top_k, dim=-1).indices)]
    same = torch.ones(tokens, dtype=torch.bool)
    for a, b in pairs:  # each token's experts as a set
        a, b = a.reshape(tokens, -1).sort(-1).values, b.reshape(tokens, -1).sort(-1).values
        same &= (a == b.to(a.dtype)).all(-1)
    return same


def main_output(model, inputs: dict[str, torch.Tensor], taken: list | None = None) -> torch.Tensor:
    """Logits (or a bare encoder's hidden states), in fp32; a MoE model's routers taking ``taken`` if given."""
    dtype = next(model.parameters()).dtype  # images (a vision-language model's) in the weights' dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), routes.replaying(model, taken) if taken else contextlib.nullcontext():
        output = model(**inputs)
    value = getattr(output, "logits", None)
    return (value if value is not None else output.last_hidden_state).float()


def numel(shape) -> int:
    return math.prod(shape)


def convert_fixture(fixture: Fixture, output: Path, **kwargs):
    """``zero2merged.convert`` on a fixture; for a run saved without adapter_config.json, the LoRA config is
    written from the spec and passed with ``adapter_config`` (and the base with ``base_model``)."""
    import zero2merged

    kwargs = {**fixture.spec.convert_options, **kwargs}
    if fixture.spec.adapter_config == "none" and "adapter_config" not in kwargs:
        from peft import LoraConfig

        adapter = output.parent / f"{output.name}-adapter"
        LoraConfig(**fixture.spec.lora).save_pretrained(str(adapter))
        kwargs.update(adapter_config=adapter, base_model=kwargs.get("base_model") or str(fixture.base))
    return zero2merged.convert(fixture.checkpoint, output, **kwargs)

"""Models saved in another layout than their modules' (transformers' weight conversion mapping), from real
DeepSpeed runs: MoE experts with LoRA on the fused experts, vision-language models, GPT-NeoX's renamed head.
What inspect says, what the output holds beside the weights, and that verify holds them to the checkpoint.
(Their weights against DeepSpeed + PEFT and the live engine, and streaming against in memory, are checked
with every other fixture's in test_convert.py and test_streaming.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import zero2merged
from fixtures.models import auto_class
from tests.helpers import saved_state
from zero2merged import inspect_checkpoint

pytestmark = pytest.mark.slow

DETECTED = {
    "mixtral-experts-z3": [
        "LoRA on parameters (target_parameters): ",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "converted: .experts.*.w1.weight, .experts.*.w3.weight (files) -> .experts.gate_up_proj (modules)",
        "renamed: .block_sparse_moe. (files) -> .mlp. (modules)",
    ],
    "qwen3-moe-experts-z2": [
        "trained in full (modules_to_save): ",
        "converted: mlp.experts.*.down_proj.weight (files) -> mlp.experts.down_proj (modules)",
    ],
    "qwen2-vl-z3": ["vision-language model (Qwen2VLForConditionalGeneration), built with AutoModelForImageTextToText"],
    "llava-z2": ["vision-language model (LlavaForConditionalGeneration)", "renamed: ^language_model.model (files)"],
    "gemma3-vl-z3": ["vision-language model (Gemma3ForConditionalGeneration)"],
    "gpt-neox-z3": ["renamed: ^embed_out\\. (files) -> lm_head. (modules)"],
}


@pytest.mark.parametrize("name", DETECTED)
def test_inspect_says_which_layout_conversion_it_found(trained, name):
    features = " | ".join(inspect_checkpoint(trained(name).checkpoint).features)
    for expected in DETECTED[name]:
        assert expected in features, features


@pytest.mark.parametrize("name", ["mixtral-experts-z3", "qwen3-moe-experts-z2", "gpt-neox-z3", "llava-z2"])
def test_output_is_in_the_files_layout_and_loads_with_the_plain_auto_class(converted, name):
    fixture, output, report = converted(name)
    saved = saved_state(output)
    base = saved_state(fixture.base)
    assert set(saved) == set(base)  # the layout the base's files use, as save_pretrained writes it
    model = auto_class(fixture.spec.task).from_pretrained(output, dtype=torch.float32)
    assert type(model).__name__ == AutoConfig.from_pretrained(output).architectures[0]
    assert report.stage("merge").result.layers  # streamed, each LoRA layer (expert blocks included) checked


def test_lora_on_fused_experts_moves_every_expert(converted):
    """Each expert's own delta lands in its own file tensor: none is left as the base had it."""
    fixture, output, _ = converted("mixtral-experts-z3")
    saved, base = saved_state(output), saved_state(fixture.base)
    experts = [name for name in saved if ".experts." in name]
    assert len(experts) == 2 * 3 * 4  # 2 layers x (w1, w2, w3) x 4 experts
    for name in experts:
        assert not torch.equal(saved[name], base[name]), name


def test_router_trained_in_full_replaces_the_base_router(converted):
    fixture, output, _ = converted("qwen3-moe-experts-z2")
    saved, base = saved_state(output), saved_state(fixture.base)
    routers = [name for name in saved if name.endswith("mlp.gate.weight")]
    assert routers and all(not torch.equal(saved[name], base[name]) for name in routers)


@pytest.mark.parametrize("name", ["qwen2-vl-z3", "llava-z2", "gemma3-vl-z3"])
def test_vision_language_model_keeps_its_vision_weights_and_processor_files(converted, name):
    fixture, output, _ = converted(name)
    saved, base = saved_state(output), saved_state(fixture.base)
    vision = [n for n in base if "vision" in n or "visual" in n]
    trained_vision = fixture.spec.lora["target_modules"].find("vision_tower") >= 0
    changed = [n for n in vision if not torch.equal(saved[n], base[n])]
    assert vision and (bool(changed) == trained_vision), changed[:3]
    for file in ("preprocessor_config.json", "chat_template.jinja"):
        assert (output / file).read_text() == (fixture.base / file).read_text(), file
    assert json.loads((output / "config.json").read_text())["architectures"][0].endswith("ForConditionalGeneration")


def test_projector_trained_in_full_is_merged(converted):
    fixture, output, _ = converted("llava-z2")
    saved, base = saved_state(output), saved_state(fixture.base)
    projector = [n for n in base if "multi_modal_projector" in n]
    assert projector and all(not torch.equal(saved[n], base[n]) for n in projector)


@pytest.mark.parametrize("name", ["mixtral-attention-z2", "qwen2-vl-z3", "gpt-neox-z3"])
def test_verify_passes_against_the_checkpoint(converted, name):
    """verify holds the merged model to the unmerged one (a MoE model's routers following the unmerged
    model's choices, so that bf16 rounding does not send a token to another expert and count as a fault)."""
    fixture, output, _ = converted(name)
    report = zero2merged.verify(output, fixture.checkpoint)
    assert report.passed, report.parity

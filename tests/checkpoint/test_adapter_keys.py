"""What the trained keys say about the adapter: a LoraConfig inferred from them builds exactly those keys.

The keys are PEFT's own, from tiny models wrapped on the meta device (no weights, no checkpoint needed)."""

from __future__ import annotations

import pytest
import torch

from fixtures.families import FAMILIES, tiny_config
from zero2merged.checkpoint.adapter_keys import describe, infer_lora_config, read_adapter_keys
from zero2merged.core.errors import AdapterConfigError


def _trainable(lora: dict, adapter: str = "default") -> dict[str, list[int]]:
    """The trained params' names and shapes of a tiny Llama wrapped by PEFT with ``lora``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(FAMILIES["llama"])
    config.attention_bias = True  # biases to train with bias="lora_only" or "all"
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(**lora), adapter_name=adapter)
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


RUNS = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "rank pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "rank_pattern": {"k_proj": 2}},
    "DoRA": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"], "use_dora": True},
    "embeddings": {"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"]},
    "modules to save": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "lora-only biases": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj"], "bias": "lora_only"},
    "all biases": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "all"},
}


@pytest.mark.parametrize("run", RUNS)
def test_an_inferred_config_builds_the_trained_keys(run):
    lora = RUNS[run]
    trainable = _trainable(lora)
    config, notes = infer_lora_config(read_adapter_keys(trainable), lora_alpha=lora["lora_alpha"])
    assert _trainable(config) == trainable
    assert config["lora_alpha"] == lora["lora_alpha"] and config["r"] == lora["r"]
    assert config["use_dora"] is bool(lora.get("use_dora")) and config["bias"] == lora.get("bias", "none")
    assert any("lora_alpha=" in note and "(given)" in note for note in notes)


def test_the_keys_describe_the_adapter():
    keys = read_adapter_keys(_trainable(RUNS["embeddings"], adapter="sft"))
    assert keys.adapters == {"sft"} and keys.embeddings == {"model.embed_tokens"}
    assert keys.leaves == ["embed_tokens", "q_proj"] and set(keys.ranks.values()) == {8}
    traits = describe(RUNS["DoRA"], read_adapter_keys(_trainable(RUNS["DoRA"])))
    assert "DoRA (magnitude vectors rescale the merged rows)" in traits
    saved = read_adapter_keys(_trainable(RUNS["modules to save"]))
    assert saved.modules_to_save == ["lm_head"]


def test_rank_pattern_holds_the_ranks_that_differ_from_the_common_one():
    config, notes = infer_lora_config(read_adapter_keys(_trainable(RUNS["rank pattern"])), lora_alpha=8)
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2}
    assert all(path.endswith("k_proj") for path in config["rank_pattern"])
    assert "rank_pattern for 2 modules" in " ".join(notes)


def test_no_lora_keys_cannot_be_inferred():
    with pytest.raises(AdapterConfigError, match="no LoRA weights"):
        infer_lora_config(read_adapter_keys({"base_model.model.lm_head.weight": [256, 32]}), lora_alpha=16)

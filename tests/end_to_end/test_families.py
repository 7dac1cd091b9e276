"""The sweep: every family people fine-tune, from a tiny config with LoRA put on it the usual way, through the
library's own merge and save paths, against PEFT's ``merge_and_unload`` and transformers' ``save_pretrained``.

No DeepSpeed here (the trained adapter is PEFT's own, randomly initialized, handed to the stages as stage 2
would hand it): the point is that the next family whose saved layout or module tree breaks something is found
by the suite. Mixture-of-experts models carry LoRA on their fused experts (PEFT's ``target_parameters``), and
vision-language models on their language model (one also on its vision tower, with the projector trained in
full); several save their weights in a layout other than their modules' (transformers' conversion mapping).
"""

from __future__ import annotations

import pytest

from fixtures.families import FAMILIES, fused_experts, tiny_config, unsupported
from tests.families_harness import build, in_memory, reference, streamed, weight_files
from zero2merged.core.errors import VerificationError

SHARD = 20_000  # bytes: several shards even for these models, so the split (and what shares storage) counts


def _family(name: str):
    """The family, or a skip saying why the installed transformers cannot build it."""
    family = FAMILIES[name]
    reason = unsupported(family)
    if reason:
        pytest.skip(reason)
    return family


def _fused(name: str):
    """The family, or a skip where the installed transformers builds its experts as modules of their own."""
    family = _family(name)
    if not fused_experts(family):
        pytest.skip(f"transformers {transformers_version()} builds {name}'s experts as modules: none fused")
    return family


def transformers_version() -> str:
    import transformers

    return transformers.__version__


@pytest.mark.parametrize("name", FAMILIES)
def test_family_converts_to_exactly_what_peft_and_save_pretrained_write(tmp_path, name):
    family = _family(name)
    model, info = build(family, tmp_path)
    reference(model, family.auto_class, tmp_path / "reference", SHARD)
    expected = weight_files(tmp_path / "reference")
    assert len([f for f in expected if f.endswith(".safetensors")]) > 1

    result = streamed(info, tmp_path, tmp_path / "streamed", SHARD, block_bytes=1 << 20)
    assert weight_files(tmp_path / "streamed") == expected
    assert result.layers == sum(1 for k in info.layout.trainable_shapes if ".lora_A." in k)  # each layer checked

    in_memory(info, tmp_path, tmp_path / "in-memory", SHARD)
    assert weight_files(tmp_path / "in-memory") == expected


EXPERT_LORA = [name for name, family in FAMILIES.items() if family.lora.get("target_parameters")]


@pytest.mark.parametrize("name", EXPERT_LORA)
def test_fused_experts_merged_a_block_of_experts_at_a_time_write_the_same_files(tmp_path, name, monkeypatch):
    """Blocks of two experts (the fewest PEFT merges as experts) write what merging all at once writes."""
    from zero2merged.checks import layers

    blocks = []
    expert_blocks = layers._expert_blocks
    monkeypatch.setattr(layers, "_expert_blocks", lambda *a: blocks.append(expert_blocks(*a)) or blocks[-1])
    family = _fused(name)
    model, info = build(family, tmp_path)
    reference(model, family.auto_class, tmp_path / "reference", SHARD)
    streamed(info, tmp_path, tmp_path / "streamed", SHARD, block_bytes=1)
    assert blocks and all(block == [(0, 2), (2, 4)] for block in blocks)
    assert weight_files(tmp_path / "streamed") == weight_files(tmp_path / "reference")


def test_a_dropped_expert_delta_fails_the_per_layer_check(tmp_path, monkeypatch):
    """The bug other merge tools shipped: every expert but one merged. Each block's merged experts are
    checked against the unmerged ones from PEFT's own split of the factors, so it cannot pass."""
    from peft.tuners.lora.layer import ParamWrapper

    delta = ParamWrapper.get_delta_weight

    def drop_last_expert(layer, adapter, *args, **kwargs):
        weight = delta(layer, adapter, *args, **kwargs)
        if weight.dim() == 3:
            weight[-1] = 0
        return weight

    # Mixtral's experts are fused from transformers 5 on; gpt-oss's in transformers 4 too
    family = FAMILIES["mixtral"] if fused_experts(FAMILIES["mixtral"]) else _fused("gpt-oss")
    model, info = build(family, tmp_path)
    monkeypatch.setattr(ParamWrapper, "get_delta_weight", drop_last_expert)
    expected = r"experts(\.base_layer)*: merged vs unmerged experts \((gate_up|down)_proj\)"
    with pytest.raises(VerificationError, match=expected):
        streamed(info, tmp_path, tmp_path / "streamed", SHARD, block_bytes=1 << 20)


def test_the_sweep_covers_the_families_people_fine_tune():
    kinds = {family.kind for family in FAMILIES.values()}
    assert len(FAMILIES) >= 20 and kinds == {"text", "moe", "vision-language"}
    assert {"mixtral", "qwen3-moe", "deepseek-v3", "gpt-oss", "qwen2-vl", "llava", "gemma3", "gpt-neox"} <= set(
        FAMILIES
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_building_a_family_leaves_its_fixtures_cache_key_alone(name):
    """A family's config is part of the cache key of the fixtures trained from it: building its model (as the
    sweep does) must not change it, or a process that ran the sweep would train those fixtures again over
    the copies other test processes are reading."""
    family = _family(name)
    before = repr(family)
    tiny_config(family)
    assert repr(family) == before

"""The real-world matrix, kind by kind: what inspect detects, and what each kind needs beyond the plain
conversion (tied or untied embeddings, a grown vocabulary, other task types, a missing adapter config,
the adapter on its own)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

import zero2merged
from fixtures.models import VOCAB_SIZE, auto_class
from tests.helpers import (
    FP32_ATOL,
    FP32_RTOL,
    convert_fixture,
    reference_consolidated,
    reference_model,
    saved_state,
)
from zero2merged import AdapterConfigError, CheckpointError, inspect_checkpoint

pytestmark = pytest.mark.slow

DETECTED = {
    "dora-z2": "DoRA",
    "rslora-patterns-z3": "rsLoRA",
    "embedding-lora-z3": "LoRA on embeddings: model.embed_tokens",
    "modules-to-save-z3": "trained in full (modules_to_save): lm_head",
    "resized-vocab-trainer-z3": "vocabulary resized before training: 256 -> 264 tokens",
    "gpt2-tied-z3": "tied input/output embeddings: saved tied",
    "gpt2-lm-head-z2": "untied by training lm_head in full: saved untied",
    "llama-seqcls-z2": "task type SEQ_CLS",
    "bert-features-z3": "task type FEATURE_EXTRACTION",
    "t5-seq2seq-z3": "task type SEQ_2_SEQ_LM",
}


@pytest.mark.parametrize("name,expected", DETECTED.items())
def test_inspect_detects_the_kind(trained, name, expected):
    info = inspect_checkpoint(trained(name).checkpoint)
    assert any(expected in feature for feature in info.features), info.features


def test_inspect_shows_rank_and_alpha_patterns(trained):
    info = inspect_checkpoint(trained("rslora-patterns-z3").checkpoint)
    assert "rank_pattern: {'k_proj': 4}" in info.features and "alpha_pattern: {'o_proj': 64}" in info.features


@pytest.mark.parametrize("name,source", [("engine-z1-bf16", "module"), ("trainer-z1-fp32", None)])
def test_zero1_frozen_params_are_found_or_taken_from_the_base_and_the_report_says_so(trained, tmp_path, name, source):
    report = convert_fixture(trained(name), tmp_path / "merged")
    assert report.stage("inspect").metrics["frozen_saved"] is (source is not None)
    expected = "module state dict" if source else "taken from the base model"
    assert any(expected in warning for warning in report.warnings)
    loaded = report.stage("load").metrics
    assert (loaded["from_base"] == 0) is (source is not None)


def test_tied_embeddings_are_saved_once_and_reload_tied(trained, tmp_path):
    fixture = trained("gpt2-tied-z3")
    # The manual recipe's save fails on them...
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(reference_model(fixture).state_dict(), str(tmp_path / "naive.safetensors"))
    # ...ours writes wte once and the plain Auto class ties lm_head to it again.
    convert_fixture(fixture, tmp_path / "merged")
    assert "lm_head.weight" not in saved_state(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_embeddings_untied_by_training_stay_untied(trained, tmp_path):
    fixture = trained("gpt2-lm-head-z2")  # lm_head in modules_to_save: trained apart from wte
    convert_fixture(fixture, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)


@pytest.mark.parametrize("name", ["resized-vocab-trainer-z3", "resized-vocab-engine-z2"])
def test_grown_vocabulary_is_saved_with_its_config_and_tokenizer(trained, tmp_path, name):
    fixture = trained(name)
    report = convert_fixture(fixture, tmp_path / "merged")
    grown = VOCAB_SIZE + fixture.spec.add_tokens
    assert report.stage("rebuild").result.resized_vocab.rows == grown
    assert AutoConfig.from_pretrained(tmp_path / "merged").vocab_size == grown
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == grown and tokenizer.convert_tokens_to_ids("added0") == VOCAB_SIZE
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.get_input_embeddings().weight.shape[0] == grown


def test_grown_vocabulary_without_the_new_rows_is_refused(trained):
    """Embedding LoRA over a grown vocabulary, frozen params not saved: the new rows of the frozen
    embedding exist nowhere. (A hand-made layout: no run of ours saves this, and none should.)"""
    from zero2merged.stages.load import load_weights
    from zero2merged.stages.rebuild import rebuild

    fixture = trained("embedding-lora-z3")
    info = inspect_checkpoint(fixture.checkpoint)
    grown = {
        k: [s[0], VOCAB_SIZE + 8] if "lora_embedding_A" in k else s for k, s in info.layout.trainable_shapes.items()
    }
    info.layout = dataclasses.replace(info.layout, trainable=[grown], frozen={}, frozen_source=None)
    model, rebuilt = rebuild(info)
    assert rebuilt.resized_vocab.rows == VOCAB_SIZE + 8
    tensors = ((k, torch.zeros(s)) for k, s in grown.items())
    with pytest.raises(CheckpointError, match="no values for the new rows"):
        load_weights(model, tensors, info, resized_vocab=rebuilt.resized_vocab)


def test_sequence_classification_head_is_trained_and_kept(trained, tmp_path):
    fixture = trained("llama-seqcls-z2")
    convert_fixture(fixture, tmp_path / "merged")
    model = auto_class("seq_cls").from_pretrained(tmp_path / "merged")
    base = auto_class("seq_cls").from_pretrained(fixture.base)
    assert model.config.num_labels == 3 and not torch.equal(model.score.weight, base.score.weight)


def test_encoder_feature_extraction_model(trained, tmp_path):
    report = convert_fixture(trained("bert-features-z3"), tmp_path / "merged")
    assert report.stage("save").status == "ran"
    model = AutoModel.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == "BertModel"
    assert not (tmp_path / "merged" / "generation_config.json").exists()


def test_seq2seq_model_keeps_its_shared_embeddings(trained, tmp_path):
    convert_fixture(trained("t5-seq2seq-z3"), tmp_path / "merged")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    shared = model.shared.weight.data_ptr()
    assert model.encoder.embed_tokens.weight.data_ptr() == shared == model.lm_head.weight.data_ptr()


INFERABLE = [
    "engine-z2-bf16",
    "dora-z2",
    "embedding-lora-z3",
    "resized-vocab-engine-z2",
    "gpt2-tied-z3",
    "all-linear-z2",
]


@pytest.mark.parametrize("name", INFERABLE)
def test_missing_adapter_config_is_inferred_from_the_keys(trained, tmp_path, name):
    fixture = trained(name)
    checkpoint = tmp_path / "run"
    shutil.copytree(fixture.checkpoint, checkpoint, ignore=shutil.ignore_patterns("adapter_config.json"))
    with pytest.raises(AdapterConfigError, match="--lora-alpha"):
        inspect_checkpoint(checkpoint)
    alpha = fixture.spec.lora["lora_alpha"]
    info = inspect_checkpoint(checkpoint, lora_alpha=alpha, base_model=str(fixture.base))
    assert info.lora_config["r"] == fixture.spec.lora["r"]
    assert info.lora_config["use_dora"] is bool(fixture.spec.lora.get("use_dora"))
    assert any("lora_alpha" in note and "given" in note for note in info.inferred)

    inferred = zero2merged.convert(checkpoint, tmp_path / "inferred", lora_alpha=alpha, base_model=str(fixture.base))
    assert inferred.stage("save").status == "ran"
    reference = reference_model(fixture).state_dict()
    for key, tensor in saved_state(tmp_path / "inferred").items():
        torch.testing.assert_close(tensor.float(), reference[key].to(tensor.dtype).float(), rtol=0, atol=0, msg=key)


def test_alpha_is_required_and_used(trained, tmp_path):
    """A wrong alpha gives another model: the reference comparison can tell."""
    fixture = trained("engine-z3-bf16")
    checkpoint = tmp_path / "run"
    shutil.copytree(fixture.checkpoint, checkpoint, ignore=shutil.ignore_patterns("adapter_config.json"))
    zero2merged.convert(checkpoint, tmp_path / "wrong", lora_alpha=4, base_model=str(fixture.base), dtype="fp32")
    reference = reference_model(fixture).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"  # alpha 4 instead of 16: three quarters of the delta missing,
    # far beyond fp32 rounding (the delta moves weights by a third of their magnitude: test_convert)
    assert not torch.allclose(saved_state(tmp_path / "wrong")[q], reference[q], atol=1e-3)


@pytest.mark.parametrize("name", ["trainer-z3-bf16", "dora-z2", "resized-vocab-trainer-z3", "gpt2-tied-z3"])
def test_exported_adapter_loads_with_peft_and_holds_the_fp32_masters(trained, tmp_path, name):
    from peft import PeftModel

    fixture = trained(name)
    report = zero2merged.export_adapter(fixture.checkpoint, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(report.files)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    trained = zero2merged.inspect_checkpoint(fixture.checkpoint).layout.trainable_shapes
    masters = reference_consolidated(fixture.checkpoint)
    for key in trained:  # PEFT's file drops the adapter name (and DoRA's ".weight") from the keys
        peft_key = key.replace(".default.", ".").removesuffix(".default")
        tensor = exported.get(peft_key, exported.get(peft_key.removesuffix(".weight")))
        assert tensor.dtype == torch.float32 and torch.equal(tensor, masters[key]), key
    # PEFT's own loading on a fresh base, merged by PEFT, equals the DeepSpeed + PEFT reference.
    base = auto_class(fixture.spec.task).from_pretrained(fixture.base, dtype=torch.float32)
    if fixture.vocabulary > VOCAB_SIZE:
        base.resize_token_embeddings(fixture.vocabulary)
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    reference = reference_model(fixture).state_dict()
    for key, tensor in reference.items():
        torch.testing.assert_close(merged[key], tensor, rtol=FP32_RTOL, atol=FP32_ATOL, msg=key)


def test_trainer_adapter_file_is_only_16_bit(trained, tmp_path):
    """Why export-adapter exists: the Trainer's own adapter file holds the bf16 copies, not the masters."""
    fixture = trained("trainer-z3-bf16")
    with safe_open(fixture.checkpoint / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    zero2merged.export_adapter(fixture.checkpoint, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(fixture.base.resolve())

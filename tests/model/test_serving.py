"""The serving files: the tokenizer, chat template and generation config carried into the output from the run
(else the base), and the special token ids of ``config.json`` and ``generation_config.json`` made to agree
with the tokenizer the run used. Fast: tiny folders built here, no training."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig

from fixtures.models import tiny_tokenizer
from fixtures.train_lora import chat_format
from zero2merged.model import serving
from zero2merged.model.serving import _agreeing


@pytest.mark.parametrize(
    "kind,before,keep,after",
    [
        ("eos", 257, True, 257),  # agrees already
        ("eos", [3, 257], True, [3, 257]),  # a list naming it agrees
        ("eos", 3, True, [3, 257]),  # a generation config stops at either
        ("eos", 3, False, 257),  # config.json names one token: the tokenizer's
        ("eos", [3, 4], False, [3, 4, 257]),  # a list stays a list
        ("pad", 3, True, 257),  # only end-of-sequence ids are kept beside the new one
    ],
)
def test_which_ids_are_written(kind, before, keep, after):
    assert _agreeing(kind, before, 257, keep=keep) == after


def _folders(tmp_path: Path, *, chat: bool, run_generation: dict | None = None):
    """A base (tokenizer, config and generation config naming ``</s>``), a run whose tokenizer made
    ``<|im_end|>`` its end of sequence (``chat``), and an output being written whose configs are hard links of
    another folder's files, as the streaming merge leaves them."""
    base, run, merged, staged = (tmp_path / name for name in ("base", "run", "merged", "staged"))
    original = tiny_tokenizer()
    original.save_pretrained(base)
    config = LlamaConfig(vocab_size=258, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        original.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>")
    )
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=True, temperature=0.7
    )
    for folder in (base, merged):
        config.save_pretrained(folder)
        generation.save_pretrained(folder)
    trained = tiny_tokenizer()
    if chat:
        chat_format(trained)
    trained.save_pretrained(run)
    if run_generation is not None:
        GenerationConfig(**run_generation).save_pretrained(run.parent)  # a Trainer's run folder holds it
    staged.mkdir()
    for name in ("config.json", "generation_config.json"):
        os.link(merged / name, staged / name)
    return base, run, merged, staged


def test_a_chat_runs_end_token_is_written_into_both_configs(tmp_path):
    base, run, merged, staged = _folders(tmp_path, chat=True)
    served = serving.serve(staged, run, base)

    tokenizer = AutoTokenizer.from_pretrained(staged)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and AutoConfig.from_pretrained(staged).eos_token_id == end
    old = AutoConfig.from_pretrained(base).eos_token_id
    assert GenerationConfig.from_pretrained(staged).eos_token_id == [old, end]  # generation stops at either
    assert served.changed == [
        f"config.json eos_token_id: {old} -> {end} (the tokenizer's eos_token <|im_end|>)",
        f"generation_config.json eos_token_id: {old} -> {[old, end]} (the tokenizer's eos_token <|im_end|>)",
    ]
    assert (served.tokenizer_from, served.chat_template_from, served.generation_config_from) == (
        str(run),
        str(run),
        str(base),
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "t5"}], tokenize=False).startswith(
        "<|im_start|>user"
    )
    # The merge stage's files (hard links of the output's) are not changed through the links.
    assert AutoConfig.from_pretrained(merged).eos_token_id == old
    assert GenerationConfig.from_pretrained(merged).eos_token_id == old


def test_agreeing_files_are_left_as_save_pretrained_wrote_them(tmp_path):
    base, run, merged, staged = _folders(tmp_path, chat=False)
    served = serving.serve(staged, run, base)
    assert served.changed == [] and served.chat_template_from is None
    for name in ("config.json", "generation_config.json"):
        assert (staged / name).read_bytes() == (merged / name).read_bytes()
        assert os.path.samefile(staged / name, merged / name)  # still the merge stage's file: nothing rewritten


def test_the_runs_own_generation_config_wins_and_is_aligned_too(tmp_path):
    base, run, merged, staged = _folders(tmp_path, chat=True, run_generation={"max_new_tokens": 77, "eos_token_id": 3})
    served = serving.serve(staged, run, base)
    generation = GenerationConfig.from_pretrained(staged)
    assert served.generation_config_from == str(run.parent)
    assert generation.max_new_tokens == 77 and generation.eos_token_id == [
        3,
        AutoTokenizer.from_pretrained(run).eos_token_id,
    ]


def test_the_base_tokenizer_is_used_when_the_run_saved_none(tmp_path):
    base, run, merged, staged = _folders(tmp_path, chat=False)
    shutil.rmtree(run)
    run.mkdir()
    served = serving.serve(staged, run, base)
    assert served.tokenizer_from == str(base) and served.changed == []
    assert AutoTokenizer.from_pretrained(staged).get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()


def test_inspect_notes_name_what_the_run_did_not_say(tmp_path):
    base, run, _, _ = _folders(tmp_path, chat=True)
    notes = serving.notes(run, str(base))
    assert "2 tokens added during training: <|im_start|>, <|im_end|>" in notes
    assert "the run's tokenizer changed eos_token: </s> -> <|im_end|>" in notes
    assert "the run saved no generation config: the base model's is used" in notes
    assert any("generation_config.json name other special tokens than the tokenizer (2 ids)" in n for n in notes)

    plain_base, plain_run, _, _ = _folders(tmp_path / "plain", chat=False)
    shutil.rmtree(plain_run)
    plain_run.mkdir()
    (plain_base / "generation_config.json").unlink()
    assert serving.notes(plain_run, str(plain_base)) == [
        "the run saved no tokenizer: the base model's is used",
        "neither the run nor the base model has a generation_config.json: generate() uses its defaults",
    ]
    assert serving.notes(plain_run, "some-org/some-model") == []  # a hub id: nothing fetched

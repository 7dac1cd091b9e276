"""The inputs users have, converted from the folders they have, and verified: a base stored as
``pytorch_model.bin`` (single or sharded), ZeRO stage 0 with bf16, an Accelerate script's ``save_state``, TRL's
``SFTTrainer`` on a chat format; and the output a server expects: a chat model that stops at its end of turn.

Each fixture is also converted and checked against DeepSpeed + PEFT and the live engine by the tests that
take every fixture (tests/end_to_end/test_convert.py, tests/end_to_end/test_streaming.py,
tests/checkpoint/test_reader.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from zero2merged.cli import main
from zero2merged.model.modelfiles import files_in

pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    """The CLI as a user runs it: exit 0, and what it printed."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _convert_and_verify(checkpoint, output, *options) -> str:
    """``convert`` then ``verify`` with the same options; what convert printed."""
    printed = _run("convert", checkpoint, "--output", output, *options)
    assert "PASS" in _run("verify", output, "--checkpoint", checkpoint, *options)
    return printed


@pytest.mark.parametrize("name", ["binbase-z2", "binbase-sharded-z3"])
def test_a_base_stored_as_pytorch_model_bin_gives_what_its_safetensors_copy_gives(trained, tmp_path, name):
    fixture = trained(name)
    assert not list(fixture.base.glob("*.safetensors")) and list(fixture.base.glob("pytorch_model*.bin"))
    _convert_and_verify(fixture.checkpoint, tmp_path / "from-bin")
    # The same base as safetensors (sharded alike), read by the reader every other test exercises.
    copy = tmp_path / "base-safetensors"
    AutoModelForCausalLM.from_pretrained(fixture.base, dtype=torch.bfloat16).save_pretrained(
        copy, max_shard_size="150KB" if name.endswith("sharded-z3") else "5GB"
    )
    AutoTokenizer.from_pretrained(fixture.base).save_pretrained(copy)
    _run("convert", fixture.checkpoint, "--output", tmp_path / "from-safetensors", "--base-model", copy)
    from_bin, from_safetensors = tmp_path / "from-bin", tmp_path / "from-safetensors"
    weights = sorted(p.name for p in from_bin.glob("model*.safetensors"))
    assert weights and weights == sorted(p.name for p in from_safetensors.glob("model*.safetensors"))
    for name in weights:
        assert (from_bin / name).read_bytes() == (from_safetensors / name).read_bytes(), name


def test_zero_stage_0_bf16_is_read_from_the_optimizers_fp32_masters(trained, tmp_path):
    fixture = trained("zero0-bf16")
    tag = fixture.checkpoint / (fixture.checkpoint / "latest").read_text().strip()
    assert [p.name for p in tag.iterdir()] == ["mp_rank_00_model_states.pt"]  # no ZeRO files: one state file
    printed = _run("inspect", fixture.checkpoint)
    assert "stage 0, 2 ranks, bf16" in printed and "fp32 masters" in printed
    _convert_and_verify(fixture.checkpoint, tmp_path / "merged")


def test_an_accelerate_run_converts_from_the_folder_save_state_wrote(trained, tmp_path):
    fixture = trained("accelerate-z2")
    run = fixture.checkpoint  # what accelerator.save_state(run) wrote: latest -> pytorch_model, no adapter config
    assert (run / "latest").read_text().strip() == "pytorch_model" and not (run / "adapter_config.json").exists()
    options = ["--base-model", fixture.base, "--lora-alpha", fixture.spec.lora["lora_alpha"]]
    inspected = _run("inspect", run, *options)
    assert "pytorch_model (chosen)" in inspected and "the run saved no tokenizer: the base model's is used" in inspected
    output = tmp_path / "merged"
    _convert_and_verify(run, output, *options)
    # The script's own generation config (saved beside its state), not the base's.
    ours, base = GenerationConfig.from_pretrained(output), GenerationConfig.from_pretrained(fixture.base)
    assert ours.max_new_tokens == GenerationConfig.from_pretrained(run).max_new_tokens != base.max_new_tokens
    card = (output / "README.md").read_text()
    assert f"| generation config | `{run}` |" in card and f"| tokenizer | `{fixture.base}` |" in card


def test_an_accelerate_run_of_two_models_says_which_one_is_converted(trained, tmp_path):
    """save_state of two prepared models: DeepSpeed saves the second as pytorch_model_1 and points latest at it."""
    fixture = trained("accelerate-z2")
    run = tmp_path / "run"
    shutil.copytree(fixture.checkpoint, run)
    shutil.copytree(run / "pytorch_model", run / "pytorch_model_1")
    (run / "latest").write_text("pytorch_model_1")
    options = ["--base-model", fixture.base, "--lora-alpha", fixture.spec.lora["lora_alpha"]]
    inspected = _run("inspect", run, *options)
    assert "Accelerate saved 2 models here (pytorch_model, pytorch_model_1): pytorch_model_1 is converted" in inspected
    assert "pytorch_model (chosen)" in _run("inspect", run, "--tag", "pytorch_model", *options)


class _EndsAfter(LogitsProcessor):
    """A model that has learned to end its turn (a tiny random one has not): no end token before the
    ``steps``-th new token, then ``token`` only."""

    def __init__(self, prompt: int, steps: int, token: int, ends: list[int]):
        self.at, self.token, self.ends = prompt + steps - 1, token, ends

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        if input_ids.shape[1] < self.at:
            scores[:, self.ends] = -float("inf")
        else:
            scores[:, :] = -float("inf")
            scores[:, self.token] = 0
        return scores


def test_a_trl_chat_model_stops_at_its_end_of_turn(trained, tmp_path):
    fixture = trained("trl-chat-z3")
    run = fixture.checkpoint
    inspected = _run("inspect", fixture.run_dir)
    assert "2 tokens added during training: <|im_start|>, <|im_end|>" in inspected
    assert "the run's tokenizer changed eos_token: </s> -> <|im_end|>" in inspected
    output = tmp_path / "merged"
    printed = _convert_and_verify(fixture.run_dir, output)

    tokenizer = AutoTokenizer.from_pretrained(output)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        tokenizer.eos_token == "<|im_end|>" and tokenizer.get_vocab() == AutoTokenizer.from_pretrained(run).get_vocab()
    )
    old = AutoConfig.from_pretrained(fixture.base).eos_token_id
    assert old != end and GenerationConfig.from_pretrained(fixture.base).eos_token_id == old  # the base disagrees
    assert AutoConfig.from_pretrained(output).eos_token_id == end
    assert GenerationConfig.from_pretrained(output).eos_token_id == [old, end]
    assert f"special token ids rewritten: config.json eos_token_id: {old} -> {end}" in printed
    card = (output / "README.md").read_text()
    assert f"| chat template | `{run}` |" in card
    assert (
        f"- generation_config.json eos_token_id: {old} -> [{old}, {end}] (the tokenizer's eos_token <|im_end|>)" in card
    )

    chat = [{"role": "user", "content": "t5 t6"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert (
        prompt["input_ids"][0].tolist()
        == AutoTokenizer.from_pretrained(run).apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    length = prompt["input_ids"].shape[1]

    def generate(generation_config):
        ends = LogitsProcessorList([_EndsAfter(length, 3, end, [old, end])])
        return (
            model.generate(
                **prompt, generation_config=generation_config, logits_processor=ends, do_sample=False, max_new_tokens=12
            ).shape[1]
            - length
        )

    assert generate(GenerationConfig.from_pretrained(output)) == 3  # stops at the end of its turn
    assert generate(GenerationConfig.from_pretrained(fixture.base)) == 12  # the base's config never would
    assert {p.name for p in files_in(output)} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
    }

"""Checkpoints from training scripts beyond the Hugging Face family, converted and verified: a wrapper module
holding the PEFT model (OpenRLHF's actor), an actor and a critic in one module, a compiled model, Lightning's
strategy layout, a named adapter, two adapters, ZeRO-0 with a torch optimizer, a gathered adapter. And where
nothing can be right without the user's word, or the files cannot give the right model, one line saying why.

Each fixture is also judged against DeepSpeed's consolidation + PEFT's merge and the live engine by the tests
that take every fixture (tests/end_to_end/test_convert.py, tests/end_to_end/test_streaming.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import zero2merged
from zero2merged.cli import main

pytestmark = pytest.mark.slow

SCRIPTS = [
    "wrapper-z3",
    "two-models-z2",
    "compile-z2",
    "lightning-z2",
    "lightning-z3",
    "named-adapter-z3",
    "two-adapters-z2",
    "zero0-client-bf16",
    "gathered-trainer-z3",
]


def _refused(*args) -> str:
    """The CLI stops with exit code 2 and one line; that line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_run_verifies_and_its_card_says_what_was_taken(converted, name):
    """Converted by the module's ``converted`` (the library, with what the user passes for the run); then
    ``verify``, and the model card names the prefix stripped, the adapter merged, or the 16-bit copies used."""
    fixture, output, _ = converted(name)
    options = dict(fixture.spec.convert_options)
    if fixture.spec.adapter_config == "none":  # Lightning saves no LoRA config: the one convert_fixture wrote
        options.update(adapter_config=output.parent / f"{output.name}-adapter", base_model=str(fixture.base))
    report = zero2merged.verify(output, fixture.checkpoint, **options)
    assert report.passed and report.parity["top1_agreement"] >= 0.9  # verify's bf16 tolerance
    card = (output / "README.md").read_text()
    if fixture.spec.prefix:
        assert (
            f"`{fixture.spec.prefix.removesuffix('.')}`" in card or f"'{fixture.spec.prefix.removesuffix('.')}'" in card
        )
    if fixture.spec.adapter_name != "default":
        assert f"`{fixture.spec.adapter_name}`" in card or f"'{fixture.spec.adapter_name}'" in card
    if fixture.spec.gathered:
        assert "not fp32 masters" in card


def test_two_peft_models_and_none_named_is_one_line_listing_them(trained, tmp_path):
    fixture = trained("two-models-z2")
    line = _refused("convert", fixture.checkpoint, "--output", tmp_path / "m")
    assert "'actor'" in line and "'critic'" in line and "--peft-model" in line
    line = _refused("convert", fixture.checkpoint, "--output", tmp_path / "m", "--peft-model", "policy")
    assert "'policy'" in line and "'actor'" in line
    assert not (tmp_path / "m").exists()


def test_two_adapters_and_none_named_is_one_line_listing_them(trained, tmp_path):
    fixture = trained("two-adapters-z2")
    line = _refused("convert", fixture.checkpoint, "--output", tmp_path / "m")
    assert "'dpo'" in line and "'sft'" in line and "--adapter-name" in line
    line = _refused("convert", fixture.checkpoint, "--output", tmp_path / "m", "--adapter-name", "rm")
    assert "'rm'" in line and "'sft'" in line
    assert not (tmp_path / "m").exists()


def test_an_adapter_of_zero3_placeholders_is_refused_saying_why(trained, tmp_path):
    """ZeRO-3 without gathering saves each param as an empty placeholder: nothing in the file to merge."""
    run = tmp_path / "run"
    shutil.copytree(trained("gathered-trainer-z3").checkpoint, run)
    weights = run / "adapter_model.safetensors"
    save_file({name: torch.empty(0, dtype=t.dtype) for name, t in load_file(weights).items()}, weights)
    line = _refused("convert", run, "--output", tmp_path / "m")
    assert str(weights) in line and "placeholder" in line


def test_a_zero0_16bit_save_without_fp32_masters_is_refused_naming_what_it_holds(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained("zero0-client-bf16").checkpoint, run)
    [model_file] = run.glob("*/mp_rank_00_model_states.pt")
    states = torch.load(model_file, weights_only=False)
    states["optimizer"] = {"state": {}, "param_groups": []}  # an optimizer layout with no masters in it
    torch.save(states, model_file)
    line = _refused("convert", run, "--output", tmp_path / "m", "--unsafe-pickle")
    assert str(model_file) in line and "param_groups" in line

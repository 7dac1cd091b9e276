"""QLoRA runs (a LoRA trained on a 4-bit NF4 base with bitsandbytes), from real DeepSpeed runs on the CPU:
found from the checkpoint's quant-state entries, shown by ``inspect``, and never taken for weights: every
command that would merge them stops in one line (zero2merged does not convert them yet)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from zero2merged import inspect_checkpoint
from zero2merged.cli import main

pytest.importorskip("bitsandbytes")  # the fixtures are trained on a 4-bit base: `pip install -e '.[dev]'` has it

from fixtures.qlora import QLORA_SPECS, build_qlora, checkpoint_of  # noqa: E402

pytestmark = pytest.mark.slow

LINEARS = 7 * 2  # q, k, v, o, gate, up, down in each of the tiny Llama's 2 layers: every one is 4-bit


@pytest.fixture(scope="module")
def qlora():
    def get(name: str):
        return checkpoint_of(build_qlora(name), name)

    return get


@pytest.mark.parametrize("name", QLORA_SPECS)
def test_inspect_finds_the_4bit_base_and_its_settings(qlora, name):
    info = inspect_checkpoint(qlora(name))
    quantized = info.layout.quantized
    assert len(quantized) == LINEARS
    assert {q["quant_type"] for q in quantized.values()} == {"nf4"}  # as BitsAndBytesConfig asked
    assert {q["blocksize"] for q in quantized.values()} == {64}
    assert {q["dtype"] for q in quantized.values()} == {"bfloat16"}
    trainer = QLORA_SPECS[name]["layout"] == "trainer"  # the Trainer saves no frozen params, packed ones neither
    assert {q["storage"] for q in quantized.values()} == ({None} if trainer else {"bfloat16"})
    base = load_file(Path(info.base_model) / "model.safetensors")  # each is the base's weight, by its shape
    names = {key: key.removeprefix("base_model.model.").replace(".base_layer.", ".") for key in quantized}
    assert {key: q["shape"] for key, q in quantized.items()} == {key: list(base[names[key]].shape) for key in names}
    assert not any(name.endswith(("absmax", "quant_map")) or "quant_state" in name for name in info.layout.frozen)
    [line] = [f for f in info.features if f.startswith("QLoRA: ")]
    assert f"{LINEARS} base weights saved in 4-bit (nf4, block size 64, " in line


@pytest.mark.parametrize("name", QLORA_SPECS)
@pytest.mark.parametrize("command", ["convert", "export-adapter", "verify"])
def test_commands_that_would_merge_packed_bytes_stop_in_one_line(qlora, tmp_path, name, command):
    checkpoint = qlora(name)
    args = {
        "convert": ["convert", str(checkpoint), "--output", str(tmp_path / "out")],
        "export-adapter": ["export-adapter", str(checkpoint), "--output", str(tmp_path / "out")],
        "verify": ["verify", str(tmp_path), "--checkpoint", str(checkpoint)],
    }[command]
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and "is a QLoRA run: its base was trained in 4-bit (nf4" in lines[-1]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_run_on_a_full_precision_base_has_no_quantized_weights(trained):
    assert inspect_checkpoint(trained("engine-z3-bf16").checkpoint).layout.quantized == {}

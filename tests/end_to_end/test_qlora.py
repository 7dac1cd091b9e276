"""QLoRA runs (a LoRA trained on a 4-bit NF4 base with bitsandbytes), from real DeepSpeed runs on the CPU:
found from the checkpoint's quant-state entries, shown by ``inspect``, merged into the 4-bit weights
dequantized as training saw them (held to the trained 4-bit model's own outputs and to bitsandbytes +
PEFT's maths), and never taken for weights where a path cannot dequantize them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fixtures.models import save_base
from zero2merged import convert, inspect_checkpoint, verify
from zero2merged.checks.parity import SAVE_TOLERANCES, compare
from zero2merged.cli import main

pytest.importorskip("bitsandbytes")  # the fixtures are trained on a 4-bit base: `pip install -e '.[dev]'` has it

from fixtures.qlora import QLORA_LORA, QLORA_SPECS, build_qlora, checkpoint_of  # noqa: E402

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


def _logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("name", QLORA_SPECS)
def test_the_merge_reproduces_the_trained_4bit_model(qlora, tmp_path, name):
    """Merged into the 4-bit weights dequantized, the model gives what the trained model (the 4-bit base with
    the adapter, run by the live engine in bf16) gave, within the bf16 budget of a saved model; the original
    base alone is nowhere near (so the comparison can fail)."""
    checkpoint, root = qlora(name), build_qlora(name)
    report = convert(checkpoint, tmp_path / "merged")
    assert report.stage("merge").result.layers == 6  # q, v and up in each of 2 layers, each checked
    live = load_file(root / "live_outputs.safetensors")
    merged = compare(_logits(tmp_path / "merged", live["input_ids"]), live["outputs"])
    merged.check(SAVE_TOLERANCES["bf16"], "merged QLoRA model vs the trained 4-bit model")
    bare = compare(_logits(root / "base", live["input_ids"]), live["outputs"])
    assert bare.max_rel_diff > 10 * merged.max_rel_diff


@pytest.mark.parametrize("name", QLORA_SPECS)
def test_every_weight_is_bitsandbytes_dequantization_plus_peft_delta(qlora, tmp_path, name):
    """Against an independent reference: DeepSpeed's own consolidation of the masters, the packed bytes
    gathered from the rank files by hand (the HF Trainer's run saved none: the base's weight quantized with
    bitsandbytes as loading it in 4-bit does), bitsandbytes' dequantize_4bit, PEFT's delta in fp32. A 4-bit
    weight no LoRA touches is its dequantization exactly; a merged one within one bf16 rounding of it plus
    the delta."""
    import bitsandbytes.functional as bnb
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = qlora(name)
    convert(checkpoint, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(tag.glob("*model_states.pt"))]
    scale = QLORA_LORA["lora_alpha"] / QLORA_LORA["r"]
    quantized = inspect_checkpoint(checkpoint).layout.quantized
    base = load_file(Path(inspect_checkpoint(checkpoint).base_model) / "model.safetensors")
    for key in quantized:
        layer = key.removesuffix(".weight").removesuffix(".base_layer")
        if key in (states[0].get("frozen_param_fragments") or {}):
            packed = torch.cat([s["frozen_param_fragments"][key].view(-1) for s in states]).view(-1, 1)
            parts = {k.removeprefix(f"{key}."): v for k, v in states[0]["module"].items() if k.startswith(f"{key}.")}
            state = bnb.QuantState.from_dict(parts, device="cpu")
        else:
            original = base[layer.removeprefix("base_model.model.") + ".weight"]
            packed, state = bnb.quantize_4bit(original, blocksize=64, quant_type="nf4")
            assert torch.equal(state.absmax, states[0]["module"][f"{key}.absmax"])  # as the run quantized it
        weight = bnb.dequantize_4bit(packed, state).float()
        a, b = masters.get(f"{layer}.lora_A.default.weight"), masters.get(f"{layer}.lora_B.default.weight")
        expected = weight if a is None else weight + scale * (b.float() @ a.float())
        out = merged[layer.removeprefix("base_model.model.") + ".weight"].float()
        if a is None:
            assert torch.equal(out, weight), key
        else:
            assert torch.allclose(out, expected, rtol=2**-8, atol=0), key  # one bf16 rounding (8 bits)
            assert not torch.equal(out, weight.bfloat16().float()), key  # the delta is there


@pytest.mark.parametrize("name", QLORA_SPECS)
def test_verify_holds_the_merged_model_to_the_trained_4bit_one(qlora, tmp_path, name):
    checkpoint = qlora(name)
    convert(checkpoint, tmp_path / "merged")
    report = verify(tmp_path / "merged", checkpoint)
    assert report.passed and report.reference.startswith("the trained model (its 4-bit base weights dequantized")
    result = CliRunner().invoke(
        main, ["verify", str(tmp_path / "merged"), "--checkpoint", str(checkpoint), "--in-memory"]
    )
    assert result.exit_code == 2 and "is a QLoRA run" in result.stderr and "streaming only" in result.stderr


@pytest.mark.parametrize(
    ("name", "says"),
    [("qlora-z3", "differ from the base model's"), ("qlora-trainer-z3", "does not give the scales the checkpoint")],
)
def test_a_base_other_than_the_one_quantized_for_training_is_refused(qlora, tmp_path, name, says):
    """The sampled check of stage 4: the base's rows, quantized with the saved settings, must give the saved
    4-bit bytes and scales (the HF Trainer's run saved the scales alone); another base's do not."""
    other = tmp_path / "other"
    save_base("llama", "causal_lm", torch.bfloat16, other, {"initializer_range": 0.05})
    args = ["convert", str(qlora(name)), "--output", str(tmp_path / "out"), "--base-model", str(other)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and says in result.stderr.strip().splitlines()[-1], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export-adapter", "convert --in-memory"])
def test_what_is_not_built_yet_stops_in_one_line(qlora, tmp_path, command):
    """export-adapter and the in-memory path would take packed bytes for weights."""
    checkpoint = qlora("qlora-z3")
    verb, *flags = command.split()
    args = [verb, str(checkpoint), "--output", str(tmp_path / "out"), *flags]
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and "is a QLoRA run" in lines[-1], lines[-1]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_run_on_a_full_precision_base_has_no_quantized_weights(trained):
    assert inspect_checkpoint(trained("engine-z3-bf16").checkpoint).layout.quantized == {}


def test_without_bitsandbytes_a_qlora_run_stops_in_one_line_naming_the_extra(qlora, tmp_path, monkeypatch):
    for module in ("bitsandbytes", "bitsandbytes.functional"):
        monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    result = CliRunner().invoke(main, ["convert", str(qlora("qlora-z3")), "--output", str(tmp_path / "out")])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "pip install 'zero2merged[qlora]'" in lines[-1], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["qlora-z3", "qlora-trainer-z3"])
def test_helper_processes_write_the_same_bytes(qlora, tmp_path, name):
    """Each helper reads (or makes) its share's 4-bit weights itself: the files are the same."""
    one = convert(qlora(name), tmp_path / "one", max_shard_size="60KB")
    two = convert(qlora(name), tmp_path / "two", max_shard_size="60KB", workers=2)
    assert two.stage("merge").result.processes == 2 and one.stage("merge").result.files > 2
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_a_damaged_quant_state_is_one_line(qlora, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qlora("qlora-z3"), run)
    tag = run / (run / "latest").read_text().strip()
    for path in tag.glob("*model_states.pt"):  # the test's own torch.save: a loadable file of other content
        state = torch.load(path, map_location="cpu", weights_only=False)
        key = next(k for k in state["module"] if ".quant_state." in k)
        state["module"][key] = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
        torch.save(state, path)
    result = CliRunner().invoke(main, ["inspect", str(run)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "the 4-bit quant state of" in lines[-1] and "is damaged" in lines[-1]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["qlora-z3", "qlora-trainer-z3"])
def test_merge_into_base_is_peft_merge_on_the_original_base_and_says_how_far_it_is(qlora, tmp_path, name):
    """--merge-into base against PEFT's own merge on the original base (the base in fp32, DeepSpeed's
    consolidation of the masters loaded into PEFT's wrapper, merge_and_unload): every merged weight within one
    bf16 rounding, the 4-bit weights no LoRA touches exactly the base's; the report says what it was merged
    into and how far the base lies from the dequantized weights, and the trained model is further from it than
    from the default merge (verify measures it against the trained model)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, get_peft_model

    checkpoint = qlora(name)
    report = convert(checkpoint, tmp_path / "base-merged", merge_into="base")
    qlora_record = report.stage("merge").result.qlora
    assert qlora_record["merged_into"] == "base" and qlora_record["max_rel_diff"] > 0.01  # NF4: a few % of a weight
    assert "merged into the original base" in report.summary()
    assert "merged into the original base" in (tmp_path / "base-merged" / "README.md").read_text()
    merged = load_file(tmp_path / "base-merged" / "model.safetensors")
    base = load_file(Path(inspect_checkpoint(checkpoint).base_model) / "model.safetensors")
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    info = inspect_checkpoint(checkpoint)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(info.base_model, dtype=torch.float32), LoraConfig(**QLORA_LORA)
    )
    trained = {k: v for k, v in masters.items() if ".lora_" in k}  # the packed 4-bit "weights" are not weights
    assert not peft_model.load_state_dict(trained, strict=False).unexpected_keys
    reference = peft_model.merge_and_unload().state_dict()
    for key in info.layout.quantized:
        layer = key.removesuffix(".weight").removesuffix(".base_layer")
        name = layer.removeprefix("base_model.model.") + ".weight"
        if f"{layer}.lora_A.default.weight" not in trained:
            assert torch.equal(merged[name], base[name]), key
        else:
            assert torch.allclose(merged[name].float(), reference[name], rtol=2**-8, atol=0), key
            assert not torch.equal(merged[name], base[name]), key  # the delta is there
    convert(checkpoint, tmp_path / "trained")
    as_trained, as_base = verify(tmp_path / "trained", checkpoint), verify(tmp_path / "base-merged", checkpoint)
    assert as_base.parity["max_rel_diff"] > 2 * as_trained.parity["max_rel_diff"]


def test_merge_into_base_on_a_full_precision_run_is_one_line(trained, tmp_path):
    args = ["convert", str(trained("engine-z3-bf16").checkpoint), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--merge-into", "base"])
    assert (
        result.exit_code == 2 and "--merge-into base applies to a QLoRA run" in result.stderr.strip().splitlines()[-1]
    )

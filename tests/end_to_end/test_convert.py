"""End to end on real checkpoints: the merged output matches DeepSpeed's consolidation + PEFT's merge,
loads with the plain Auto class, and reproduces what the live engine computed at training time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import zero2merged
from fixtures import TESTED
from fixtures.models import auto_class
from tests.helpers import (
    FP32_ATOL,
    FP32_RTOL,
    as_saved,
    assert_reproduces_live,
    assert_within_one_rounding,
    base_state,
    convert_fixture,
    reference_model,
    saved_state,
    tied_groups,
)

pytestmark = pytest.mark.slow

CONVERTIBLE = TESTED
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_output_matches_deepspeed_consolidation_plus_peft_merge(converted, name):
    fixture, output, report = converted(name)
    merged = reference_model(fixture)
    reference = as_saved(merged)  # named and shaped as the files are (transformers' own reversal of its layout)
    ours = saved_state(output)
    assert set(ours) <= set(reference)
    # Tied weights are written once: every name left out shares storage with one written.
    for group in tied_groups(reference):
        assert len(set(group) & set(ours)) == 1, group
    assert set(reference) - set(ours) <= {name for group in tied_groups(reference) for name in group}
    expected_dtype = DTYPES[fixture.spec.base_dtype or fixture.spec.dtype]
    for key, ours_tensor in ours.items():
        ref = reference[key]
        assert ours_tensor.dtype == expected_dtype, key
        if expected_dtype == torch.float32:  # PEFT's merge on both sides; a delta summed in another order
            torch.testing.assert_close(ours_tensor, ref, rtol=FP32_RTOL, atol=FP32_ATOL, msg=key)
        else:
            assert_within_one_rounding(ours_tensor, ref, key)
    # The adapter really moved weights, so a conversion that dropped it would fail above: by more than 0.05 of
    # some tensor's largest magnitude, 12 bf16 rounding steps (2^-8 each); measured 0.33 to 4.5 on the fixtures.
    base, in_modules = base_state(fixture), merged.state_dict()
    moved = max(
        ((in_modules[k] - t).abs().max() / t.abs().max()).item()
        for k, t in base.items()
        if k in in_modules and in_modules[k].shape == t.shape and t.is_floating_point()
    )
    assert moved > 0.05
    # Each layer merged vs unmerged, both fp32: outputs ~1e-6 apart, so no top-1 feature of a probe row can flip
    # unless two of them lie that close (a chance of about 1e-6 per row).
    assert report.stage("merge").metrics["parity"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_output_reproduces_the_live_engine(converted, name):
    fixture, output, _ = converted(name)
    assert_reproduces_live(fixture, auto_class(fixture.spec.task).from_pretrained(output, dtype=torch.float32))


def test_output_loads_without_zero2merged_or_peft(converted):
    fixture, output, _ = converted("trainer-z3-bf16")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(output)!r})
        live = load_file({str(fixture.live_outputs)!r})
        with torch.no_grad():
            logits = model.float()(input_ids=live["input_ids"]).logits
        torch.save(logits, {str(output.parent / "logits.pt")!r})
        print(json.dumps({{"dtype": str(model.dtype),
                          "imported": [m for m in ("peft", "zero2merged", "deepspeed") if m in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert_reproduces_live(fixture, logits=torch.load(output.parent / "logits.pt"))


def test_tokenizer_and_generation_config_carried_over(converted):
    fixture, output, report = converted("engine-z3-bf16")
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("t5 t6 t7")["input_ids"] == AutoTokenizer.from_pretrained(fixture.base)("t5 t6 t7")["input_ids"]
    generation = GenerationConfig.from_pretrained(output)
    assert (generation.temperature, generation.top_p, generation.do_sample) == (0.7, 0.9, True)
    served = report.stage("save").result.served
    assert (served.tokenizer_from, served.generation_config_from, served.changed) == (str(fixture.base),) * 2 + ([],)
    assert f"| generation config | `{fixture.base}` |" in (output / "README.md").read_text()


def test_sharded_output_with_index(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    output = tmp_path / "merged"
    convert_fixture(fixture, output, max_shard_size="100KB", dtype="fp32")
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((output / shard).is_file() for shard in shards)
    reference = reference_model(fixture).state_dict()
    ours = saved_state(output)
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=FP32_RTOL, atol=FP32_ATOL, msg=key)
    assert AutoModelForCausalLM.from_pretrained(output).dtype == torch.float32


def test_output_that_is_not_empty_is_refused(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(zero2merged.OutputError, match="not empty"):
        convert_fixture(fixture, output)
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".*partial"))


def test_model_card_and_run_report_say_where_the_model_came_from(converted):
    fixture, output, report = converted("trainer-z3-bf16")
    card = (output / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert f"`{fixture.checkpoint}`" in card and f"`{report.tag}` (optimizer step {fixture.spec.steps})" in card
    for library in ("zero2merged", "deepspeed", "peft", "transformers", "torch"):
        assert f"{library} {version(library)}" in card
    parity = report.stage("merge").metrics["parity"]
    assert f"max abs diff {parity['max_abs_diff']:.3g}" in card
    saved = json.loads((Path(report.work_dir) / "report.json").read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))

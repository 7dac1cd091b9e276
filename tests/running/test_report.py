"""The run's report, inspect's findings and the model card, rendered from typed results; results round-trip
through JSON (what a skipped stage hands on is what a run one did)."""

from __future__ import annotations

import json

import pytest

from zero2merged.core.errors import VerificationError
from zero2merged.core.results import (
    CheckpointInfo,
    ConsolidateResult,
    LoadResult,
    MergeResult,
    Parity,
    RebuildResult,
    ResizedVocab,
    SaveResult,
    Served,
    Tolerance,
    ZeroLayout,
    human_size,
)
from zero2merged.running import modelcard
from zero2merged.running.report import ConvertReport, StageReport, format_info

LAYOUT = ZeroLayout(
    zero_stage=3,
    world_size=2,
    dtype="bf16",
    ds_version="0.19.8",
    global_step=6,
    trainable=[
        {"base_model.model.q.lora_A.default.weight": [8, 64], "base_model.model.q.lora_B.default.weight": [64, 8]}
    ],
    frozen={"base_model.model.q.base_layer.weight": [64, 64]},
    frozen_source="frozen_param_fragments",
    buffers={},
    model_files=["m0.pt", "m1.pt"],
    optim_files=["o0.pt", "o1.pt"],
)
INFO = CheckpointInfo(
    checkpoint="/runs/a/checkpoint-6",
    tag="global_step6",
    tags=["global_step3", "global_step6"],
    checkpoints=["checkpoint-3", "checkpoint-6"],
    layout=LAYOUT,
    adapter_config_path="/runs/a/checkpoint-6/adapter_config.json",
    lora_config={"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
    adapter_name="default",
    base_model="/models/base",
    features=["DoRA (magnitude vectors ...)"],
    warnings=["frozen params were not saved"],
)
PARITY = Parity(max_abs_diff=7.15e-07, max_rel_diff=2e-7, top1_agreement=1.0, positions=16)
REBUILT = RebuildResult(
    auto_class="AutoModelForCausalLM",
    model_class="LlamaForCausalLM",
    peft_class="PeftModel",
    base_model="/models/base",
    base_dtype="bf16",
    lora={"r": 8},
    resized_vocab=ResizedVocab(base_rows=256, rows=264, modules=["model.embed_tokens"]),
    base_keys={"base_model.model.q.base_layer.weight": ["q.weight"]},
)


def _report(merged: MergeResult, saved: SaveResult) -> ConvertReport:
    results = {
        "inspect": INFO,
        "consolidate": ConsolidateResult(2, 1, 1, 0, 15_500, 5000),
        "rebuild": REBUILT,
        "load": LoadResult(2, 21, 1, [], sources={"k": ["f", "k"]}),
        "merge": merged,
        "save": saved,
    }
    stages = [
        StageReport(name, "ran" if name != "inspect" else "skipped", 0.25, result) for name, result in results.items()
    ]
    return ConvertReport(
        checkpoint=INFO.checkpoint,
        tag=INFO.tag,
        output="/out/merged",
        work_dir="/out/work",
        dtype="bf16",
        stages=stages,
        warnings=INFO.warnings,
    )


STREAMED = (
    MergeResult(PARITY, layers=4, files=1, processes=1),
    SaveResult("/out/merged", "bf16", 6, 224_600, Served("/models/base", None, "/models/base")),
)
ALIGNED = Served(
    "/runs/a/checkpoint-6",
    "/runs/a/checkpoint-6",
    "/models/base",
    ["generation_config.json eos_token_id: 2 -> [2, 260] (the tokenizer's eos_token <|im_end|>)"],
)
IN_MEMORY = (
    MergeResult(PARITY),
    SaveResult("/out/merged", "bf16", 6, 224_600, ALIGNED, Parity(0.01, 0.004, 0.99, 128)),
)


def test_summary_has_a_line_per_stage_and_the_parity_figures():
    lines = _report(*STREAMED).summary().splitlines()
    assert lines[0] == "/runs/a/checkpoint-6 [global_step6] -> /out/merged (bf16)"
    assert lines[1].split() == ["inspect", "skipped", "0.25", "s", "ZeRO-3,", "2", "ranks,", "bf16"]
    assert lines[2].endswith("2 trainable + 1 frozen tensors, 15.5 KB")
    assert lines[3].endswith("LlamaForCausalLM wrapped by PeftModel")
    assert lines[4].endswith("2 tensors from the checkpoint, 21 from the base")
    assert lines[5].endswith("4 LoRA layers merged one at a time, each checked")
    assert lines[6].endswith("6 files, 224.6 KB")
    assert (
        lines[7] == "  parity merged vs unmerged (each LoRA layer, fp32): max abs diff 7.15e-07, top-1 agreement 1.0000"
    )
    assert lines[8] == "  note: frozen params were not saved"
    in_memory = _report(*IN_MEMORY).summary()
    assert "  special token ids rewritten: generation_config.json eos_token_id: 2 -> [2, 260]" in in_memory
    assert "merge_and_unload, parity checked" in in_memory and "(model outputs, fp32)" in in_memory
    assert "parity saved (bf16) vs fp32 merge: max abs diff 0.01, top-1 agreement 0.9900" in in_memory


def test_report_json_keeps_the_figures_and_leaves_the_hand_offs_out():
    data = json.loads(json.dumps(_report(*STREAMED).to_dict()))
    metrics = {stage["name"]: stage["metrics"] for stage in data["stages"]}
    assert metrics["inspect"] == {
        "zero_stage": 3,
        "world_size": 2,
        "dtype": "bf16",
        "trainable": 2,
        "frozen": 1,
        "frozen_saved": True,
    }
    assert "base_keys" not in metrics["rebuild"] and metrics["rebuild"]["resized_vocab"]["rows"] == 264
    assert "sources" not in metrics["load"] and metrics["load"]["from_base"] == 21
    assert metrics["merge"] == {"parity": PARITY.to_dict(), "layers": 4, "files": 1, "processes": 1}
    assert metrics["save"]["served"]["tokenizer_from"] == "/models/base" and "parity" not in metrics["save"]
    assert SaveResult.from_dict(json.loads(json.dumps(IN_MEMORY[1].to_dict()))) == IN_MEMORY[1]


@pytest.mark.parametrize(
    "result",
    [
        INFO,
        REBUILT,
        LoadResult(1, 2, 3, ["x"], {"k": ["f", "n"]}),
        STREAMED[0],
        IN_MEMORY[1],
        ConsolidateResult(1, 2, 3, 4, 5, 6),
    ],
)
def test_results_round_trip_through_json_as_the_same_typed_records(result):
    again = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    if isinstance(result, CheckpointInfo):
        assert isinstance(again.layout, ZeroLayout) and again.layout.trainable_shapes == LAYOUT.trainable_shapes
    if isinstance(result, RebuildResult):
        assert isinstance(again.resized_vocab, ResizedVocab)


def test_parity_is_checked_against_a_tolerance_and_the_worst_is_kept():
    PARITY.check(Tolerance(max_rel_diff=1e-4, min_top1=0.99), "fine")
    with pytest.raises(VerificationError, match="drifted: outputs differ beyond tolerance"):
        Parity(1.0, 0.5, 1.0, 4).check(Tolerance(max_rel_diff=1e-4, min_top1=0.99), "drifted")
    worst = PARITY.worse(Parity(1e-3, 1e-5, 0.75, 4))
    assert worst == Parity(1e-3, 1e-5, 0.75, 20)


def test_inspect_findings_read_as_a_block():
    text = format_info(INFO)
    assert "checkpoints  checkpoint-3, checkpoint-6 (chosen)" in text
    assert "tags         global_step3, global_step6 (chosen)" in text
    assert "ZeRO         stage 3, 2 ranks, bf16, DeepSpeed 0.19.8" in text
    assert "trainable    2 tensors, 1,024 params, 4.1 KB (fp32 masters)" in text
    assert "frozen       1 tensors, 4,096 params, 8.2 KB, saved (frozen_param_fragments)" in text
    assert "LoRA         r=8, alpha=16, targets q_proj, v_proj, adapter 'default'" in text
    assert "detected     DoRA" in text and text.endswith("note: frozen params were not saved")


@pytest.mark.parametrize(
    "count,text", [(0, "0 B"), (999, "999 B"), (15_500, "15.5 KB"), (1.5e9, "1.5 GB"), (3e15, "3000.0 TB")]
)
def test_human_sizes(count, text):
    assert human_size(count) == text


def test_model_card_names_where_the_model_came_from_and_how_it_was_checked():
    streamed = modelcard.render(INFO, dtype="bf16", merged=STREAMED[0], save_parity=None, served=STREAMED[1].served)
    assert streamed.startswith('---\nbase_model: "/models/base"\nlibrary_name: transformers\n')
    assert "| tag | `global_step6` (optimizer step 6) |" in streamed
    assert "| ZeRO | stage 3, 2 ranks, bf16 training, saved by DeepSpeed 0.19.8 |" in streamed
    assert "max abs diff 7.15e-07, top-1 agreement 1.0000 over 4 layers." in streamed
    assert "reloaded with the plain Auto class" not in streamed
    assert (
        "| tokenizer | `/models/base` |\n| chat template | none |\n| generation config | `/models/base` |" in streamed
    )
    assert "agree with the tokenizer" in streamed and "rewritten" not in streamed
    in_memory = modelcard.render(
        INFO, dtype="bf16", merged=IN_MEMORY[0], save_parity=IN_MEMORY[1].parity, served=ALIGNED
    )
    assert "PEFT `merge_and_unload`, fp32" in in_memory
    assert "This bf16 model reloaded with the plain Auto class vs the fp32 merge: max abs diff 0.01" in in_memory
    assert "| chat template | `/runs/a/checkpoint-6` |" in in_memory
    assert "- generation_config.json eos_token_id: 2 -> [2, 260] (the tokenizer's eos_token <|im_end|>)" in in_memory
    again = modelcard.render(INFO, dtype="bf16", merged=STREAMED[0], save_parity=None, served=STREAMED[1].served)
    assert again == streamed  # no timestamps

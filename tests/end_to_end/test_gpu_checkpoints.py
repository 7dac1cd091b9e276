"""Checkpoints trained on a GPU (``fixtures/gpu/``: fp16 with a dynamic loss scaler, CUDA tensors in the rank
files, NCCL; ZeRO-2 Llama with LoRA on every linear layer, ZeRO-3 GPT-2 with Conv1D and tied embeddings),
which the CPU fixtures cannot make: converted here, on the CPU, and judged as the CPU fixtures are, against
DeepSpeed's consolidation + PEFT's merge and against the live engine's logits recorded on the GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import zero2merged
from tests.helpers import (
    as_saved,
    assert_within_one_rounding,
    main_output,
    reference_consolidated,
    rounding_budget,
    saved_state,
    tied_groups,
)
from zero2merged.checkpoint.layout import rank_files
from zero2merged.cli import main
from zero2merged.files.zipcheck import zip_records

pytestmark = pytest.mark.slow

GPU = Path(__file__).resolve().parents[2] / "fixtures" / "gpu"
CASES = sorted(path.name for path in GPU.iterdir() if (path / "case.json").is_file())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``converted(case)`` -> (the case's copy, its checkpoint folder, the merged output): converted once."""
    done = {}

    def get(case: str):
        if case not in done:
            root = tmp_path_factory.mktemp(case) / case
            shutil.copytree(GPU / case, root)  # the originals are never written to
            checkpoint = root / json.loads((root / "case.json").read_text())["checkpoint"]
            output = root.parent / "merged"
            zero2merged.convert(checkpoint, output, base_model=root / "base")
            done[case] = root, checkpoint, output
        return done[case]

    return get


def _reference(root: Path, checkpoint: Path):
    """DeepSpeed's consolidation of the GPU-made rank files, merged by PEFT in fp32 on the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig.from_pretrained(checkpoint))
    state = {k: v.float().cpu() for k, v in reference_consolidated(checkpoint).items()}
    assert not model.load_state_dict(state, strict=False).unexpected_keys
    return model.merge_and_unload()


@pytest.mark.parametrize("case", CASES)
def test_matches_deepspeed_consolidation_plus_peft_merge(converted, case):
    root, checkpoint, output = converted(case)
    reference = as_saved(_reference(root, checkpoint))
    ours = saved_state(output)
    assert set(ours) <= set(reference)
    for group in tied_groups(reference):  # tied weights are written once
        assert len(set(group) & set(ours)) == 1, group
    for key, tensor in ours.items():
        assert tensor.dtype == torch.float16, key  # the base's dtype
        assert_within_one_rounding(tensor, reference[key], key)


@pytest.mark.parametrize("case", CASES)
def test_reproduces_the_live_engine_on_the_gpu(converted, case):
    """Within twice what rounding alone puts between the exact outputs and the live engine's (fp16) plus
    ours (weights rounded to fp16, run in fp32), as for the CPU fixtures; the bare base falls outside.
    Measured: 1.05 (GPT-2) and 1.38 (Llama) times that budget, the bare base 738 and 308 times; the GPU's
    fp16 kernels round differently from this CPU run of the reference in fp16, hence above the CPU
    fixtures' 1.18."""
    from transformers import AutoModelForCausalLM

    root, checkpoint, output = converted(case)
    golden = torch.load(root / "golden.pt", map_location="cpu")
    inputs, live = {"input_ids": golden["input_ids"]}, golden["output"].double()
    scale = live.abs().max()
    allowed = 2 * rounding_budget(_reference(root, checkpoint), torch.float16, torch.float16, inputs, scale)
    ours = main_output(AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32), inputs).double()
    assert ((ours - live).abs().max() / scale).item() <= allowed
    bare = main_output(AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32), inputs).double()
    assert ((bare - live).abs().max() / scale).item() > allowed
    top2 = live.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * allowed * scale
    assert clear.any() and (ours.argmax(-1) == live.argmax(-1))[clear].all()


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_gpu_made_rank_file_is_refused(tmp_path, case):
    """The CRC-32 checks hold for rank files written from CUDA tensors too."""
    root = tmp_path / case
    shutil.copytree(GPU / case, root)
    checkpoint = root / json.loads((root / "case.json").read_text())["checkpoint"]
    tag = checkpoint / (checkpoint / "latest").read_text().strip()
    optim_file = rank_files(tag)[1][0]
    with open(optim_file, "r+b") as f:  # a byte in the middle of every tensor record: masters and moments
        for record in (r for r in zip_records(optim_file) if "/data/" in r.name):
            f.seek(record.start + record.size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x5A]))
    args = ["convert", str(checkpoint), "-o", str(tmp_path / "out"), "--base-model", str(root / "base")]
    result = CliRunner().invoke(main, args)
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and line.startswith(f"error: {optim_file.resolve()}: record ") and "CRC-32" in line

"""``verify`` a block at a time: the same figures as the whole-model check, with one block's weights in memory.

Both models run from their files on real DeepSpeed checkpoints of every kind of layout: tied embeddings,
an encoder-decoder, fused MoE experts with LoRA on them, vision-language models (whose files and modules
name weights differently), DoRA and LoRA on an embedding (PEFT layers whose forward reads their factors
directly), a vocabulary grown for training.
"""

from __future__ import annotations

import pytest
import torch

from zero2merged import verify
from zero2merged.api.verify import merged_from_disk
from zero2merged.checks.blockwise import DiskWeights
from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.safetensors_writer import Writer

pytestmark = pytest.mark.slow

LAYOUTS = [
    "engine-z3-bf16",
    "gpt2-tied-z3",
    "t5-seq2seq-z3",
    "mixtral-experts-z3",
    "qwen3-moe-experts-z2",
    "qwen2-vl-z3",
    "llava-z2",
    "dora-z2",
    "embedding-lora-z3",
    "resized-vocab-trainer-z3",
]


@pytest.mark.parametrize("name", LAYOUTS)
def test_block_at_a_time_gives_the_whole_model_figures(converted, name):
    """Both ways compute the same fp32 forward on the same weights: the figures agree to fp32 rounding (the
    summation order of a matmul may differ with a tensor's memory layout: 1e-5 of the reference's largest
    output is tens of fp32 roundings), and the verdict is the same."""
    fixture, output, _ = converted(name)
    blockwise = verify(output, fixture.checkpoint)
    whole = verify(output, fixture.checkpoint, in_memory=True)
    assert blockwise.passed and whole.passed
    for key in ("max_abs_diff", "max_rel_diff"):
        assert blockwise.parity[key] == pytest.approx(whole.parity[key], rel=1e-5, abs=1e-7)
    assert blockwise.parity["top1_agreement"] == whole.parity["top1_agreement"]


def test_only_one_block_has_its_weights_while_a_model_runs(converted):
    """At every module's forward, the weights off the meta device are at most one decoder block's, or one
    module's own outside the blocks: nothing accumulates."""
    fixture, output, _ = converted("engine-z3-bf16")
    model = merged_from_disk("AutoModelForCausalLM", output)
    blocks = list(model.model.layers)
    largest = max(
        max(sum(p.numel() for p in block.parameters()) for block in blocks),
        max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    )
    seen = []

    def count(*_):
        seen.append(sum(p.numel() for p in model.parameters() if p.device.type != "meta"))

    for module in model.modules():
        module.register_forward_pre_hook(count)
        module.register_forward_hook(count)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert max(seen) <= largest and max(seen) > 0
    assert all(p.device.type == "meta" for p in model.parameters())  # all given back after the run


def test_weights_are_read_in_fp32_a_chunk_at_a_time(tmp_path):
    """A 16-bit weight comes back in fp32, value for value, whatever chunks it was read in."""
    weight = torch.randn(300, 70).to(torch.bfloat16)
    path = tmp_path / "w.safetensors"
    with Writer(path, {"w": (torch.bfloat16, [300, 70]), "b": (torch.int64, [3])}, {}) as writer:
        writer.write("w", weight)
        writer.write("b", torch.tensor([1, 2, 3]))
    weights = DiskWeights({"layer.weight": (Reader(path), "w"), "ids": (Reader(path), "b")})
    assert torch.equal(weights["layer.weight"], weight.float()) and weights["layer.weight"].dtype == torch.float32
    assert weights["ids"].dtype == torch.int64 and "ids" in weights and "w" not in weights

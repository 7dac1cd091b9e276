"""Stage 4's comparison of the frozen weights a checkpoint saved with the base's."""

from __future__ import annotations

import pytest
import torch

from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.safetensors_writer import Writer
from zero2merged.stages.base_compare import SAMPLE_BYTES, SAMPLED_ROWS, difference, sampled_difference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("size", [8, 7])  # whole 8-byte words, and not
@pytest.mark.parametrize("offset", [0, 1])  # starting on an 8-byte address, and not
def test_frozen_weights_are_compared_by_value(dtype, size, offset):
    stored = torch.linspace(-1, 1, 16).to(dtype)
    stored[offset + 2] = 0.0
    saved = stored[offset : offset + size]
    base = saved.float().clone()
    assert difference(saved, base) is None  # equal once cast to the dtype saved
    base[2] = -0.0
    assert difference(saved, base) is None  # other bits, the same value
    base[-1] += 0.25
    assert difference(saved, base) == pytest.approx(0.25, rel=0.01)


def _stored(tmp_path, name: str, tensor: torch.Tensor) -> Reader:
    path = tmp_path / f"{name}.safetensors"
    with Writer(path, {"w": (tensor.dtype, list(tensor.shape))}, {}) as writer:
        writer.write("w", tensor)
    return Reader(path)


def test_the_sampled_compare_finds_another_models_weights_and_reads_a_sample(tmp_path):
    """Streaming, stage 4 compares a sample of rows (first and last among them) of each saved frozen tensor
    with the base's: another model's weights differ in every row, and are found; the rows read stay within
    the sample's bytes; a tensor smaller than a sample is compared whole."""
    rows, width = 5000, 512  # 10 MB in fp32: ten times a sample's budget
    saved = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    other = torch.randn(rows, width, generator=torch.Generator().manual_seed(1))
    same = _stored(tmp_path, "saved", saved)
    read = []
    same.observe = lambda file, offset, data: read.append(len(data))
    assert sampled_difference(same, "w", _stored(tmp_path, "copy", saved.clone()), "w", None) is None
    assert sum(read) <= SAMPLE_BYTES and len(read) == SAMPLED_ROWS
    assert sampled_difference(same, "w", _stored(tmp_path, "other", other), "w", None) > 1.0
    for row in (0, rows - 1):  # the first and the last rows are always in the sample
        changed = saved.clone()
        changed[row, 3] += 0.5
        assert sampled_difference(same, "w", _stored(tmp_path, f"row{row}", changed), "w", None) == 0.5
    small = torch.randn(7, 4)
    changed = small.clone()
    changed[3, 2] = 9.0  # a row no sample of a large tensor would pick: a small one is compared whole
    assert sampled_difference(_stored(tmp_path, "s", small), "w", _stored(tmp_path, "s2", changed), "w", None)
    grown = torch.cat([saved, torch.randn(10, width)])  # a vocabulary grown for training: base rows only
    assert sampled_difference(_stored(tmp_path, "g", grown), "w", _stored(tmp_path, "b", saved), "w", rows) is None

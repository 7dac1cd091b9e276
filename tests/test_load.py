"""Stage 4's comparison of the frozen weights a checkpoint saved with the base's."""

from __future__ import annotations

import pytest
import torch

from zero2merged.stages.load import _difference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("size", [8, 7])  # whole 8-byte words, and not
@pytest.mark.parametrize("offset", [0, 1])  # starting on an 8-byte address, and not
def test_frozen_weights_are_compared_by_value(dtype, size, offset):
    stored = torch.linspace(-1, 1, 16).to(dtype)
    stored[offset + 2] = 0.0
    saved = stored[offset : offset + size]
    base = saved.float().clone()
    assert _difference(saved, base) is None  # equal once cast to the dtype saved
    base[2] = -0.0
    assert _difference(saved, base) is None  # other bits, the same value
    base[-1] += 0.25
    assert _difference(saved, base) == pytest.approx(0.25, rel=0.01)

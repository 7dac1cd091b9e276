"""Parity figures and probe inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, T5Config

from zero2merged import VerificationError
from zero2merged.checks.parity import MERGE_TOLERANCE, compare, probe_inputs


def test_identical_outputs():
    logits = torch.randn(2, 5, 11)
    parity = compare(logits, logits.clone())
    assert (parity.max_abs_diff, parity.max_rel_diff, parity.top1_agreement, parity.positions) == (0, 0, 1.0, 10)
    parity.check(MERGE_TOLERANCE, "same")


def test_drift_is_measured_and_refused():
    reference = torch.zeros(1, 4, 3)
    reference[..., 0] = 2.0
    actual = reference.clone()
    actual[0, 0, 1] = 3.0  # one position's top-1 flips
    parity = compare(actual, reference)
    assert parity.max_abs_diff == 3.0 and parity.max_rel_diff == 1.5 and parity.top1_agreement == 0.75
    with pytest.raises(VerificationError, match="beyond tolerance"):
        parity.check(MERGE_TOLERANCE, "drifted")


def test_nan_outputs_never_pass():
    reference = torch.ones(1, 2, 3)
    parity = compare(torch.full_like(reference, float("nan")), reference)
    with pytest.raises(VerificationError):
        parity.check(MERGE_TOLERANCE, "nan")


def test_probe_inputs_fit_the_model():
    config = LlamaConfig(vocab_size=50, max_position_embeddings=16)
    first, second = probe_inputs(config), probe_inputs(config)
    assert torch.equal(first["input_ids"], second["input_ids"])
    assert first["input_ids"].shape == (4, 16) and int(first["input_ids"].max()) < 50
    assert "decoder_input_ids" in probe_inputs(T5Config(vocab_size=50))

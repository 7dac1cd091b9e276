"""Parity: does one model behave like another on the same probe inputs?

Both models run in fp32 on fixed, seeded probe inputs; their outputs (logits, or hidden states for a bare
encoder) are compared by max abs diff, max diff relative to the reference's largest magnitude, and top-1
agreement (how often the argmax over the last dimension is the same).
"""

from __future__ import annotations

import torch

from zero2merged.results import Parity, Tolerance

PROBE_BATCH = 4
PROBE_LENGTH = 32
PROBE_SEED = 0


# Merged vs unmerged, both fp32: only summation order differs, by a few fp32 roundings (2^-24) per layer
# carried through the model: 1e-4 is hundreds of them; a top-1 position flips only where two outputs lie
# within that of each other.
MERGE_TOLERANCE = Tolerance(max_rel_diff=1e-4, min_top1=0.99)
# A saved model in a 16-bit dtype vs the fp32 merge it was cast from: one rounding of every weight (2^-8
# relative in bf16, 2^-11 in fp16) carried through the model's layers.
SAVE_TOLERANCES = {
    "fp32": MERGE_TOLERANCE,
    "bf16": Tolerance(max_rel_diff=0.05, min_top1=0.9),
    "fp16": Tolerance(max_rel_diff=0.01, min_top1=0.95),
}


def probe_inputs(config, batch: int = PROBE_BATCH, length: int = PROBE_LENGTH, seed: int = PROBE_SEED) -> dict:
    """Seeded random token ids that fit ``config`` (its vocabulary and context length)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or length
    length = min(length, limit)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.vocab_size, (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, : max(1, length // 2)].clone()
    return inputs


@torch.no_grad()
def outputs(model, inputs: dict) -> torch.Tensor:
    """The model's main output on ``inputs`` in fp32: logits, or the last hidden state."""
    model.eval()
    result = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(result, name, None)
        if value is not None:
            return value.float()
    return result[0].float()


def compare(actual: torch.Tensor, reference: torch.Tensor) -> Parity:
    """Differences of ``actual`` from ``reference`` (same shape)."""
    actual, reference = actual.float(), reference.float()
    diff = (actual - reference).abs()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    finite = bool(torch.isfinite(actual).all())
    return Parity(
        max_abs_diff=diff.max().item() if finite else float("inf"),
        max_rel_diff=(diff.max() / scale).item() if finite else float("inf"),
        top1_agreement=(actual.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        positions=reference[..., 0].numel(),
    )

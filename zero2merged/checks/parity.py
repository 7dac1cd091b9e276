"""Parity: does one model behave like another on the same probe inputs?

Both models run in fp32 on fixed, seeded probe inputs; their outputs (logits, or hidden states for a bare
encoder) are compared by max abs diff, max diff relative to the reference's largest magnitude, and top-1
agreement (how often the argmax over the last dimension is the same).

A mixture-of-experts model is not continuous in its weights: where a token's router scores two experts
nearly alike, rounding the weights (to bf16, say) can send it to the other one, and its outputs jump. So
the differences are measured with the compared model's routers following the reference's choices (each
router's outputs replayed, in call order), which leaves only what the weights change continuously; and the
top-1 agreement with the routers left free, so that a router gone wrong still shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from zero2merged.core.results import Parity, Tolerance

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


def routed_outputs(model, inputs: dict, routes: list | None = None) -> tuple[torch.Tensor, list]:
    """:func:`outputs`, with the outputs of every MoE router recorded in call order (the experts each token
    goes to and their weights); given ``routes``, the routers return those instead (the same choices as the
    run that recorded them). A model without routers records none."""
    with _routing(model, routes) as recorded:
        return outputs(model, inputs), recorded


def compare_models(actual, reference, inputs: dict) -> Parity:
    """:func:`compare` of two models' outputs on ``inputs``: differences with ``actual``'s routers following
    ``reference``'s choices, top-1 agreement with them free (see the module's doc)."""
    expected, routes = routed_outputs(reference, inputs)
    return compare_routed(actual, inputs, expected, routes)


def compare_routed(actual, inputs: dict, expected: torch.Tensor, routes: list) -> Parity:
    """:func:`compare_models` against a reference run's recorded outputs and routes."""
    pinned = compare(outputs_following(actual, inputs, routes), expected)
    if not routes:
        return pinned
    free = compare(outputs(actual, inputs), expected)
    return Parity(pinned.max_abs_diff, pinned.max_rel_diff, free.top1_agreement, pinned.positions)


def outputs_following(model, inputs: dict, routes: list) -> torch.Tensor:
    """:func:`outputs` with the model's routers following the recorded ``routes``."""
    return routed_outputs(model, inputs, routes)[0] if routes else outputs(model, inputs)


def routes_to_tensors(routes: list) -> dict[str, torch.Tensor]:
    """Recorded routes as named tensors (for a safetensors file): ``route.I.J`` for the J-th tensor of the
    I-th router call's output (``route.I`` where it is one tensor)."""
    flat = {}
    for i, output in enumerate(routes):
        parts = output if isinstance(output, tuple) else (output,)
        flat.update(
            {
                f"route.{i}.{j}" if isinstance(output, tuple) else f"route.{i}": t.contiguous()
                for j, t in enumerate(parts)
            }
        )
    return flat


def routes_from_tensors(tensors: dict[str, torch.Tensor]) -> list:
    """The routes :func:`routes_to_tensors` named, taken out of ``tensors``."""
    calls: dict[int, dict[int, torch.Tensor]] = {}
    for name in [n for n in tensors if n.startswith("route.")]:
        _, i, *j = name.split(".")
        calls.setdefault(int(i), {})[int(j[0]) if j else -1] = tensors.pop(name)
    return [parts[-1] if -1 in parts else tuple(parts[j] for j in sorted(parts)) for _, parts in sorted(calls.items())]


def _like(replayed: Any, output: Any) -> Any:
    """A replayed router output in the dtypes (and device) of the output it replaces: a route recorded from
    a bf16 run may steer an fp32 one."""
    if isinstance(output, tuple):
        return tuple(_like(r, o) for r, o in zip(replayed, output, strict=True))
    return replayed.to(device=output.device, dtype=output.dtype)


def _routers(model) -> list:
    """A MoE model's routers: the modules transformers records its router logits from
    (``_can_record_outputs``), where those are routers; else (transformers 4 records them from the whole MoE
    block, or not at all) the ``gate`` or ``router`` beside each ``experts``."""
    recorded = set()
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(recorder, "target_class", recorder)
        if isinstance(target, type):
            recorded.add(target)
    found = [m for m in model.modules() if recorded and isinstance(m, tuple(recorded))]
    if found and not any(hasattr(m, "experts") for m in found):
        return found
    return [
        router
        for module in model.modules()
        if hasattr(module, "experts")
        for router in (getattr(module, "gate", None), getattr(module, "router", None))
        if isinstance(router, torch.nn.Module)
    ]


@contextlib.contextmanager
def _routing(model, routes: list | None) -> Iterator[list]:
    """Within the block, the routers' outputs are appended to the yielded list, or (given ``routes``)
    replaced by the recorded ones, in call order."""
    recorded: list[Any] = []
    calls = iter(routes or [])

    def hook(module, args, output):
        if routes is None:
            recorded.append(output)
            return None
        return _like(next(calls), output)

    handles = [m.register_forward_hook(hook) for m in _routers(model)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


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

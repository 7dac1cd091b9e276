"""QLoRA: a LoRA trained on a base loaded in 4-bit by bitsandbytes, merged into the weights it was trained
against.

A QLoRA run's forward dequantizes each 4-bit weight (NF4 or FP4, a block of values per scale) and adds the
LoRA delta: the adapter learned against those dequantized weights, which differ from the original base's by the
4-bit rounding. So the merge takes them, not the base's: stage 2 keeps each weight's packed bytes (referenced
in the rank files, as any frozen weight) and its quant state (absmax, quant map, settings) in its store, and
:class:`DequantizedWeights` reads a weight as bitsandbytes' own ``dequantize_4bit`` gives it back, the
same call the training forward made (bitsandbytes is needed only here: ``pip install 'zero2merged[qlora]'``).
Everything after that is the ordinary streaming merge: PEFT's maths in fp32, the output in the base's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zero2merged.checkpoint.rankfiles import model_states
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError, OptionError
from zero2merged.core.results import CheckpointInfo
from zero2merged.files.safetensors_reader import Reader, RowChunks

QUANT_STATE = ".quant_state.bitsandbytes__"  # the JSON of a 4-bit weight's settings, beside its packed bytes
QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def settings_dtype(settings: dict) -> torch.dtype:
    """The dtype a 4-bit weight dequantizes to, from its settings (checked when they were read: ``zero.py``)."""
    return getattr(torch, str(settings["dtype"]).removeprefix("torch."))


def quant_kind(settings: dict) -> str:
    """A 4-bit weight's settings, as ``inspect`` and the messages say them."""
    nested = ", double-quantized" if settings["nested"] else ""
    packed = f"packed in {settings['storage']}" if settings["storage"] else "packed data not saved"
    packed += f", dequantized to {settings['dtype']}"
    return f"{settings['quant_type']}, block size {settings['blocksize']}, {packed}{nested}"


def merged_into(qlora: dict) -> str:
    """What a QLoRA run's merge was made into (stage 4's ``qlora`` record), said in the report and the card."""
    kinds = qlora["settings"]
    apart = (
        f"the original base's weights lie up to {qlora['max_abs_diff']:.3g} ({qlora['max_rel_diff']:.1%} of the "
        "largest weight, on the rows sampled) from the dequantized ones"
    )
    if qlora["merged_into"] == "base":
        return (
            f"QLoRA ({kinds}): merged into the original base, not the 4-bit weights the adapter was trained "
            f"against (--merge-into base): {apart}, so this is not the model that was trained; verify measures how far"
        )
    return f"QLoRA ({kinds}): merged into the 4-bit weights dequantized, as the adapter was trained; {apart}"


def bitsandbytes():
    """bitsandbytes' functional module, or one line saying how to install it."""
    try:
        import bitsandbytes.functional as functional
    except ImportError as e:
        raise OptionError(
            "this is a QLoRA run (a LoRA trained on a 4-bit base): dequantizing its base needs bitsandbytes; "
            "install it with pip install 'zero2merged[qlora]'"
        ) from e
    return functional


def as_trained(weight: torch.Tensor, settings: dict, name: str) -> torch.Tensor:
    """A base weight as a QLoRA run whose checkpoint holds no 4-bit data computed with it: quantized with
    the run's settings by bitsandbytes, as loading the base in 4-bit did (bit for bit on the CPU), and
    dequantized as its forward did."""
    functional = bitsandbytes()
    dtype = settings_dtype(settings)
    packed, state = functional.quantize_4bit(
        weight.to(dtype).contiguous(), blocksize=settings["blocksize"], quant_type=settings["quant_type"],
        compress_statistics=bool(settings["nested"]),
    )  # fmt: skip
    made = functional.dequantize_4bit(packed, state)
    if list(made.shape) != list(settings["shape"]):
        raise CheckpointError(
            f"{name}: the base's weight is {list(made.shape)}, the run's 4-bit one {settings['shape']}"
        )
    return made


def round_trip(rows: torch.Tensor, settings: dict) -> torch.Tensor:
    """Whole rows of a base weight, quantized with a run's settings and dequantized (in fp32)."""
    functional = bitsandbytes()
    dtype = settings_dtype(settings)
    packed, state = functional.quantize_4bit(
        rows.to(dtype).contiguous(), blocksize=settings["blocksize"], quant_type=settings["quant_type"]
    )
    return functional.dequantize_4bit(packed, state).float()


def quantize_rows(rows: torch.Tensor, settings: dict, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Whole rows of a weight (its values there, as the base holds them, in the run's dtype) quantized with
    a run's settings: ``(packed bytes, absmax)``, to compare with the saved ones; None where a row does not
    hold whole blocks, or double quantization hides the absmax."""
    if rows.shape[-1] % settings["blocksize"] or settings["nested"]:
        return None
    packed, state = bitsandbytes().quantize_4bit(
        rows.contiguous(), blocksize=settings["blocksize"], quant_type=settings["quant_type"], quant_storage=storage
    )
    return packed, state.absmax


def saved_absmax(store: Reader, name: str, settings: dict, first: int, count: int) -> torch.Tensor:
    """The saved scales of a 4-bit weight's rows ``[first, first + count)`` (whole blocks)."""
    blocks = settings["shape"][-1] // settings["blocksize"]
    return store.get(f"{name}.absmax", slice(first * blocks, (first + count) * blocks))


def quant_state_tensors(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The quant-state entries of the run's 4-bit weights (each rank's model-state file holds them whole)."""
    if not info.layout.quantized:
        return {}
    module = model_states(info.tag_dir / info.layout.model_files[0]).get(names.MODULE) or {}
    return {
        key: tensor.contiguous()
        for key, tensor in module.items()
        for weight in [key.split(QUANT_STATE)[0] if QUANT_STATE in key else key.rpartition(".")[0]]
        if weight in info.layout.quantized and (QUANT_STATE in key or key.rpartition(".")[2] in QUANT_PARTS)
    }


class DequantizedWeights(RowChunks):
    """The 4-bit weights of stage 2's store, each read as the tensor the run computed with: its packed bytes
    dequantized with its quant state by bitsandbytes (one weight held at a time). Reads like a
    :class:`~zero2merged.files.safetensors_reader.Reader`; stage 4 names it as a source by the store's path and
    :data:`~zero2merged.core.names.DEQUANTIZED`.

    Args:
        store: Stage 2's store.

    Attributes:
        store: Its reader (the rank files' records it reads are CRC-checked where a stage asks).
    """

    def __init__(self, store: Path):
        self.store = Reader(store)
        self.settings: dict[str, dict] = {}
        for key in self.store.keys():
            if QUANT_STATE in key:
                weight = key.split(QUANT_STATE)[0]
                self.settings[weight] = json.loads(self.store.get(key).numpy().tobytes())
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return list(self.settings)

    def __contains__(self, name: str) -> bool:
        return name in self.settings

    def dtype(self, name: str) -> torch.dtype:
        dtype = getattr(torch, str(self.settings[name]["dtype"]).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{name}: its 4-bit quant state names no dtype ({self.settings[name]['dtype']})")
        return dtype

    def shape(self, name: str) -> list[int]:
        return list(self.settings[name]["shape"])

    def nbytes(self, name: str) -> int:
        return torch.Size(self.shape(name)).numel() * self.dtype(name).itemsize

    def ranges(self, name: str) -> None:
        return None  # made, not stored: never copied file to file

    def get(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized weight (or its ``rows``); ``into`` is not used (it is made whole)."""
        if self._last is None or self._last[0] != name:
            self._last = None  # the previous one is released before the next is made
            self._last = name, self.dequantized(name)
        whole = self._last[1]
        return whole if rows is None else whole[rows]

    def dequantized(self, name: str) -> torch.Tensor:
        """``name`` dequantized as bitsandbytes' forward dequantizes it.

        Raises:
            CheckpointError: what comes back is not the shape and dtype its quant state declares.
        """
        functional = bitsandbytes()
        parts = {key.removeprefix(f"{name}."): self.store.get(key) for key in self.store.keys() if _is_part(key, name)}
        state = functional.QuantState.from_dict(parts, device=torch.device("cpu"))
        weight = functional.dequantize_4bit(self.store.get(name), state)
        if list(weight.shape) != self.shape(name) or weight.dtype != self.dtype(name):
            raise CheckpointError(
                f"{name}: its 4-bit data dequantizes to {weight.dtype} {list(weight.shape)}, its quant state "
                f"declares {self.dtype(name)} {self.shape(name)}: the checkpoint is damaged"
            )
        return weight

    def dequantized_rows(
        self, name: str, packed: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """Saved rows (:meth:`saved_rows`) dequantized, shaped like ``like``."""
        functional = bitsandbytes()
        settings = self.settings[name]
        _, state = functional.quantize_4bit(
            like.contiguous(), blocksize=settings["blocksize"], quant_type=settings["quant_type"],
            quant_storage=self.store.dtype(name),
        )  # fmt: skip
        state.absmax = absmax.contiguous()
        return functional.dequantize_4bit(packed.contiguous(), state)

    def saved_rows(self, name: str, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The saved packed bytes and absmax of the weight's rows ``[first, first + count)`` (whole blocks),
        read alone: two 4-bit values a byte, packed into elements of the storage dtype."""
        per_row = self.shape(name)[-1] // 2 // self.store.dtype(name).itemsize  # storage elements of one row
        packed = self.store.get(name, slice(first * per_row, (first + count) * per_row))
        return packed, saved_absmax(self.store, name, self.settings[name], first, count)


def is_quant_state(key: str) -> bool:
    """Whether a store's key is a 4-bit weight's quant-state entry."""
    return QUANT_STATE in key or key.rpartition(".")[2] in QUANT_PARTS


def _is_part(key: str, weight: str) -> bool:
    rest = key.removeprefix(f"{weight}.")
    return rest != key and (rest in QUANT_PARTS or rest.startswith(QUANT_STATE.lstrip(".")))

"""What a user asks for, checked before any work starts.

Two records carry every option: :class:`Source` (the trained run: its checkpoint, and where its LoRA config
and base model come from) for every command, and :class:`ConvertOptions` (the output's form and how the
conversion runs) for ``convert``. The CLI and the public functions build them from the same names, and
their ``__post_init__`` refuses a bad value up front, in one line. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zero2merged.core.errors import OptionError

OUTPUT_DTYPES = ("fp32", "bf16", "fp16")  # --dtype's choices besides "auto" (the base's dtype)
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class Source:
    """The trained run: its checkpoint, and where its LoRA config and base model come from.

    Attributes:
        checkpoint: The folder holding ``latest``, a tag folder, or a run folder holding checkpoint folders.
        tag: The tag (or checkpoint folder) to use; default: the newest (what ``latest`` names).
        adapter_config: ``adapter_config.json`` (or its folder) when none is beside the checkpoint.
        base_model: Base model path or hub id; default: the adapter config's ``base_model_name_or_path``.
        lora_alpha: With no adapter config anywhere: infer one from the checkpoint's keys, with this alpha.
        use_rslora: With ``lora_alpha``: the run used rsLoRA scaling.
        unsafe_pickle: Unpickle the rank files in full, whatever objects they hold (a pickle can run code:
            only for checkpoints you trust); by default only DeepSpeed's own classes are allowed.
        peft_model: Where the saved module holds several PEFT models: the attribute path of the one to convert
            (``"."``: the module itself); by default the only one there is.
        adapter_name: Where the model trained several adapters: the one to merge; by default the only one.
    """

    checkpoint: Path
    tag: str | None = None
    adapter_config: Path | None = None
    base_model: str | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    unsafe_pickle: bool = False
    peft_model: str | None = None
    adapter_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint).expanduser())
        for option, value in (("--peft-model", self.peft_model), ("--adapter-name", self.adapter_name)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError(f"{option} is empty: name one, or leave it out")
        if self.adapter_config is not None:
            object.__setattr__(self, "adapter_config", Path(self.adapter_config).expanduser())
        if self.base_model is not None:
            object.__setattr__(self, "base_model", str(self.base_model))
            if not self.base_model.strip():  # an unset shell variable, most likely: not "the config's base"
                raise OptionError("--base-model is empty: give the base model's folder or hub id, or leave it out")
        if self.lora_alpha is not None:
            alpha = self.lora_alpha
            number = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
            if not (number and math.isfinite(alpha) and alpha > 0):
                raise OptionError(f"--lora-alpha must be a positive number; got {alpha!r}")
            if self.adapter_config is not None:
                raise OptionError(
                    "--lora-alpha infers a LoRA config when the run saved none; with --adapter-config the "
                    "config says lora_alpha: give one of them"
                )
        elif self.use_rslora:
            raise OptionError(
                "--use-rslora goes with --lora-alpha (it says how the inferred config scales); a saved adapter "
                "config says whether the run used rsLoRA"
            )

    @property
    def inference(self) -> dict[str, Any]:
        """The options that decide the LoRA config and base when inspect finds them (its fingerprint)."""
        return {"base_model": self.base_model, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora}


@dataclass(frozen=True)
class Tuning:
    """Sizes that trade memory for speed. The files written do not depend on them; tests shrink them to
    take the paths large models take.

    Attributes:
        piece_elements: The rank files are read this many elements at a time (16 MB of fp32).
        block_bytes: A plain LoRA linear layer is merged this many bytes of its fp32 rows at a time. PEFT's
            merge makes two temporaries the size of what it merges: at 1 MB they come from memory the
            process keeps (glibc serves blocks under its mmap threshold from its heap and keeps up to twice
            that threshold free there) and stay in the caches. A whole layer's come as fresh pages from the
            kernel, every time: the merge stage took twice as long (and at 8 MB, the size glibc starts to
            give back, hardly less). A layer's memory is then this size however wide the model.
    """

    piece_elements: int = 4 << 20
    block_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.piece_elements < 1 or self.block_bytes < 1:
            raise OptionError(f"tuning sizes must be positive; got {self}")


MERGE_INTO = ("dequantized", "base")  # what a QLoRA run's adapter is merged into


@dataclass(frozen=True)
class ConvertOptions:
    """How ``convert`` writes the merged model and runs its stages.

    Attributes:
        dtype: Output dtype: ``auto`` (the base's), ``fp32``, ``bf16`` or ``fp16``.
        work_dir: Where stage artifacts and the manifest live; default ``<output>.zero2merged-work``.
        max_shard_size: Largest safetensors shard, in bytes or as ``"5GB"``, ``"500MB"`` (kept in bytes).
        force: Redo every stage even if its earlier result is still valid.
        ignore_base_mismatch: Go on when saved frozen weights differ from the base's (use the checkpoint's).
        in_memory: Load the whole model and check the merged model's outputs end to end, in several times
            the model's size of RAM. The default streams one layer at a time in memory that does not grow
            with the model, checking each merged layer's outputs; both write identical files.
        workers: Processes writing the output's shards (streaming). Inside a distributed job every rank
            writes a share instead (the work directory and the checkpoint must be on a filesystem they all
            see, at the same paths).
        device: Where the streaming merge merges and checks each layer: ``cpu`` or ``cuda[:N]``.
        merge_into: A QLoRA run's (a LoRA trained on a 4-bit base): ``dequantized``, the 4-bit weights
            dequantized as training computed with them (the trained model), or ``base``, the original base's
            (:mod:`zero2merged.checkpoint.quantized`).
        tuning: Memory/speed trade-offs (see :class:`Tuning`).
    """

    dtype: str = "auto"
    work_dir: Path | None = None
    max_shard_size: int | str = "5GB"
    force: bool = False
    ignore_base_mismatch: bool = False
    in_memory: bool = False
    workers: int = 1
    device: str = "cpu"
    merge_into: str = "dequantized"
    tuning: Tuning = field(default_factory=Tuning)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *OUTPUT_DTYPES):
            raise OptionError(f"--dtype must be auto, {', '.join(OUTPUT_DTYPES)}; got {self.dtype!r}")
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", Path(self.work_dir).expanduser())
        object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        if not isinstance(self.workers, int) or self.workers < 1:
            raise OptionError(f"--workers must be at least 1; got {self.workers}")
        _check_device(self.device)
        if self.merge_into not in MERGE_INTO:
            raise OptionError(f"--merge-into must be {' or '.join(MERGE_INTO)}; got {self.merge_into!r}")
        if self.in_memory and (self.workers > 1 or self.device != "cpu"):
            raise OptionError("--workers and --device apply to the streaming conversion; drop --in-memory to use them")

    @property
    def streaming(self) -> bool:
        return not self.in_memory


def parse_size(size: int | str) -> int:
    """A shard size in bytes, from a number of bytes or a size with a unit (KB, MB, GB, TB; powers of 1000),
    as ``save_pretrained`` reads ``max_shard_size``.

    Raises:
        OptionError: not a positive size.
    """
    from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained parses with

    try:
        if isinstance(size, str) and size.strip().isdigit():
            size = int(size)
        value = size if isinstance(size, int) and not isinstance(size, bool) else parse_size_to_int(size)
    except (ValueError, AttributeError, TypeError, OverflowError):  # OverflowError: "infGB"
        value = 0
    if value <= 0:
        raise OptionError(
            f"--max-shard-size {size!r} is not a size: give a number of bytes or one with a unit, "
            "such as 5GB, 500MB or 100KB (KB, MB, GB, TB)"
        )
    return value


def _check_device(device: str) -> None:
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise OptionError(f"--device {device!r}: only cpu and cuda[:N] are supported")
    if device.startswith("cuda"):
        import torch  # here, not at the top: the command line checks its options before torch is imported

        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: this machine has no CUDA device torch can use; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")


def field_names(record: type) -> list[str]:
    return [f.name for f in dataclasses.fields(record)]


def split(checkpoint: Path | str, options: dict[str, Any]) -> tuple[Source, dict[str, Any]]:
    """The :class:`Source` the options name, and the options left over (those of the command itself)."""
    names = set(field_names(Source))
    source = Source(checkpoint, **{key: value for key, value in options.items() if key in names})
    return source, {key: value for key, value in options.items() if key not in names}


def convert_options(checkpoint: Path | str, options: dict[str, Any]) -> tuple[Source, ConvertOptions]:
    """``convert``'s keyword options as a :class:`Source` and :class:`ConvertOptions`.

    Raises:
        OptionError: a value is not accepted.
        TypeError: an option no such record has.
    """
    source, rest = split(checkpoint, options)
    return source, ConvertOptions(**rest)

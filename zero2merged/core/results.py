"""What the stages find and hand on: typed records that round-trip through JSON.

Each stage returns one of these. The runner keeps it in the work directory's manifest, so a stage that is
skipped on a rerun hands the next one the same typed record as one that ran; the run's report shows each
stage's :meth:`~StageResult.metrics` and :meth:`~StageResult.headline`. Plain data only: nothing here
imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zero2merged.core.errors import VerificationError
from zero2merged.core.records import Record, StageResult


@dataclass
class ZeroLayout(Record):
    """What a ZeRO checkpoint tag holds, read from its metadata without touching any weights.

    Attributes:
        zero_stage: 1, 2 or 3.
        world_size: Data-parallel ranks the masters are split across.
        dtype: Training precision: ``bf16``, ``fp16`` or ``fp32``.
        ds_version: DeepSpeed version that wrote the files.
        global_step: Optimizer step of the save.
        trainable: Trainable param name -> shape, per param group, in DeepSpeed's flattening order.
        frozen: Saved frozen param name -> shape (empty when none were saved).
        frozen_source: Where the frozen params are: ``frozen_param_fragments``, ``module`` or ``None``.
        buffers: Persistent buffer name -> shape.
        shared: Alias name -> name of the param it shares storage with.
        model_files: Model-state files, by rank.
        optim_files: Optimizer-state files, by rank.
        quantized: A QLoRA run's base weights saved in 4-bit by bitsandbytes: name -> their quant state
            (``quant_type``, ``blocksize``, ``dtype`` they dequantize to, ``shape``, ``storage`` dtype of the
            packed bytes); the saved "weight" is then packed 4-bit data, not a weight.
        prefix: Where the PEFT model sits in the saved names (``model.``, ``_orig_mod.``; empty when the
            engine's module is the PEFT model): the tables hold the names without it
            (:mod:`zero2merged.checkpoint.naming`).
        adapter: The adapter converted, when the names were resolved.
        outside: Saved names left out: params outside the PEFT model, and other adapters' weights. A trainable
            one keeps its place (and saved name) in ``trainable``, whose flat offsets count it.
        kind: ``zero`` (DeepSpeed's rank files) or ``adapter`` (a PEFT adapter folder saved gathered: the
            trained weights are the run's 16-bit copies; :mod:`zero2merged.checkpoint.adapter_file`).
        renamed: Table name -> the name the file gives it, where it is not the prefix's (an adapter file's).
    """

    zero_stage: int
    world_size: int
    dtype: str
    ds_version: str | None
    global_step: int | None
    trainable: list[dict[str, list[int]]]
    frozen: dict[str, list[int]]
    frozen_source: str | None
    buffers: dict[str, list[int]]
    shared: dict[str, str] = field(default_factory=dict)
    model_files: list[str] = field(default_factory=list)
    optim_files: list[str] = field(default_factory=list)
    quantized: dict[str, dict] = field(default_factory=dict)
    prefix: str = ""
    adapter: str | None = None
    outside: list[str] = field(default_factory=list)
    kind: str = "zero"
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def trainable_shapes(self) -> dict[str, list[int]]:
        """The trained params of the PEFT model (those left out aside)."""
        left_out = set(self.outside)
        return {name: shape for group in self.trainable for name, shape in group.items() if name not in left_out}

    def saved_name(self, name: str) -> str:
        """A table's name as the rank files hold it."""
        if name in self.renamed:
            return self.renamed[name]
        return name if name in self.outside else self.prefix + name


@dataclass
class CheckpointInfo(StageResult):
    """Everything stage 1 (inspect) found, read by the later stages.

    Attributes:
        checkpoint: The folder holding ``latest`` and the tag folders.
        tag: The tag converted (``global_stepN``).
        tags: Every tag folder found, oldest first.
        checkpoints: When a run folder was given, its checkpoint folders (the newest is converted unless
            ``--tag`` names another).
        layout: The ZeRO metadata of the tag (stage, world size, dtype, param tables).
        adapter_config_path: Where the LoRA config came from (or that it was inferred).
        lora_config: The LoRA config, as PEFT saves it.
        adapter_name: PEFT's adapter name in the param keys (``default`` unless training chose another).
        base_model: Path or hub id of the base model.
        features: What kind of checkpoint this is, beyond the plain case (DoRA, tied embeddings, ...).
        inferred: When no LoRA config was saved: what was inferred from the keys, and from where.
        warnings: Things the user should know; none of them stops the conversion.
    """

    checkpoint: str
    tag: str
    tags: list[str]
    checkpoints: list[str]
    layout: ZeroLayout
    adapter_config_path: str
    lora_config: dict
    adapter_name: str
    base_model: str
    features: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tag_dir(self) -> Path:
        return Path(self.checkpoint) / self.tag

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointInfo:
        import json

        return cls.from_dict(json.loads(text))

    def metrics(self) -> dict:
        layout = self.layout
        return {
            "zero_stage": layout.zero_stage,
            "world_size": layout.world_size,
            "dtype": layout.dtype,
            "trainable": len(layout.trainable_shapes),
            "frozen": len(layout.frozen),
            "frozen_saved": layout.frozen_source is not None,
        }

    def headline(self) -> str:
        return f"ZeRO-{self.layout.zero_stage}, {self.layout.world_size} ranks, {self.layout.dtype}"


@dataclass
class Checked(Record):
    """The CRC-32 checks of the rank files' zip records a stage read (see :mod:`zero2merged.files.zipcheck`).

    Attributes:
        records: Records checked.
        bytes: Their bytes.
        seconds: Time spent computing CRC-32s (and reading the bytes of a record the stage skipped).
    """

    records: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class ConsolidateResult(StageResult):
    """Stage 2's store: tensors by kind, its size on disk, the parameters it holds, and the CRC-32 checks of
    the rank files' records it read (the masters; the frozen params are checked where they are read: by stage
    4 in memory, by stage 5 streaming)."""

    trainable: int
    frozen: int
    frozen_by_reference: int
    buffers: int
    bytes: int
    parameters: int
    checked: Checked = field(default_factory=Checked)

    def headline(self) -> str:
        return f"{self.trainable} trainable + {self.frozen} frozen tensors, {human_size(self.bytes)}"


@dataclass
class ResizedVocab(Record):
    """A vocabulary grown (or shrunk) before training: the base's rows, the checkpoint's, and the modules."""

    base_rows: int
    rows: int
    modules: list[str]


@dataclass
class RebuildResult(StageResult):
    """The model stage 3 built: its classes, the base it came from, and how the base's names map.

    Attributes:
        auto_class: The transformers Auto class that builds the base (and loads the output).
        model_class: The base's model class.
        peft_class: PEFT's wrapper class.
        base_model: The base's folder or hub id.
        base_dtype: The dtype the base is stored in (the output's with ``dtype="auto"``).
        lora: The LoRA config's main fields, for the report.
        resized_vocab: When the vocabulary was resized to the checkpoint's before wrapping.
        base_keys: Wrapper key -> the base's own names for that tensor (several when tied).
        in_4bit: A QLoRA run whose checkpoint holds no 4-bit data (the HF Trainer's): the base's names of
            the weights it trained in 4-bit -> their settings; read from the base, each is quantized and
            dequantized as loading the base in 4-bit did (:mod:`zero2merged.checkpoint.quantized`).
    """

    auto_class: str
    model_class: str
    peft_class: str
    base_model: str
    base_dtype: str
    lora: dict
    resized_vocab: ResizedVocab | None
    base_keys: dict[str, list[str]] = field(default_factory=dict)
    in_4bit: dict[str, dict] = field(default_factory=dict)

    def metrics(self) -> dict:
        return {key: value for key, value in self.to_dict().items() if key not in ("base_keys", "in_4bit")}

    def headline(self) -> str:
        return f"{self.model_class} wrapped by {self.peft_class}"


@dataclass
class LoadResult(StageResult):
    """Stage 4's accounting of every key, and (streaming) where each weight is read from.

    Attributes:
        from_checkpoint: Tensors the checkpoint supplies.
        from_base: Tensors the base supplies (frozen params the checkpoint did not save).
        frozen_checked: Saved frozen tensors compared with the base's.
        frozen_mismatched: Those that differ (kept only with ``ignore_base_mismatch``).
        sources: Streaming: wrapper key -> ``[file, name in that file]``.
        checked: In memory: the CRC-32 checks of the rank files' records holding the saved frozen params, as
            they were read (streaming, stage 5 reads and checks them).
        qlora: A QLoRA run's: what its 4-bit weights are merged into (``merged_into``: ``dequantized`` or
            ``base``), and how far the original base's lie from the dequantized ones on the rows sampled
            (``max_abs_diff``, ``max_rel_diff``: of the largest weight).
    """

    from_checkpoint: int
    from_base: int
    frozen_checked: int
    frozen_mismatched: list[str]
    sources: dict[str, list[str]] = field(default_factory=dict)
    checked: Checked = field(default_factory=Checked)
    qlora: dict | None = None

    def metrics(self) -> dict:
        return {key: value for key, value in self.to_dict().items() if key != "sources"}

    def headline(self) -> str:
        return f"{self.from_checkpoint} tensors from the checkpoint, {self.from_base} from the base"


@dataclass(frozen=True)
class Tolerance(Record):
    """How far outputs may drift: ``max_rel_diff`` at most, ``min_top1`` top-1 agreement at least."""

    max_rel_diff: float
    min_top1: float


@dataclass(frozen=True)
class Parity(Record):
    """How closely ``actual`` outputs follow ``reference`` outputs (see :func:`zero2merged.checks.parity.compare`)."""

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    positions: int

    def check(self, tolerance: Tolerance, what: str) -> None:
        """Raise :class:`VerificationError` naming ``what`` when beyond ``tolerance``."""
        if not (self.max_rel_diff <= tolerance.max_rel_diff and self.top1_agreement >= tolerance.min_top1):
            raise VerificationError(
                f"{what}: outputs differ beyond tolerance (max rel diff {self.max_rel_diff:.3g} > "
                f"{tolerance.max_rel_diff:g} or top-1 agreement {self.top1_agreement:.4f} < {tolerance.min_top1:g})"
            )

    def worse(self, other: Parity) -> Parity:
        """The worst of both figures, over the positions of both."""
        return Parity(
            max(self.max_abs_diff, other.max_abs_diff),
            max(self.max_rel_diff, other.max_rel_diff),
            min(self.top1_agreement, other.top1_agreement),
            self.positions + other.positions,
        )


PERFECT = Parity(0.0, 0.0, 1.0, 0)  # no positions compared yet: what :meth:`Parity.worse` starts from


@dataclass
class MergeResult(StageResult):
    """Stage 5's check of the merged model against the unmerged one.

    Attributes:
        parity: Streaming: the worst of every LoRA layer's merged vs unmerged outputs; in memory: the whole
            model's, on probe inputs.
        layers: Streaming: the LoRA layers merged one at a time, each checked.
        files: Streaming: the weight files written.
        processes: Streaming: the processes that wrote them.
        checked: Streaming: the CRC-32 checks of the rank files' records this process read the saved frozen
            params from (each helper checks its own).
        qlora: A QLoRA run's: what it was merged into (stage 4's record of it).
    """

    parity: Parity
    layers: int | None = None
    files: int | None = None
    processes: int | None = None
    checked: Checked | None = None
    qlora: dict | None = None

    def metrics(self) -> dict:
        return {key: value for key, value in self.to_dict().items() if value is not None}

    def headline(self) -> str:
        if self.layers is not None:
            return f"{self.layers} LoRA layers merged one at a time, each checked"
        return "merge_and_unload, parity checked"


@dataclass
class Served(Record):
    """Where a merged model's serving files came from, and what was rewritten so that they agree.

    Attributes:
        tokenizer_from: The tokenizer's source folder (None: neither the run nor the base has one).
        chat_template_from: The chat template's source (None: there is none).
        generation_config_from: The generation config's source (None: the model has none).
        changed: Each special token id rewritten in ``config.json`` or ``generation_config.json`` to name the
            tokenizer's token, a line each.
    """

    tokenizer_from: str | None = None
    chat_template_from: str | None = None
    generation_config_from: str | None = None
    changed: list[str] = field(default_factory=list)


@dataclass
class SaveResult(StageResult):
    """The output folder stage 6 put in place.

    Attributes:
        output: Its path.
        dtype: The weights' dtype.
        files: Files in it.
        bytes: Their size.
        served: Where the tokenizer, chat template and generation config came from, and what was changed.
        parity: In memory: the saved model reloaded vs the fp32 merge.
    """

    output: str
    dtype: str
    files: int
    bytes: int
    served: Served
    parity: Parity | None = None

    def metrics(self) -> dict:
        return {key: value for key, value in self.to_dict().items() if value is not None}

    def headline(self) -> str:
        return f"{self.files} files, {human_size(self.bytes)}"


def human_size(count: float) -> str:
    """Bytes as people read them: 231.6 KB, 1.5 GB."""
    units = ("B", "KB", "MB", "GB", "TB")
    step = 0
    while count >= 1000 and step < len(units) - 1:
        count, step = count / 1000, step + 1
    return f"{count:.0f} B" if step == 0 else f"{count:.1f} {units[step]}"

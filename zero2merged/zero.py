"""Reading DeepSpeed ZeRO checkpoint files: safely, lazily, a bounded piece at a time.

DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``) is the independent reference our tests compare
against, but it is not what we run, because it unpickles with ``weights_only=False`` (a checkpoint file can
run any code), loads the model-state files whole and concatenates ZeRO-3 frozen params eagerly (about twice
the model in RAM), ignores the frozen params ZeRO-1 keeps in ``module``, and prints to stdout. The layout
rules below are DeepSpeed's, restated; its key names are in ``names.py`` (a test holds them equal to
``deepspeed.checkpoint.constants``), so reading a checkpoint never imports deepspeed.

Layout, in short. Trainable params live as fp32 master copies in the optimizer files, flattened per param
group and split across ranks:

* ZeRO-1/2: group ``g``'s flat vector is the ranks' ``single_partition_of_fp32_groups[g]`` concatenated;
  params follow each other in ``param_shapes[g]`` order, each followed by its alignment padding.
* ZeRO-3: every param is split on its own: each rank holds ``ceil(numel / world)`` elements of it, at the
  same offset in that rank's ``fp32_flat_groups`` (all groups read as one sequence); the last rank's piece
  is padded.

Frozen params are saved by the model-state files in the training dtype: ZeRO-3 splits them like the
trainable ones (``frozen_param_fragments``), ZeRO-2 keeps them whole there, ZeRO-1 keeps them only in
``module``; with ``exclude_frozen_parameters`` none are saved.

ZeRO stage 0 (DeepSpeed's plain data parallelism) writes one model-state file and no optimizer files: its
``optimizer`` entry holds the optimizer's own state, with, for a 16-bit run, the fp32 masters of the
trainable params (``fp32_groups_flat``: one flat tensor per param group, the params one after another, in
the model's order, unpadded) and no table naming them; ``module`` holds every param in the training dtype.
Which params a flat group holds is found by walking the run's trainable params in the model's order,
taking each whose master, rounded to the training dtype, is exactly its 16-bit copy in ``module`` (what the
optimizer step left there); a run in fp32 has no masters apart from ``module``.

Files are memory-mapped; the pages under a piece are unmapped once the piece is used, so reading a
checkpoint does not leave it all resident (and counted in our RSS); and where a piece's bytes are used
as they are, its file range lets them be copied file to file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import mmap
import pickle
import re
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

from zero2merged import names
from zero2merged.dtypes import SHORT_NAMES
from zero2merged.errors import CheckpointError
from zero2merged.options import Tuning
from zero2merged.results import ZeroLayout
from zero2merged.safetensors_io import tensor_bytes
from zero2merged.zipcheck import RecordCheck, archive_name, check_files, check_pickle


class _Record:
    """Stand-in for DeepSpeed's plain record classes (loss scalers, fragment addresses): their fields only."""


def _enum_value(value):
    """Stand-in for DeepSpeed's ``ZeroStageEnum``: the stage number."""
    return value


# The only non-tensor objects ZeRO checkpoints pickle, under DeepSpeed's names; nothing else is unpickled.
ALLOWED_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": _enum_value,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Record,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Record,
    "deepspeed.utils.tensor_fragment.fragment_address": _Record,
}


_trusted_pickles: ContextVar[bool] = ContextVar("trusted_pickles", default=False)


@contextlib.contextmanager
def trusting_pickles(trust: bool = True) -> Iterator[None]:
    """Within this block, rank files are unpickled in full (``weights_only=False``), whatever objects they
    hold: a pickle can run any code, so only for checkpoints from a source you trust."""
    token = _trusted_pickles.set(trust)
    try:
        yield
    finally:
        _trusted_pickles.reset(token)


def load_pt(path: Path) -> dict:
    """Load one checkpoint file memory-mapped, refusing any pickled object outside the allow-list
    (unless within :func:`trusting_pickles`).

    Raises:
        CheckpointError: the file is unreadable, truncated, damaged (its pickle fails its CRC-32), or holds
            objects that are not allowed.
    """
    check_pickle(path)  # the pickle's own bytes; a storage's are checked as they are read (ZeroReader.records)
    try:
        if _trusted_pickles.get():
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        with torch.serialization.safe_globals([(obj, name) for name, obj in ALLOWED_GLOBALS.items()]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"{path} holds pickled objects that DeepSpeed checkpoints do not ({first}); refusing to load it "
            "(a pickle can run code: pass --unsafe-pickle only if you trust where this checkpoint came from)"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {str(e).strip().splitlines()[0][:300]} "
            "(is the file truncated or still being written?)"
        ) from e


MADV_DONTNEED = 4  # Linux's value (and most other systems')


@functools.cache
def _madvise():
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
        return None


def release(piece: torch.Tensor) -> None:
    """Drop this process's mapping of the pages under a piece of a memory-mapped checkpoint file.

    Only for tensors of :func:`load_pt` (private, read-only file mappings that are never written): their
    pages are clean copies of the file, so MADV_DONTNEED just unmaps them; they stay in the page cache,
    and a later touch maps them again from the file. Without madvise, the pages simply stay mapped.
    """
    advise = _madvise()
    if advise is None or piece.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = piece.data_ptr() // page * page
    end = piece.data_ptr() + piece.numel() * piece.element_size()
    advise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def _mappings(paths: set[str]) -> list[tuple[int, int, str, int]]:
    """``(start, end, file, file offset)`` of this process's memory mappings of ``paths``."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append((start, end, fields[5].rstrip("\n"), int(fields[2], 16)))
    except OSError:  # not Linux: no file ranges, pieces are copied through memory instead
        pass
    return found


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(found.group(1)) if found else 0


def rank_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    """The model-state and optimizer-state files of one tag, each sorted by rank."""
    model = sorted(tag_dir.glob(names.MODEL_STATES_GLOB), key=_rank_of)
    optim = sorted(tag_dir.glob(names.OPTIM_STATES_GLOB), key=_rank_of)
    return model, optim


def _shape(value) -> list[int]:
    return [int(d) for d in value]


def read_layout(tag_dir: Path) -> ZeroLayout:
    """Read a tag folder's metadata: stage, world size, dtype, param tables.

    Raises:
        CheckpointError: files are missing, unreadable or inconsistent with each other.
    """
    model_files, optim_files = rank_files(tag_dir)
    if len(model_files) == 1 and not optim_files:
        states = load_pt(model_files[0])
        if isinstance(states.get(names.OPTIMIZER), dict):
            return _stage0_layout(tag_dir, model_files[0], states)
    if not model_files or not optim_files:
        found = ", ".join(sorted(p.name for p in tag_dir.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"{tag_dir} holds no DeepSpeed ZeRO model/optimizer state files ({names.MODEL_STATES_GLOB}, "
            f"{names.OPTIM_STATES_GLOB}); found: {found}"
        )
    states = load_pt(model_files[0])
    optim = load_pt(optim_files[0]).get(names.OPTIMIZER_STATE_DICT, {})
    if names.ZERO_STAGE not in optim or names.PARAM_SHAPES not in states:
        raise CheckpointError(f"{tag_dir} is not a ZeRO checkpoint: no zero_stage in {optim_files[0].name}")
    stage = int(optim[names.ZERO_STAGE])
    count = optim[names.PARTITION_COUNT]
    world = max(count) if isinstance(count, list) else int(count)
    if len(optim_files) != world:
        raise CheckpointError(
            f"{tag_dir}: the checkpoint was split across {world} ranks but {len(optim_files)} optimizer "
            "files are there; some rank's save is missing or an older save was partly overwritten"
        )
    expected_model_files = world if stage == 3 else 1
    if len(model_files) != expected_model_files:
        raise CheckpointError(
            f"{tag_dir}: ZeRO-{stage} over {world} ranks writes {expected_model_files} model-state files, "
            f"found {len(model_files)}"
        )

    _check_one_save(tag_dir, model_files, optim_files, states)
    trainable = [{name: _shape(s) for name, s in group.items()} for group in states[names.PARAM_SHAPES]]
    trainable_names = {name for group in trainable for name in group}
    buffer_names = set(states.get(names.BUFFER_NAMES) or [])
    module = states.get(names.MODULE) or {}
    buffers = {name: _shape(t.shape) for name, t in module.items() if name in buffer_names}
    quantized, quant_parts = _quantized(module, model_files[0])
    frozen_shapes = states.get(names.FROZEN_PARAM_SHAPES)
    if frozen_shapes:
        frozen, source = {name: _shape(s) for name, s in frozen_shapes.items()}, names.FROZEN_PARAM_FRAGMENTS
    else:
        # ZeRO-1 keeps frozen params only in the 16-bit module state dict (ZeRO-3's module is empty).
        frozen = {
            name: _shape(t.shape)
            for name, t in module.items()
            if name not in trainable_names and name not in buffer_names and name not in quant_parts and t.numel() > 0
        }
        source = names.MODULE if frozen else None

    return ZeroLayout(
        zero_stage=stage,
        world_size=world,
        dtype=_training_dtype(optim_files[0], states, module),
        ds_version=states.get(names.DS_VERSION),
        global_step=states.get(names.GLOBAL_STEPS),
        trainable=trainable,
        frozen=frozen,
        frozen_source=source,
        buffers=buffers,
        shared={str(a): str(b) for a, b in (states.get(names.SHARED_PARAMS) or {}).items()},
        model_files=[p.name for p in model_files],
        optim_files=[p.name for p in optim_files],
        quantized=quantized,
    )


# bitsandbytes saves a 4-bit weight as its packed bytes under the weight's name, and its quant state beside
# it under these suffixes (``QuantState.as_dict(packed=True)``), the settings as JSON bytes.
QUANT_STATE = re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>[a-z0-9]+)$")
QUANT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _valid_quant_state(settings) -> bool:
    """Whether bitsandbytes' JSON of a 4-bit weight's settings holds what dequantizing it needs."""
    if not isinstance(settings, dict):
        return False
    dtype = getattr(torch, str(settings.get("dtype")).removeprefix("torch."), None)
    blocksize, shape = settings.get("blocksize"), settings.get("shape")
    return (
        isinstance(settings.get("quant_type"), str)
        and isinstance(blocksize, int)
        and blocksize > 0
        and isinstance(dtype, torch.dtype)
        and dtype.is_floating_point
        and isinstance(shape, list)
        and all(isinstance(n, int) and n > 0 for n in shape)
    )


def _quantized(module: dict, path: Path) -> tuple[dict[str, dict], set[str]]:
    """The weights a QLoRA run's module state holds in 4-bit, with their settings; and the names of their
    quant-state entries (not params). Read from the small entries alone: bitsandbytes is not needed."""
    quantized, parts = {}, set()
    for key, tensor in module.items():
        match = QUANT_STATE.match(key)
        if match is None:
            continue
        weight = match["weight"]
        try:
            settings = json.loads(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        except (ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the 4-bit quant state of {weight} is damaged ({e})") from e
        if not _valid_quant_state(settings):
            raise CheckpointError(
                f"{path}: the 4-bit quant state of {weight} is damaged (a quant type, block size, floating "
                f"dtype and shape are needed; it holds {str(settings)[:200]})"
            )
        packed = module.get(weight)
        quantized[weight] = {
            "quant_type": str(settings.get("quant_type", match["type"])),
            "blocksize": settings.get("blocksize"),
            "dtype": str(settings.get("dtype")),
            "shape": list(settings.get("shape") or []),
            "storage": str(packed.dtype).removeprefix("torch.") if packed is not None else None,
            "nested": f"{weight}.nested_absmax" in module,
        }
        parts |= {key} | {f"{weight}.{part}" for part in QUANT_PARTS}
    return quantized, parts


def _check_one_save(tag_dir: Path, model_files: list[Path], optim_files: list[Path], states: dict) -> None:
    """The rank files must be one save's: each holds the archive ``torch.save`` wrote under its name (a rank
    file renamed, or copied over another, holds another's), and all agree on the DeepSpeed config, the step
    and the optimizer's step count. Files of another tag or run with the same shapes would otherwise be
    read as this save's parts (the fuzzer swaps them). ZeRO-1/2 masters are also held to their 16-bit copies
    as they are read (:meth:`ZeroReader.pieces`).

    Raises:
        CheckpointError: naming the file that is not of this save, and what gave it away.
    """
    for path in [*model_files, *optim_files]:
        saved_as = archive_name(path)
        if saved_as is not None and _rank_file_kind(saved_as) not in (None, _rank_file_kind(path.stem)):
            raise _not_this_save(tag_dir, path, f"it holds the archive torch.save wrote as {saved_as}.pt")
    first: dict[str, tuple[Path, object]] = {}
    for path, data in [(model_files[0], states), *((p, load_pt(p)) for p in [*model_files[1:], *optim_files])]:
        for what, value in _signature(data).items():
            seen = first.setdefault(what, (path, value))
            if value != seen[1]:
                raise _not_this_save(tag_dir, path, f"its {what} differs from {seen[0].name}'s")


def _signature(data: dict) -> dict[str, object]:
    """What every rank file of one save agrees on, where the file holds it."""
    found = {
        "DeepSpeed config": data.get(names.DS_CONFIG),
        "global step": data.get(names.GLOBAL_STEPS),
        "optimizer step count": _optimizer_step(data),
    }
    return {what: value for what, value in found.items() if value is not None}


def _optimizer_step(data: dict) -> int | None:
    """The base optimizer's step count (Adam's ``step``) in an optimizer-state file."""
    optim = data.get(names.OPTIMIZER_STATE_DICT)
    for key in (names.BASE_OPTIMIZER_STATE, names.OPTIMIZER_STATE_DICT):  # ZeRO-1/2, ZeRO-3
        inner = optim.get(key) if isinstance(optim, dict) else None
        if isinstance(inner, list) and inner:  # older DeepSpeed: one per param group
            inner = inner[0]
        state = inner.get("state") if isinstance(inner, dict) else None
        if isinstance(state, dict):
            steps = [int(v["step"]) for v in state.values() if isinstance(v, dict) and "step" in v]
            return max(steps, default=None)
    return None


def _rank_file_kind(stem: str) -> tuple[str, int] | None:
    """``("model_states" | "optim_states", rank)`` of a rank file's name (without ``.pt``); None for others."""
    found = re.search(r"(?:zero_pp_rank_(\d+)_)?mp_rank_\d+_(model_states|optim_states)$", stem)
    return (found.group(2), int(found.group(1) or 0)) if found else None


def _not_this_save(tag_dir: Path, path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{tag_dir / path.name} is not part of the same save as the tag's other rank files ({why}): files "
        "were mixed with another rank's, tag's or run's; copy the tag folder again as the run saved it"
    )


def _stage0_layout(tag_dir: Path, model_file: Path, states: dict) -> ZeroLayout:
    """The layout of a ZeRO stage 0 save (see the module's doc)."""
    from zero2merged.adapter_keys import trained_by_peft

    module = states.get(names.MODULE) or {}
    buffer_names = set(states.get(names.BUFFER_NAMES) or [])
    candidates = [name for name in module if name not in buffer_names and trained_by_peft(name)]
    masters = states[names.OPTIMIZER].get(names.FP32_GROUPS_FLAT)
    if masters is None:  # fp32: the masters are module's own tensors
        trainable = [{name: _shape(module[name].shape) for name in candidates}]
    else:
        trainable = _match_masters(model_file, [m.reshape(-1) for m in masters], module, candidates)
    trained = {name for group in trainable for name in group}
    frozen = {
        name: _shape(t.shape)
        for name, t in module.items()
        if name not in trained and name not in buffer_names and t.numel() > 0
    }
    return ZeroLayout(
        zero_stage=0,
        world_size=int(states.get(names.DP_WORLD_SIZE) or 1),
        dtype=_training_dtype(model_file, states, module),
        ds_version=states.get(names.DS_VERSION),
        global_step=states.get(names.GLOBAL_STEPS),
        trainable=trainable,
        frozen=frozen,
        frozen_source=names.MODULE if frozen else None,
        buffers={name: _shape(t.shape) for name, t in module.items() if name in buffer_names},
        shared={str(a): str(b) for a, b in (states.get(names.SHARED_PARAMS) or {}).items()},
        model_files=[model_file.name],
        optim_files=[],
    )


def _match_masters(
    model_file: Path, masters: list[torch.Tensor], module: dict, candidates: list[str]
) -> list[dict[str, list[int]]]:
    """Which params each flat group of fp32 masters holds: walking the candidates in the model's order, each
    whose next stretch of masters, rounded to its 16-bit dtype, is exactly its copy in ``module``."""
    groups, left = [], list(candidates)
    for flat in masters:
        group, offset = {}, 0
        for name in list(left):
            copy = module[name]
            if offset + copy.numel() <= flat.numel() and torch.equal(
                flat[offset : offset + copy.numel()].to(copy.dtype), copy.reshape(-1)
            ):
                group[name] = _shape(copy.shape)
                offset += copy.numel()
                left.remove(name)
        if offset != flat.numel():
            check_files([model_file])  # a damaged copy is the likelier cause: say so where it is
            raise CheckpointError(
                f"{model_file}: the fp32 masters of a param group ({flat.numel()} values) do not match the trained "
                f"params' 16-bit copies in the model state (matched {offset}); the file is damaged or was not "
                "written by a LoRA run"
            )
        groups.append(group)
    return groups


def _training_dtype(optim_file: Path, states: dict, module: dict) -> str:
    config = states.get(names.DS_CONFIG) or {}
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") is True:
            return key
    if optim_file.name.startswith("bf16_"):
        return "bf16"
    dtypes = {t.dtype for t in module.values() if t.is_floating_point()}
    return SHORT_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"


class _FlatView:
    """Several 1-D tensors read as one sequence (a group split across ranks, or a rank's groups)."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def pieces(self, start: int, length: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(element offset within the range, view)`` covering ``[start, start + length)``."""
        for part, begin, end in zip(self.parts, self.starts, self.starts[1:], strict=False):
            lo, hi = max(start, begin), min(start + length, end)
            if lo < hi:
                yield lo - start, part.narrow(0, lo - begin, hi - lo)


def _split(offset: int, flat: torch.Tensor, limit: int) -> Iterator[tuple[int, torch.Tensor]]:
    """A 1-D view cut into pieces of at most ``limit`` elements, with their element offsets."""
    for first in range(0, flat.numel(), limit):
        yield offset + first, flat.narrow(0, first, min(limit, flat.numel() - first))


class ZeroReader:
    """A tag's tensors, read from the memory-mapped rank files a bounded piece at a time.

    Args:
        tag_dir: The tag folder (``global_stepN``).
        layout: Its :func:`read_layout`.
        piece_elements: The most elements one piece holds.
    """

    def __init__(self, tag_dir: Path, layout: ZeroLayout, *, piece_elements: int = Tuning.piece_elements):
        self.tag_dir = tag_dir
        self.layout = layout
        self.piece_elements = piece_elements

    @functools.cached_property
    def _model_states(self) -> list[dict]:
        return [load_pt(self.tag_dir / name) for name in self.layout.model_files]

    @functools.cached_property
    def _optim(self) -> tuple[list[list], list | None]:
        """Per rank, per group: the flat fp32 master tensor (Adam moments are never read; stage 0: a
        :class:`_FlatView` of the group); and the ZeRO-1/2 per-param alignment paddings."""
        if self.layout.zero_stage == 0:  # in the model-state file (module's own tensors for an fp32 run)
            states = self._model_states[0]
            flat = states[names.OPTIMIZER].get(names.FP32_GROUPS_FLAT)
            if flat is None:
                module = states[names.MODULE]
                return [[_FlatView([module[n].reshape(-1) for n in group]) for group in self.layout.trainable]], None
            return [[_FlatView([t.reshape(-1)]) for t in flat]], None
        key = names.FP32_FLAT_GROUPS if self.layout.zero_stage == 3 else names.SINGLE_PARTITION_OF_FP32_GROUPS
        groups, paddings = [], None
        for rank, name in enumerate(self.layout.optim_files):
            optim = load_pt(self.tag_dir / name)[names.OPTIMIZER_STATE_DICT]
            groups.append([t.reshape(-1) for t in optim[key]])
            if rank == 0:
                paddings = optim.get(names.PARAM_ALIGNMENT_PADDINGS)
        return groups, paddings

    @functools.cached_property
    def _mapped(self) -> list[tuple[int, int, str, int]]:
        self._model_states, self._optim  # noqa: B018 - every rank file mapped first
        files = [*self.layout.model_files, *self.layout.optim_files]
        return _mappings({str((self.tag_dir / name).resolve()) for name in files})

    def file_range(self, piece: torch.Tensor) -> tuple[str, int] | None:
        """The rank file and byte offset a piece's bytes lie at, so they can be copied file to file
        (in the kernel, without passing through this process); None where that is unknown."""
        address = piece.data_ptr()
        for start, end, path, offset in self._mapped:
            if start <= address and address + piece.numel() * piece.element_size() <= end:
                return path, address - start + offset
        return None

    def frozen_ranges(self) -> dict[str, list[tuple[str, int, int]]]:
        """Where each saved frozen param's bytes lie in the rank files: ``[(file, offset, bytes)]`` in order
        (a ZeRO-3 param has one range per rank), for the params whose file ranges are all known."""
        found: dict[str, list[tuple[str, int, int]]] = {}
        unknown = set()
        for name, _, fragment in self._frozen_fragments():
            where = self.file_range(fragment)
            if where is None:
                unknown.add(name)
            else:
                found.setdefault(name, []).append((*where, fragment.numel() * fragment.element_size()))
        return {name: ranges for name, ranges in found.items() if name not in unknown}

    def specs(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        """name -> (dtype, shape) of every tensor, without reading any: masters are fp32."""
        specs = {name: (torch.float32, shape) for name, shape in self.layout.trainable_shapes.items()}
        if self.layout.frozen_source:
            saved = self._model_states[0][self.layout.frozen_source]
            specs.update({name: (saved[name].dtype, shape) for name, shape in self.layout.frozen.items()})
        module = self._model_states[0][names.MODULE]
        specs.update({name: (module[name].dtype, shape) for name, shape in self.layout.buffers.items()})
        return specs

    @functools.cached_property
    def records(self) -> RecordCheck:
        """The CRC-32 checks of the rank files' records, fed with every piece :meth:`pieces` yields."""
        return RecordCheck([self.tag_dir / name for name in [*self.layout.model_files, *self.layout.optim_files]])

    def pieces(self, skip: Collection[str] = ()) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, element offset, 1-D piece)`` of every tensor but those in ``skip``, in order, each piece
        at most ``piece_elements`` long. The file pages under a piece are released once the consumer resumes.
        Sizes are checked before anything is yielded; the CRC-32 of every record read, once all are.

        Raises:
            CheckpointError: sizes that do not add up, or a record whose bytes fail their CRC-32.
        """
        for name, offset, piece in self._all_pieces():
            if name in skip:
                continue
            self._feed(piece)
            if name in self._copies:
                self._check_copy(name, offset, piece)
            yield name, offset, piece
            release(piece)
        self.records.finish()

    def _feed(self, piece: torch.Tensor) -> None:
        where = self.file_range(piece)
        if where is not None:
            self.records.feed(*where, tensor_bytes(piece))

    @functools.cached_property
    def _copies(self) -> dict[str, torch.Tensor]:
        """ZeRO-1/2: the trained params' 16-bit copies in the model-state file (flat), which the engine made
        from the masters (so each master rounds to its copy exactly, on every fixture and GPU checkpoint)."""
        if self.layout.zero_stage not in (1, 2):
            return {}
        module = self._model_states[0][names.MODULE]
        shapes = self.layout.trainable_shapes
        return {
            name: module[name].reshape(-1)
            for name in shapes
            if name in module and module[name].numel() == math.prod(shapes[name])
        }

    def _check_copy(self, name: str, offset: int, piece: torch.Tensor) -> None:
        """A piece of masters against its 16-bit copy: masters of another save (a rank's optimizer file
        swapped with another rank's, tag's or run's, all of them well-formed) do not round to it."""
        copy = self._copies[name].narrow(0, offset, piece.numel())
        self._feed(copy)
        if torch.equal(piece.to(copy.dtype), copy) or not torch.isfinite(piece).all():  # NaN: said by stage 2
            return
        self.records.finish()  # a damaged byte is the likelier cause: said so, where it is
        raise CheckpointError(
            f"{self.tag_dir}: the fp32 masters of {name} in the optimizer files do not round to its "
            f"{SHORT_NAMES.get(copy.dtype, copy.dtype)} copy in {self.layout.model_files[0]}: the files are not "
            "of one save (mixed with another rank's, tag's or run's); copy the tag folder again as the run saved it"
        )

    def _all_pieces(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        masters, paddings = self._optim
        if self.layout.zero_stage == 3:
            yield from self._zero3_trainable(masters)
        elif self.layout.zero_stage == 0:
            yield from self._stage0_trainable(masters[0])
        else:
            yield from self._zero12_trainable(masters, paddings)
        yield from self._frozen()
        module = self._model_states[0][names.MODULE]
        for name in self.layout.buffers:
            yield name, 0, module[name].reshape(-1)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors, assembled from :meth:`pieces` into fresh memory (for in-memory consumers)."""
        specs = self.specs()
        current, flat = None, None
        for name, offset, piece in self.pieces():
            if name != current:
                if current is not None:
                    yield current, flat.view(specs[current][1])
                current = name
                flat = torch.empty(math.prod(specs[name][1]), dtype=specs[name][0])
            flat.narrow(0, offset, piece.numel()).copy_(piece)
        if current is not None:
            yield current, flat.view(specs[current][1])

    def _mismatch(self, needed, held) -> CheckpointError:
        return CheckpointError(
            f"{self.tag_dir}: the param table needs {needed} elements but the optimizer files hold {held}; "
            "the model-state and optimizer files do not belong to the same save"
        )

    def _zero12_trainable(self, masters, paddings) -> Iterator[tuple[str, int, torch.Tensor]]:
        # DeepSpeed pads each group to a multiple of 2 * world size (see zero_to_fp32's zero2_align).
        align = 2 * self.layout.world_size
        plan = []
        for g, shapes in enumerate(self.layout.trainable):
            flat = _FlatView([rank[g] for rank in masters])
            offset, entries = 0, []
            for i, (name, shape) in enumerate(shapes.items()):
                entries.append((name, shape, offset))
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            if math.ceil(offset / align) != math.ceil(flat.numel / align):
                raise self._mismatch(f"{offset} (group {g})", flat.numel)
            plan.append((flat, entries))
        for flat, entries in plan:
            for name, shape, offset in entries:
                for at, view in flat.pieces(offset, math.prod(shape)):
                    for piece_at, piece in _split(at, view, self.piece_elements):
                        yield name, piece_at, piece

    def _stage0_trainable(self, flats: list[_FlatView]) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Stage 0: each group's params one after another in its flat masters, unpadded."""
        for flat, group in zip(flats, self.layout.trainable, strict=True):
            if sum(math.prod(shape) for shape in group.values()) != flat.numel:
                raise self._mismatch(sum(math.prod(shape) for shape in group.values()), flat.numel)
            offset = 0
            for name, shape in group.items():
                for at, view in flat.pieces(offset, math.prod(shape)):
                    yield from ((name, a, p) for a, p in _split(at, view, self.piece_elements))
                offset += math.prod(shape)

    def _zero3_trainable(self, masters) -> Iterator[tuple[str, int, torch.Tensor]]:
        world = self.layout.world_size
        per_rank = [_FlatView(rank) for rank in masters]
        needed = sum(math.ceil(math.prod(s) / world) for s in self.layout.trainable_shapes.values())
        held = [view.numel for view in per_rank]
        if any(h != needed for h in held):
            raise self._mismatch(f"{needed} per rank", held)
        offset = 0
        for name, shape in self.layout.trainable_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            for rank, view in enumerate(per_rank):
                valid = min(part, numel - rank * part)  # the last rank's piece is padded
                if valid > 0:
                    for at, piece in view.pieces(offset, valid):
                        yield from ((name, rank * part + a, p) for a, p in _split(at, piece, self.piece_elements))
            offset += part

    def _frozen(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name, offset, fragment in self._frozen_fragments():
            yield from ((name, a, p) for a, p in _split(offset, fragment, self.piece_elements))

    def _frozen_fragments(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, element offset, 1-D view)`` of each saved frozen param's parts as the files hold them
        (one per rank under ZeRO-3, padding cut off; the whole param under ZeRO-1/2), sizes checked."""
        layout = self.layout
        if layout.frozen_source is None:
            return
        saved = [states[layout.frozen_source] for states in self._model_states]
        for name, shape in layout.frozen.items():
            numel = math.prod(shape)
            if layout.zero_stage == 3:
                part = math.ceil(numel / layout.world_size)
                fragments = [s[name].reshape(-1) for s in saved]
                if any(f.numel() != part for f in fragments):
                    raise CheckpointError(f"{self.tag_dir}: frozen param {name}'s fragments do not add up to {shape}")
                for rank, fragment in enumerate(fragments):
                    valid = min(part, numel - rank * part)
                    if valid > 0:
                        yield name, rank * part, fragment.narrow(0, 0, valid)
            else:
                flat = saved[0][name].reshape(-1)
                if flat.numel() != numel:
                    raise CheckpointError(
                        f"{self.tag_dir}: frozen param {name} has {flat.numel()} elements, "
                        f"its shape {shape} needs {numel}"
                    )
                yield name, 0, flat

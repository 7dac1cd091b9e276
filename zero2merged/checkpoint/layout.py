"""A tag folder's layout: which rank files it holds, the ZeRO stage, world size, dtype and param tables.

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
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zero2merged.checkpoint.rankfiles import check_frozen, check_tables, model_states, optim_states
from zero2merged.checkpoint.saves import check_archive_names, check_one_save
from zero2merged.checkpoint.zero0 import as_shape, stage0_layout, training_dtype
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.core.results import ZeroLayout


def _rank_of(path: Path) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(found.group(1)) if found else 0


def rank_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    """The model-state and optimizer-state files of one tag, each sorted by rank."""
    model = sorted(tag_dir.glob(names.MODEL_STATES_GLOB), key=_rank_of)
    optim = sorted(tag_dir.glob(names.OPTIM_STATES_GLOB), key=_rank_of)
    return model, optim


def read_layout(tag_dir: Path) -> ZeroLayout:
    """Read a tag folder's metadata: stage, world size, dtype, param tables.

    Raises:
        CheckpointError: files are missing, unreadable or inconsistent with each other.
    """
    model_files, optim_files = rank_files(tag_dir)
    if len(model_files) == 1 and not optim_files:
        states = model_states(model_files[0])
        if isinstance(states.get(names.OPTIMIZER), dict):
            return stage0_layout(tag_dir, model_files[0], states)
        if names.OPTIMIZER in states and names.PARAM_SHAPES in states:  # ZeRO stage 0, no optimizer state saved
            raise CheckpointError(
                f"{model_files[0]} holds no optimizer state: DeepSpeed {states.get(names.DS_VERSION, '?')} saved "
                "none for this ZeRO stage 0 run (0.17 does not with bf16), so its fp32 master weights are not in "
                "the checkpoint, only the bf16 copies; train with ZeRO stage 1-3, or a DeepSpeed that saves "
                "them (0.19.8 does)"
            )
    if not model_files or not optim_files:
        found = ", ".join(sorted(p.name for p in tag_dir.iterdir())[:8]) or "nothing"
        raise CheckpointError(
            f"{tag_dir} holds no DeepSpeed ZeRO model/optimizer state files ({names.MODEL_STATES_GLOB}, "
            f"{names.OPTIM_STATES_GLOB}); found: {found}"
        )
    states = model_states(model_files[0])
    if states.get(names.PARAM_SHAPES) is None:
        raise CheckpointError(
            f"{model_files[0]} holds no {names.PARAM_SHAPES} (the table of trained params): the file is damaged "
            "or not a ZeRO model-state file"
        )
    optim = optim_states(optim_files[0])[names.OPTIMIZER_STATE_DICT]
    stage = int(optim[names.ZERO_STAGE])
    count = optim[names.PARTITION_COUNT]
    world = max(count) if isinstance(count, (list, tuple)) else int(count)
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

    check_archive_names(tag_dir, [*model_files, *optim_files])
    models = [(model_files[0], states), *((p, model_states(p)) for p in model_files[1:])]
    optims = [(p, optim_states(p)) for p in optim_files]
    check_one_save(tag_dir, [*models, *optims])
    check_tables(tag_dir, models, optims)
    trainable = [{name: as_shape(s) for name, s in group.items()} for group in states[names.PARAM_SHAPES]]
    trainable_names = {name for group in trainable for name in group}
    buffer_names = set(states.get(names.BUFFER_NAMES) or [])
    module = states.get(names.MODULE) or {}
    buffers = {name: as_shape(t.shape) for name, t in module.items() if name in buffer_names}
    quantized, quant_parts = _quantized(module, model_files[0])
    frozen_shapes = states.get(names.FROZEN_PARAM_SHAPES)
    if frozen_shapes:
        frozen, source = {name: as_shape(s) for name, s in frozen_shapes.items()}, names.FROZEN_PARAM_FRAGMENTS
    else:
        # ZeRO-1 keeps frozen params only in the 16-bit module state dict (ZeRO-3's module is empty).
        frozen = {
            name: as_shape(t.shape)
            for name, t in module.items()
            if name not in trainable_names and name not in buffer_names and name not in quant_parts and t.numel() > 0
        }
        source = names.MODULE if frozen else None
    check_frozen(models, frozen, source, quantized)

    return ZeroLayout(
        zero_stage=stage,
        world_size=world,
        dtype=training_dtype(optim_files[0], states, module),
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

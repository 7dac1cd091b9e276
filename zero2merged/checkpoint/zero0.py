"""ZeRO stage 0: its fp32 masters matched to the params they belong to.

ZeRO stage 0 (DeepSpeed's plain data parallelism) writes one model-state file and no optimizer files: its
``optimizer`` entry holds the optimizer's own state, with, for a 16-bit run, the fp32 masters of the
trainable params (``fp32_groups_flat``: one flat tensor per param group, the params one after another, in
the model's order, unpadded) and no table naming them; ``module`` holds every param in the training dtype.
Which params a flat group holds is found by walking the run's trainable params in the model's order,
taking each whose master, rounded to the training dtype, is exactly its 16-bit copy in ``module`` (what the
optimizer step left there); a run in fp32 has no masters apart from ``module``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zero2merged.checkpoint.naming import trained_by_peft_anywhere
from zero2merged.checkpoint.rankfiles import check_frozen, stage0_masters
from zero2merged.core import names
from zero2merged.core.dtypes import SHORT_NAMES
from zero2merged.core.errors import CheckpointError
from zero2merged.core.results import ZeroLayout
from zero2merged.files.zipcheck import check_files


def as_shape(value) -> list[int]:
    return [int(d) for d in value]


def stage0_layout(tag_dir: Path, model_file: Path, states: dict) -> ZeroLayout:
    """The layout of a ZeRO stage 0 save (see the module's doc)."""
    module = states.get(names.MODULE) or {}
    buffer_names = set(states.get(names.BUFFER_NAMES) or [])
    candidates = [name for name in module if name not in buffer_names and trained_by_peft_anywhere(name)]
    masters = stage0_masters(states)
    if masters is None:  # fp32: the masters are module's own tensors
        _check_fp32(model_file, states[names.OPTIMIZER], module, candidates)
        trainable = [{name: as_shape(module[name].shape) for name in candidates}]
    else:  # a 16-bit run: its masters are small (LoRA's), so each group is matched as one tensor
        flats = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in masters]
        trainable = _match_masters(model_file, flats, module, candidates)
    trained = {name for group in trainable for name in group}
    frozen = {
        name: as_shape(t.shape)
        for name, t in module.items()
        if name not in trained and name not in buffer_names and t.numel() > 0
    }
    check_frozen([(model_file, states)], frozen, names.MODULE, {})
    return ZeroLayout(
        zero_stage=0,
        world_size=int(states.get(names.DP_WORLD_SIZE) or 1),
        dtype=training_dtype(model_file, states, module),
        ds_version=states.get(names.DS_VERSION),
        global_step=states.get(names.GLOBAL_STEPS),
        trainable=trainable,
        frozen=frozen,
        frozen_source=names.MODULE if frozen else None,
        buffers={name: as_shape(t.shape) for name, t in module.items() if name in buffer_names},
        shared={str(a): str(b) for a, b in (states.get(names.SHARED_PARAMS) or {}).items()},
        model_files=[model_file.name],
        optim_files=[],
    )


def _check_fp32(model_file: Path, optimizer: dict, module: dict, candidates: list[str]) -> None:
    """A save whose optimizer state holds no masters is a run in fp32: its trained params' own tensors are
    the masters. A 16-bit run's masters in a layout not read here would otherwise be taken from its 16-bit
    copies, with no word said.

    Raises:
        CheckpointError: the trained params are 16-bit.
    """
    dtypes = {module[name].dtype for name in candidates} - {torch.float32}
    if dtypes:
        found = ", ".join(sorted(str(key) for key in optimizer)[:8]) or "nothing"
        raise CheckpointError(
            f"{model_file}: a ZeRO stage 0 save of a {SHORT_NAMES.get(dtypes.pop(), '16-bit')} run whose optimizer "
            f"state holds its fp32 masters in a layout zero2merged does not read (no {names.FP32_GROUPS_FLAT} or "
            f"{names.FP32_GROUPS}; it holds {found}): please report it with the DeepSpeed version and optimizer used"
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
                group[name] = as_shape(copy.shape)
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


def training_dtype(optim_file: Path, states: dict, module: dict) -> str:
    config = states.get(names.DS_CONFIG) or {}
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") is True:
            return key
    if optim_file.name.startswith("bf16_"):
        return "bf16"
    dtypes = {t.dtype for t in module.values() if t.is_floating_point()}
    return SHORT_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32"

"""What a rank file must hold, checked once as it is loaded: the entries the reader takes, of the types it
takes them as.

DeepSpeed's rank files are pickles of nested dicts. A file that lacks an entry the conversion reads, or holds
one of another type or shape (a damaged or hand-edited file, a layout of a DeepSpeed version or optimizer
zero2merged does not read), is refused here, in one line naming the file, the entry, what it holds and what
was expected, rather than failing later, deep in the reader, as a ``KeyError`` or ``TypeError``. Entries the
conversion never reads (the Adam moments, the loss scaler, the data sampler) are not looked at.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.files.pickles import load_pt
from zero2merged.files.safetensors_reader import SAFETENSORS_DTYPES

# The masters each ZeRO stage's optimizer files hold (DeepSpeed's keys).
MASTERS = {
    1: names.SINGLE_PARTITION_OF_FP32_GROUPS,
    2: names.SINGLE_PARTITION_OF_FP32_GROUPS,
    3: names.FP32_FLAT_GROUPS,
}


def _held(value) -> str:
    """What an entry holds, in a few words."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'…' if len(text) > 40 else ''}"


def _refuse(path: Path, entry: str, value, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: its {entry} is {_held(value)}, where DeepSpeed writes {expected}; the file is damaged, or was "
        "written by a DeepSpeed version or optimizer whose layout zero2merged does not read"
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(_is_int(d) and d >= 0 for d in value)


def _check_tensors(path: Path, entry: str, value, *, floating_point: bool = False) -> None:
    """``value`` is a dict of names to tensors of dtypes a safetensors file holds."""
    if not isinstance(value, dict):
        raise _refuse(path, entry, value, "a dict of names to tensors")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise _refuse(path, f"{entry} entry {name!r}", tensor, "a tensor")
        if tensor.dtype not in SAFETENSORS_DTYPES or (floating_point and not tensor.is_floating_point()):
            raise _refuse(path, f"{entry} entry {name}", tensor, "a floating-point tensor")


def _check_shapes(path: Path, entry: str, value) -> None:
    """``value`` is a dict of names to shapes."""
    if not isinstance(value, dict):
        raise _refuse(path, entry, value, "a dict of param names to shapes")
    for name, shape in value.items():
        if not isinstance(name, str) or not _is_shape(shape):
            raise _refuse(path, f"{entry} entry {name!r}", shape, "a shape (a list of sizes)")


def _check_list(path: Path, entry: str, value, expected: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise _refuse(path, entry, value, expected)


def _check_masters(path: Path, entry: str, value) -> None:
    """``value`` is a list of fp32 tensors, one per param group."""
    _check_list(path, entry, value, "a list of fp32 tensors, one per param group")
    for i, tensor in enumerate(value):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
            raise _refuse(path, f"{entry}[{i}]", tensor, "an fp32 tensor (the group's fp32 masters)")


def model_states(path: Path) -> dict:
    """A model-state file (``*_model_states.pt``), loaded (:func:`load_pt`) and checked.

    Raises:
        CheckpointError: it cannot be read, or an entry the conversion reads is missing or of another type.
    """
    states = load_pt(path)
    if not isinstance(states, dict):
        raise _refuse(path, "pickle", states, "a dict (the engine's state)")
    optional = {
        names.MODULE: lambda entry, value: _check_tensors(path, entry, value),
        names.BUFFER_NAMES: lambda entry, value: _check_list(path, entry, value, "a list of buffer names"),
        names.FROZEN_PARAM_SHAPES: lambda entry, value: _check_shapes(path, entry, value),
        names.FROZEN_PARAM_FRAGMENTS: lambda entry, value: _check_tensors(path, entry, value),
        names.SHARED_PARAMS: lambda entry, value: _check_names(path, entry, value),
        names.DS_CONFIG: lambda entry, value: _check_dict(path, entry, value, "a dict (the DeepSpeed config)"),
        names.DS_VERSION: lambda entry, value: _check_type(path, entry, value, str, "a version string"),
        names.GLOBAL_STEPS: lambda entry, value: _check_count(path, entry, value, "a step count", least=0),
        names.DP_WORLD_SIZE: lambda entry, value: _check_count(path, entry, value, "a number of ranks", least=1),
    }
    for key, check in optional.items():
        if states.get(key) is not None:
            check(key, states[key])
    if not all(isinstance(name, str) for name in states.get(names.BUFFER_NAMES) or []):
        raise _refuse(path, names.BUFFER_NAMES, states[names.BUFFER_NAMES], "a list of buffer names")
    shapes = states.get(names.PARAM_SHAPES)
    if shapes is not None:
        _check_list(path, names.PARAM_SHAPES, shapes, "a list of dicts of param names to shapes, one per group")
        for g, group in enumerate(shapes):
            _check_shapes(path, f"{names.PARAM_SHAPES}[{g}]", group)
    frozen = states.get(names.FROZEN_PARAM_SHAPES)
    if frozen:
        _check_fragments(path, states, frozen)
    optimizer = states.get(names.OPTIMIZER)
    if isinstance(optimizer, dict):  # ZeRO stage 0: the optimizer's own state, its masters in one of two layouts
        if optimizer.get(names.FP32_GROUPS_FLAT) is not None:
            _check_masters(path, f"{names.OPTIMIZER}.{names.FP32_GROUPS_FLAT}", optimizer[names.FP32_GROUPS_FLAT])
        elif optimizer.get(names.FP32_GROUPS) is not None:
            entry = f"{names.OPTIMIZER}.{names.FP32_GROUPS}"
            _check_list(path, entry, optimizer[names.FP32_GROUPS], "a list of param groups' fp32 masters")
            for g, group in enumerate(optimizer[names.FP32_GROUPS]):
                _check_masters(path, f"{entry}[{g}]", group)
    return states


def stage0_masters(states: dict) -> list[list[torch.Tensor]] | None:
    """A ZeRO stage 0 save's fp32 masters (its model-state file checked by :func:`model_states`): per param
    group, its parts in order (one flat tensor, or one tensor per param); None where the optimizer state holds
    none (a run in fp32, whose masters are ``module``'s own tensors)."""
    optimizer = states[names.OPTIMIZER]
    if optimizer.get(names.FP32_GROUPS_FLAT) is not None:
        return [[flat.reshape(-1)] for flat in optimizer[names.FP32_GROUPS_FLAT]]
    if optimizer.get(names.FP32_GROUPS) is not None:
        return [[t.reshape(-1) for t in group] for group in optimizer[names.FP32_GROUPS]]
    return None


def _check_fragments(path: Path, states: dict, frozen: dict) -> None:
    """A file that lists frozen param shapes holds a fragment of each."""
    fragments = states.get(names.FROZEN_PARAM_FRAGMENTS)
    if not isinstance(fragments, dict):
        raise _refuse(path, names.FROZEN_PARAM_FRAGMENTS, fragments, f"a tensor for each of the {len(frozen)} "
                      f"params its {names.FROZEN_PARAM_SHAPES} lists")  # fmt: skip
    missing = [name for name in frozen if name not in fragments]
    if missing:
        raise CheckpointError(
            f"{path}: its {names.FROZEN_PARAM_FRAGMENTS} lacks {len(missing)} of the frozen params its "
            f"{names.FROZEN_PARAM_SHAPES} lists, e.g. {missing[0]}; the file is damaged"
        )


def _check_dict(path: Path, entry: str, value, expected: str) -> None:
    if not isinstance(value, dict):
        raise _refuse(path, entry, value, expected)


def _check_names(path: Path, entry: str, value) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _refuse(path, entry, value, "a dict of param names to the names they share storage with")


def _check_type(path: Path, entry: str, value, kind: type, expected: str) -> None:
    if not isinstance(value, kind):
        raise _refuse(path, entry, value, expected)


def _check_count(path: Path, entry: str, value, expected: str, *, least: int) -> None:
    if not _is_int(value) or value < least:
        raise _refuse(path, entry, value, expected)


def optim_states(path: Path) -> dict:
    """An optimizer-state file (``*_optim_states.pt``), loaded and checked: its ZeRO stage, partition count,
    fp32 masters and (ZeRO-1/2) alignment paddings.

    Returns:
        The whole file's dict (its ``optimizer_state_dict`` checked).

    Raises:
        CheckpointError: it cannot be read, or an entry the conversion reads is missing or of another type.
    """
    data = load_pt(path)
    if not isinstance(data, dict):
        raise _refuse(path, "pickle", data, "a dict (the optimizer's state)")
    optim = data.get(names.OPTIMIZER_STATE_DICT)
    if not isinstance(optim, dict):
        raise _refuse(path, names.OPTIMIZER_STATE_DICT, optim, "a dict (the ZeRO optimizer's state)")
    stage = optim.get(names.ZERO_STAGE)
    if not _is_int(stage) or int(stage) not in MASTERS:
        raise _refuse(path, f"{names.OPTIMIZER_STATE_DICT}.{names.ZERO_STAGE}", stage, "a ZeRO stage, 1, 2 or 3")
    count = optim.get(names.PARTITION_COUNT)
    counts = count if isinstance(count, (list, tuple)) else [count]
    if not counts or not all(_is_int(c) and c >= 1 for c in counts):
        raise _refuse(
            path, f"{names.OPTIMIZER_STATE_DICT}.{names.PARTITION_COUNT}", count, "a number of ranks (or one per group)"
        )
    key = MASTERS[int(stage)]
    _check_masters(path, f"{names.OPTIMIZER_STATE_DICT}.{key}", optim.get(key))
    paddings = optim.get(names.PARAM_ALIGNMENT_PADDINGS)
    if int(stage) in (1, 2) and paddings is not None:
        entry = f"{names.OPTIMIZER_STATE_DICT}.{names.PARAM_ALIGNMENT_PADDINGS}"
        if not isinstance(paddings, (list, tuple)):
            raise _refuse(path, entry, paddings, "a list of each param's padding, one list per param group")
        for g, group in enumerate(paddings):
            if not isinstance(group, (list, tuple)) or not all(_is_int(p) and p >= 0 for p in group):
                raise _refuse(path, f"{entry}[{g}]", group, "a list of paddings (sizes)")
    return data


def check_tables(tag_dir: Path, models: list[tuple[Path, dict]], optims: list[tuple[Path, dict]]) -> None:
    """The rank files agree with the param tables of the first model-state file: every optimizer file is
    of one ZeRO stage, and (ZeRO-1/2) holds one group of masters per group of params, with one padding per
    param; every ZeRO-3 model-state file holds a fragment of each frozen param.

    Raises:
        CheckpointError: naming the file that does not fit, and how.
    """
    first_path, first = models[0]
    groups = first[names.PARAM_SHAPES]
    stages = {int(data[names.OPTIMIZER_STATE_DICT][names.ZERO_STAGE]) for _, data in optims}
    if len(stages) > 1:
        raise CheckpointError(
            f"{tag_dir}: its optimizer files were written by ZeRO stages {sorted(stages)}: the files were mixed "
            "with another run's; copy the tag folder again as the run saved it"
        )
    stage = stages.pop()
    for path, data in optims:
        optim = data[names.OPTIMIZER_STATE_DICT]
        masters = optim[MASTERS[stage]]
        if stage in (1, 2) and len(masters) != len(groups):
            raise CheckpointError(
                f"{path}: it holds the fp32 masters of {len(masters)} param groups, but {first_path.name}'s "
                f"{names.PARAM_SHAPES} lists {len(groups)}; the files are damaged or not of one save"
            )
        paddings = optim.get(names.PARAM_ALIGNMENT_PADDINGS)
        if stage in (1, 2) and paddings is not None and len(paddings) != len(groups):
            raise CheckpointError(
                f"{path}: its {names.PARAM_ALIGNMENT_PADDINGS} has {len(paddings)} groups, but {first_path.name}'s "
                f"{names.PARAM_SHAPES} lists {len(groups)}; the file is damaged"
            )
        for g, (group, padding) in enumerate(zip(groups, paddings or [], strict=False)):
            if stage in (1, 2) and len(padding) != len(group):
                raise CheckpointError(
                    f"{path}: its {names.PARAM_ALIGNMENT_PADDINGS}[{g}] has {len(padding)} entries, but "
                    f"{first_path.name}'s {names.PARAM_SHAPES}[{g}] lists {len(group)} params; the file is damaged"
                )
    frozen = first.get(names.FROZEN_PARAM_SHAPES)
    if frozen:
        for path, data in models[1:]:
            _check_fragments(path, data, frozen)


def check_frozen(models: list[tuple[Path, dict]], frozen: dict, source: str | None, quantized: dict) -> None:
    """Every saved frozen param is a floating-point tensor (a QLoRA run's 4-bit weights, packed bytes, aside):
    one of integers would be cast into the output as a weight (its values truncated), and the base compare,
    made in its dtype, would not see it.

    Raises:
        CheckpointError: naming the file and the param.
    """
    if source is None:
        return
    for path, states in models:
        saved = states.get(source) or {}
        for name in frozen:
            tensor = saved.get(name)
            if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point() and name not in quantized:
                raise _refuse(path, f"{source} entry {name}", tensor, "a floating-point tensor (a frozen weight)")

"""Rank files whose entries are missing, or of another type or size, than DeepSpeed writes: refused in one line
naming the file and the entry, never a KeyError or TypeError from deep in the reader; and read as before where
the damage touches nothing the conversion reads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zero2merged.checkpoint.layout import rank_files, read_layout
from zero2merged.checkpoint.reader import ZeroReader
from zero2merged.cli import main
from zero2merged.core.errors import Zero2MergedError, first_line
from zero2merged.files.safetensors_reader import Reader
from zero2merged.stages.consolidate import consolidate
from zero2merged.stages.inspect import inspect_checkpoint

pytestmark = pytest.mark.slow

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
EMBEDDINGS = "base_model.model.model.embed_tokens.weight"


def _write(path: Path, state) -> None:
    """Write a rank file anew, under its own name (torch.save names the archive after it), as a new file:
    readers of the old one keep their mapping of it."""
    beside = path.parent.parent / ".rewritten"
    beside.mkdir(exist_ok=True)
    if isinstance(state, Path):
        shutil.copyfile(state, beside / path.name)
    else:
        torch.save(state, beside / path.name)
    os.replace(beside / path.name, path)


def _resave(path: Path, change) -> None:
    """Rewrite a rank file after ``change(state)``, or as what it returns if it returns something."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = change(state)
    _write(path, state if changed is None else changed)


def _copy(fixture, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(fixture.checkpoint, run)
    return run


def _file(run: Path, which: str) -> Path:
    """``model0``, ``optim1``...: a tag's rank file of that kind and rank."""
    tag_dir = run / (run / "latest").read_text().strip()
    model, optim = rank_files(tag_dir)
    return (model if which.startswith("model") else optim)[int(which[-1])]


def _masters(state: dict) -> list:
    optim = state["optimizer_state_dict"]
    return optim.get("single_partition_of_fp32_groups") or optim["fp32_flat_groups"]


def _set(*keys, value):
    def change(state):
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = value

    return change


def _drop(*keys):
    def change(state):
        for key in keys[:-1]:
            state = state[key]
        del state[keys[-1]]

    return change


def _first_padding_short(state):
    state["optimizer_state_dict"]["param_alignment_paddings"][0].pop()


def _masters_short(state):
    masters = _masters(state)
    masters[0] = masters[0][:-1].clone()


def _masters_bf16(state):
    masters = _masters(state)
    masters[0] = masters[0].to(torch.bfloat16)


def _integer_weight(state):
    fragments = state["frozen_param_fragments"]
    fragments[EMBEDDINGS] = fragments[EMBEDDINGS].to(torch.int64)  # cast into the output: zeros, said nowhere


def _frozen_one_short(state):
    state["module"][EMBEDDINGS] = state["module"][EMBEDDINGS].reshape(-1)[:-1].clone()


def _one_more_row(state):
    shapes = state["param_shapes"][0]
    shapes[LORA_A] = torch.Size([shapes[LORA_A][0] + 1, *shapes[LORA_A][1:]])


# case: (fixture, rank file, change, what the line says)
CASES = {
    "rank file holding a list": ("engine-z2-bf16", "optim0", lambda s: [s], "its pickle is a list of 1, where"),
    "optimizer state not a dict": (
        "engine-z2-bf16",
        "optim0",
        _set("optimizer_state_dict", value=None),
        "its optimizer_state_dict is NoneType None, where DeepSpeed writes a dict",
    ),
    "unknown ZeRO stage": (
        "engine-z2-bf16",
        "optim1",
        _set("optimizer_state_dict", "zero_stage", value=7),
        "its optimizer_state_dict.zero_stage is int 7, where DeepSpeed writes a ZeRO stage, 1, 2 or 3",
    ),
    "no partition count": (
        "engine-z3-bf16",
        "optim0",
        _drop("optimizer_state_dict", "partition_count"),
        "its optimizer_state_dict.partition_count is NoneType None",
    ),
    "masters missing": (
        "engine-z3-bf16",
        "optim1",
        _drop("optimizer_state_dict", "fp32_flat_groups"),
        "its optimizer_state_dict.fp32_flat_groups is NoneType None, where DeepSpeed writes a list of fp32 tensors",
    ),
    "masters in bf16": (
        "engine-z2-bf16",
        "optim1",
        _masters_bf16,
        "single_partition_of_fp32_groups[0] is a bfloat16 tensor of shape [1792], where DeepSpeed writes an fp32",
    ),
    "a rank without its group of masters": (
        "engine-z2-bf16",
        "optim1",
        _set("optimizer_state_dict", "single_partition_of_fp32_groups", value=[]),
        "it holds the fp32 masters of 0 param groups, but mp_rank_00_model_states.pt's param_shapes lists 1",
    ),
    "paddings for fewer params than the table": (
        "engine-z2-bf16",
        "optim0",
        _first_padding_short,
        "its param_alignment_paddings[0] has 7 entries, but mp_rank_00_model_states.pt's param_shapes[0] lists 8",
    ),
    "masters one value short": (
        "engine-z1-bf16",
        "optim1",
        _masters_short,
        "the param table needs 3584 (group 0) elements but the optimizer files hold 3583",
    ),
    "param table of another shape": (
        "engine-z3-bf16",
        "model0",
        _one_more_row,
        "the param table needs 1824 per rank elements but the optimizer files hold [1792, 1792]",
    ),
    "a frozen weight of another size (its own table under ZeRO-1)": (
        "engine-z1-bf16",
        "model0",
        _frozen_one_short,
        "mp_rank_00_model_states.pt: the checkpoint's embeddings disagree on the vocabulary size (its shape tables "
        "give 256, 16383 rows)",
    ),
    "a trained param of another shape in the table": (
        "engine-z2-bf16",
        "model0",
        _set("param_shapes", 0, LORA_A, value=torch.Size([1, 8, 64])),
        f"{LORA_A} is [1, 8, 64] in the checkpoint but [8, 64] with this adapter config",
    ),
    "param table not a list": (
        "engine-z2-bf16",
        "model0",
        _set("param_shapes", value="x"),
        "its param_shapes is str 'x', where DeepSpeed writes a list of dicts",
    ),
    "no param table": ("engine-z2-bf16", "model0", _drop("param_shapes"), "holds no param_shapes"),
    "a frozen param without its fragment": (
        "engine-z2-bf16",
        "model0",
        _drop("frozen_param_fragments", EMBEDDINGS),
        f"its frozen_param_fragments lacks 1 of the frozen params its frozen_param_shapes lists, e.g. {EMBEDDINGS}",
    ),
    "a rank without a frozen fragment": (
        "engine-z3-bf16",
        "model1",
        _drop("frozen_param_fragments", EMBEDDINGS),
        "its frozen_param_fragments lacks 1 of the frozen params",
    ),
    "a frozen weight of integers": (
        "engine-z2-bf16",
        "model0",
        _integer_weight,
        f"its frozen_param_fragments entry {EMBEDDINGS} is a int64 tensor of shape [256, 64], where DeepSpeed "
        "writes a floating-point tensor",
    ),
    "stage 0 masters in a layout not read": (
        "zero0-bf16",
        "model0",
        _drop("optimizer", "fp32_groups_flat"),
        "a ZeRO stage 0 save of a bf16 run whose optimizer state holds its fp32 masters in a layout zero2merged "
        "does not read",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_entry_is_one_line_naming_file_and_entry(trained, tmp_path, case):
    name, which, change, says = CASES[case]
    fixture = trained(name)
    run = _copy(fixture, tmp_path)
    path = _file(run, which)
    _resave(path, change)
    args = ["convert", str(run), "-o", str(tmp_path / "out"), "--base-model", str(fixture.base)]
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert path.name in lines[0] or path.parent.name in lines[0] or "adapter_config.json" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_stage0_masters_kept_one_tensor_per_param_read_as_the_flat_ones(trained, tmp_path):
    """A raw engine with a torch optimizer keeps a ZeRO stage 0 run's masters as ``fp32_groups``, one fp32
    tensor per trained param (DESIGN.md); they are read as BF16_Optimizer's flat ones are, to the same values."""
    fixture = trained("zero0-bf16")
    run = _copy(fixture, tmp_path)
    tag_dir = _file(run, "model0").parent
    layout = read_layout(tag_dir)
    before = dict(ZeroReader(tag_dir, layout).tensors())

    def per_param(state):
        optimizer = state["optimizer"]
        groups = []
        for flat, group in zip(optimizer.pop("fp32_groups_flat"), layout.trainable, strict=True):
            sizes = [torch.Size(shape).numel() for shape in group.values()]
            groups.append([part.clone() for part in flat.split(sizes)])
        optimizer["fp32_groups"] = groups

    _resave(_file(run, "model0"), per_param)
    relaid = read_layout(tag_dir)
    assert relaid.trainable == layout.trainable
    after = dict(ZeroReader(tag_dir, relaid).tensors())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- every entry the conversion reads, damaged every way ------------------------------------------------

BIG = ("module", "frozen_param_fragments", "frozen_param_shapes", "state", "param_slice_mappings", "ds_config")


def _entries(value, path=()):
    """``(path, value)`` of every entry of a rank file (a container's first and last for the large tables)."""
    yield path, value
    if isinstance(value, dict):
        items = list(value.items())
        if path and (path[-1] in BIG or path[:-1] == ("param_shapes",)) and len(items) > 2:
            items = [items[0], items[-1]]
        for key, inner in items:
            yield from _entries(inner, (*path, key))
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for i, inner in enumerate(value[:2]):
            yield from _entries(inner, (*path, i))


DELETE = object()


def _damages(value) -> list[tuple[str, object]]:
    found = [("deleted", DELETE), ("None", None), ("a string", "x"), ("an int", 7)]
    if isinstance(value, dict):
        found.append(("emptied", {}))
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        found += [("emptied", []), ("one fewer", list(value)[:-1]), ("one more", [*value, *list(value)[-1:]])]
    if isinstance(value, torch.Size) and value:
        found += [("one more row", torch.Size([value[0] + 1, *value[1:]])), ("one more dim", torch.Size([1, *value]))]
    if isinstance(value, torch.Tensor):
        found += [("bf16", value.to(torch.bfloat16)), ("int64", value.to(torch.int64)), ("2-D", value.reshape(1, -1))]
        found += [("one value short", value.reshape(-1)[:-1].clone()), ("empty", value.new_empty(0))]
    if isinstance(value, int) and not isinstance(value, bool):
        found += [("negative", -1), ("zero", 0), ("huge", 10**12)]
    return found


def _put(state, path, value):
    """``state`` with the entry at ``path`` replaced by ``value`` (or removed: :data:`DELETE`)."""
    if not path:
        return value
    parent = state
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, (tuple, torch.Size)):
        items = list(parent)
        items.pop(path[-1]) if value is DELETE else items.__setitem__(path[-1], value)
        return _put(state, path[:-1], type(parent)(items) if isinstance(parent, tuple) else items)
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return state


def _judge(checkpoint: Path, base: Path, path: Path, reference: Reader, trainable: set[str]) -> str | None:
    """What is wrong with reading the damaged ``checkpoint`` (stages 1 and 2), if anything."""
    try:
        store = _consolidated(checkpoint, base, path)
    except Zero2MergedError:
        return None
    except Exception as e:  # noqa: BLE001 - what the test is for
        return f"{type(e).__name__}: {first_line(e)}"
    keys = set(store.keys())
    if not trainable <= keys or not keys <= set(reference.keys()):
        return f"read {len(keys)} tensors, not the {len(reference.keys())} intact"
    for key in keys:  # frozen ones read from the rank files
        mine, intact = store.get(key), reference.get(key)
        # A shape other than the intact one is the damaged table's (or ZeRO-1's module's) word: stages 3 and 4
        # hold every shape to the model's and refuse it (the cases above)
        if mine.shape == intact.shape and not torch.equal(mine, intact):
            return f"read other values of {key}"
    return None


def _consolidated(checkpoint: Path, base: Path, path: Path) -> Reader:
    consolidate(inspect_checkpoint(checkpoint, base_model=str(base)), path)
    return Reader(path)


# ZeRO 0 to 3, frozen params saved (in module, whole, split by rank) or not
DAMAGED = ["engine-z1-bf16", "engine-z2-bf16", "engine-z3-bf16", "trainer-z3-bf16", "zero0-bf16"]


@pytest.mark.parametrize("name", DAMAGED)
def test_any_entry_damaged_any_way_is_refused_or_read_the_same(trained, tmp_path, name):
    """Each entry of each rank file (the large tables' first and last) deleted, set to None, a string, a
    number, emptied, shortened, grown, or (a tensor) cast, reshaped or cut: stage 1 and 2 refuse it with the
    library's error, or read the same tensors as from the intact files (damage to what they never read: the
    Adam moments, a rank's copy of a table only rank 0's is read from); frozen params may go missing (their
    table damaged reads as a run that saved none: they come from the base then). Nothing else."""
    fixture = trained(name)
    reference = _consolidated(fixture.checkpoint, fixture.base, tmp_path / "reference.safetensors")
    trainable = set(inspect_checkpoint(fixture.checkpoint, base_model=str(fixture.base)).layout.trainable_shapes)
    run = _copy(fixture, tmp_path)
    tag_dir = _file(run, "model0").parent
    failures, cases = [], 0
    for original in sorted((fixture.checkpoint / tag_dir.name).glob("*.pt")):
        for path, value in list(_entries(torch.load(original, map_location="cpu", weights_only=False))):
            for how, damaged in _damages(value):
                if not path and damaged is DELETE:
                    continue
                cases += 1
                state = torch.load(original, map_location="cpu", weights_only=False)
                _write(tag_dir / original.name, _put(state, path, damaged))
                where = f"{original.name} {'.'.join(map(str, path)) or 'whole'} {how}"
                failure = _judge(run, fixture.base, tmp_path / "store.safetensors", reference, trainable)
                if failure:
                    failures.append(f"{where}: {failure}")
                _write(tag_dir / original.name, original)  # intact again
    assert cases > 250
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures[:30])

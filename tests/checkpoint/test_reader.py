"""The ZeRO reader against DeepSpeed's own consolidation, and its refusals."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fixtures import SPECS, ZERO_SAVED
from tests.helpers import base_state, reference_consolidated
from zero2merged.checkpoint import reader as zero
from zero2merged.checkpoint.layout import rank_files, read_layout
from zero2merged.checkpoint.location import resolve_tag
from zero2merged.checkpoint.reader import ZeroReader
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.files.pickles import load_pt
from zero2merged.files.safetensors_reader import Reader
from zero2merged.stages.consolidate import consolidate
from zero2merged.stages.inspect import inspect_checkpoint


def _reader(fixture, **options):
    where = resolve_tag(fixture.checkpoint, None)
    return ZeroReader(where.folder / where.tag, read_layout(where.folder / where.tag), **options)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO_SAVED)
def test_reader_matches_deepspeed_tensor_for_tensor(trained, name):
    fixture = trained(name)
    reader = _reader(fixture)
    ours = dict(reader.tensors())
    reference = reference_consolidated(fixture.checkpoint)
    aliases = reader.layout.shared  # tied names DeepSpeed fills in again; we record them as aliases
    assert set(reference) <= set(ours) | set(aliases)
    for key, tensor in reference.items():
        mine = ours[aliases.get(key, key)]
        assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), key
    for key in reader.layout.trainable_shapes:
        assert ours[key].dtype == torch.float32  # the masters, not the 16-bit copies


@pytest.mark.slow
@pytest.mark.parametrize("name", ["engine-z3-bf16", "engine-z2-fp32", "ranks3-z3", "ranks3-z2", "engine-z1-bf16"])
def test_pieces_stay_bounded_and_reassemble_exactly(trained, name):
    """Pieces small enough to cut params (and rank partitions) in the middle still give DeepSpeed's tensors."""
    fixture = trained(name)
    reader = _reader(fixture, piece_elements=97)
    assert max(piece.numel() for _, _, piece in reader.pieces()) <= 97
    ours = dict(reader.tensors())
    aliases = reader.layout.shared
    for key, tensor in reference_consolidated(fixture.checkpoint).items():
        assert torch.equal(ours[aliases.get(key, key)], tensor), key


def test_checkpoint_keys_are_deepspeeds():
    """names.py restates DeepSpeed's checkpoint keys so reading never imports deepspeed; they must agree."""
    from deepspeed.checkpoint import constants

    restated = [
        "OPTIMIZER_STATE_DICT",
        "ZERO_STAGE",
        "PARTITION_COUNT",
        "FP32_FLAT_GROUPS",
        "SINGLE_PARTITION_OF_FP32_GROUPS",
        "BASE_OPTIMIZER_STATE",
        "PARAM_ALIGNMENT_PADDINGS",
        "PARAM_SHAPES",
        "BUFFER_NAMES",
        "FROZEN_PARAM_SHAPES",
        "FROZEN_PARAM_FRAGMENTS",
        "DS_VERSION",
        "FP32_GROUPS",
    ]
    for key in restated:
        if key == "PARAM_ALIGNMENT_PADDINGS" and not hasattr(constants, key):
            continue  # newer than DeepSpeed 0.17, whose checkpoints have no such entry (the reader finds none)
        assert getattr(names, key) == getattr(constants, key), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO_SAVED)
def test_layout_detected(trained, name):
    spec = SPECS[name]
    layout = _reader(trained(name)).layout
    assert (layout.zero_stage, layout.world_size, layout.dtype) == (spec.zero_stage, spec.world_size, spec.dtype)
    saves_frozen = spec.layout in ("engine", "accelerate") and not spec.exclude_frozen  # Trainers exclude them
    expected_source = ("module" if spec.zero_stage in (0, 1) else "frozen_param_fragments") if saves_frozen else None
    assert layout.frozen_source == expected_source
    assert layout.global_step == spec.steps
    assert all(".lora_" in name or ".modules_to_save." in name for name in layout.trainable_shapes)


@pytest.mark.slow
def test_zero1_frozen_params_come_from_module_where_deepspeed_drops_them(trained):
    fixture = trained("engine-z1-bf16")
    reader = _reader(fixture)
    frozen = {name: t for name, t in reader.tensors() if name in reader.layout.frozen}
    assert set(frozen).isdisjoint(reference_consolidated(fixture.checkpoint))  # zero_to_fp32 drops them all
    base = base_state(fixture)
    assert len(frozen) == len(base)
    for key, tensor in frozen.items():
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(tensor, base[plain].to(tensor.dtype)), key


@pytest.fixture
def tag_copy(trained, tmp_path):
    """A writable copy of a ZeRO-3 checkpoint's tag folder."""
    fixture = trained("engine-z3-bf16")
    where = resolve_tag(fixture.checkpoint, None)
    copy = tmp_path / where.tag
    shutil.copytree(where.folder / where.tag, copy)
    return copy


@pytest.mark.slow
def test_missing_rank_file_is_named(tag_copy):
    _, optim = rank_files(tag_copy)
    optim[-1].unlink()
    with pytest.raises(CheckpointError, match="2 ranks but 1 optimizer files"):
        read_layout(tag_copy)


@pytest.mark.slow
def test_truncated_file_is_named(tag_copy):
    _, optim = rank_files(tag_copy)
    optim[1].write_bytes(optim[1].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=optim[1].name):  # found reading the layout, or the tensors
        dict(ZeroReader(tag_copy, read_layout(tag_copy)).tensors())


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": _RunsACommand(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pt(evil)
    assert not marker.exists()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_released_pieces_leave_no_pages_resident(tmp_path):
    """What keeps reading a checkpoint from holding it all in RSS: used pages go back to the kernel."""
    torch.save({"t": torch.ones(16 << 20)}, tmp_path / "t.pt")  # 64 MB
    tensor = load_pt(tmp_path / "t.pt")["t"]
    before = _resident_bytes()
    assert tensor.sum().item() == 16 << 20  # every page touched
    touched = _resident_bytes()
    zero.release(tensor)
    assert touched - before > 48e6
    assert touched - _resident_bytes() > 48e6
    assert tensor.sum().item() == 16 << 20  # read again from the file, unchanged


@pytest.mark.slow
@pytest.mark.parametrize("name", ["engine-z3-bf16", "ranks3-z3", "ranks3-z2", "engine-z1-bf16"])
def test_consolidated_file_lists_frozen_params_by_reference_and_reads_back_deepspeeds(trained, name, tmp_path):
    """Stage 2 copies only the trainable masters; the frozen params it lists by their rank-file ranges
    (one per rank under ZeRO-3, however the reader cut them into pieces) read back as DeepSpeed's."""
    fixture = trained(name)
    info = inspect_checkpoint(fixture.checkpoint)
    path = tmp_path / "consolidated.safetensors"
    result = consolidate(info, path, piece_elements=97)
    saved = Reader(path)
    frozen = info.layout.frozen
    assert set(saved.references) == set(frozen) and result.frozen_by_reference == len(frozen)
    assert path.stat().st_size < sum(saved.nbytes(key) for key in saved.keys())  # frozen bytes not copied
    for key in frozen:
        files = {file for file, _, _ in saved.ranges(key)}
        assert files <= {str((info.tag_dir / f).resolve()) for f in info.layout.model_files}
        if info.layout.zero_stage == 3:
            assert len(saved.ranges(key)) == len(files)  # each rank's fragment is one range
    aliases = info.layout.shared
    for key, tensor in reference_consolidated(fixture.checkpoint).items():
        mine = saved.get(aliases.get(key, key))
        assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), key
    if frozen:
        key = max(frozen, key=lambda k: saved.nbytes(k))
        buffer = torch.empty(saved.nbytes(key), dtype=torch.uint8)
        whole, count = saved.get(key), 0
        for first, rows in saved.chunks(key, chunk_bytes=saved.nbytes(key) // 3, into=buffer):
            assert rows.data_ptr() == buffer.data_ptr() and torch.equal(rows, whole[first : first + len(rows)])
            count += 1
        assert count > 1


@pytest.mark.slow
def test_without_file_ranges_frozen_params_are_copied_into_the_store(trained, tmp_path, monkeypatch):
    """Where the rank files' mappings cannot be read (no /proc/self/maps), stage 2 copies the frozen
    params in, and the store reads back the same tensors."""
    fixture = trained("engine-z3-bf16")
    info = inspect_checkpoint(fixture.checkpoint)
    consolidate(info, tmp_path / "by_reference.safetensors")
    monkeypatch.setattr(zero, "_mappings", lambda paths: [])
    consolidate(info, tmp_path / "copied.safetensors")
    by_reference, copied = Reader(tmp_path / "by_reference.safetensors"), Reader(tmp_path / "copied.safetensors")
    assert by_reference.references and not copied.references
    assert set(copied.keys()) == set(by_reference.keys())
    for key in copied.keys():
        assert torch.equal(copied.get(key), by_reference.get(key)), key

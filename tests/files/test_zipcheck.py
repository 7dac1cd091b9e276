"""Damaged bytes: a rank file changed after it was written (a bad disk, an interrupted ``rsync --inplace``, a
flaky object store) is caught by the CRC-32 its zip records carry, for every record the conversion reads; one
line names the file and the record, and nothing is written. Python's own ``zipfile`` confirms each damage."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from zero2merged.checkpoint.layout import rank_files
from zero2merged.cli import main
from zero2merged.files.safetensors_writer import tensor_bytes
from zero2merged.files.zipcheck import zip_records

pytestmark = pytest.mark.slow


def _copy(trained, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A writable copy of a fixture's checkpoint folder, and its tag folder."""
    run = tmp_path / "run"
    shutil.copytree(trained(name).checkpoint, run)
    return run, run / (run / "latest").read_text().strip()


def _flip(path: Path, record_names: list[str]) -> None:
    """Change one byte in the middle of each named record, the file's size unchanged; Python's zipfile must
    then see the first of them as damaged (so the test damages what it means to)."""
    records = {record.name: record for record in zip_records(path)}
    with open(path, "r+b") as f:
        for name in record_names:
            record = records[name]
            f.seek(record.start + record.size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x5A]))
    assert zipfile.ZipFile(path).testzip() in record_names


def _storages(path: Path) -> list[str]:
    return [record.name for record in zip_records(path) if "/data/" in record.name]


def _master_records(path: Path) -> list[str]:
    """The records holding a ZeRO-1/2/3 optimizer file's fp32 masters, found by their bytes."""
    optim = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    masters = optim.get("single_partition_of_fp32_groups") or optim["fp32_flat_groups"]
    wanted = {bytes(tensor_bytes(t.contiguous())) for t in masters}
    with zipfile.ZipFile(path) as archive:
        return [name for name in _storages(path) if archive.read(name) in wanted]


def _convert(run: Path, output: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(run), "--output", str(output), *extra])


def _refused(result, output: Path, file: Path, says: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith(f"error: {file.resolve()}: record ") and says in lines[-1], lines[-1]
    assert "Traceback" not in result.output and not output.exists()


@pytest.mark.parametrize("fixture", ["engine-z2-bf16", "engine-z3-bf16", "engine-z1-bf16", "zero0-bf16"])
def test_every_tensor_record_of_a_rank_file_damaged_is_refused(trained, tmp_path, fixture):
    run, tag = _copy(trained, tmp_path, fixture)
    model_files, optim_files = rank_files(tag)
    damaged = (optim_files or model_files)[-1]  # stage 0 keeps its masters in the model-state file
    _flip(damaged, _storages(damaged))
    result = _convert(run, tmp_path / "out")
    _refused(result, tmp_path / "out", damaged, "fails its CRC-32 check")


def test_damaged_pickle_is_refused_before_it_is_unpickled(trained, tmp_path):
    run, tag = _copy(trained, tmp_path, "engine-z2-bf16")
    model_states = rank_files(tag)[0][0]
    _flip(model_states, [r.name for r in zip_records(model_states) if r.name.endswith("data.pkl")])
    _refused(_convert(run, tmp_path / "out"), tmp_path / "out", model_states, "data.pkl fails its CRC-32 check")


def test_damaged_frozen_weights_are_refused_as_they_are_read(trained, tmp_path):
    """ZeRO-2 saves the frozen params whole in the model-state file; they are read (compared with the base)
    in stage 4, and copied file to file into the output after."""
    run, tag = _copy(trained, tmp_path, "engine-z2-bf16")
    model_states = rank_files(tag)[0][0]
    biggest = max((r for r in zip_records(model_states) if "/data/" in r.name), key=lambda r: r.size)
    _flip(model_states, [biggest.name])
    _refused(_convert(run, tmp_path / "out"), tmp_path / "out", model_states, biggest.name)


def test_records_the_conversion_never_reads_are_left_to_inspect_check(trained, tmp_path):
    """Adam's moments are not part of the model: damaged, the conversion is unchanged (the same bytes as
    from the undamaged copy); ``inspect --check`` reads every record and finds them."""
    fixture = trained("engine-z3-bf16")
    clean = _convert(fixture.checkpoint, tmp_path / "clean")
    assert clean.exit_code == 0, clean.output
    run, tag = _copy(trained, tmp_path, "engine-z3-bf16")
    optim_file = rank_files(tag)[1][0]
    moments = [name for name in _storages(optim_file) if name not in _master_records(optim_file)]
    assert moments and len(moments) < len(_storages(optim_file))
    _flip(optim_file, moments)

    converted = _convert(run, tmp_path / "damaged")
    assert converted.exit_code == 0, converted.output
    for file in (tmp_path / "clean").glob("*.safetensors"):
        assert (tmp_path / "damaged" / file.name).read_bytes() == file.read_bytes()

    checked = CliRunner().invoke(main, ["inspect", str(run), "--check"])
    assert checked.exit_code == 2 and "fails its CRC-32 check" in checked.stderr.strip().splitlines()[-1]
    intact = CliRunner().invoke(main, ["inspect", str(fixture.checkpoint), "--check"])
    assert intact.exit_code == 0 and "every one of the" in intact.output, intact.output


# Files of another save: each well-formed, with intact CRCs, of the same shapes; read as this save's parts they
# would give a model no run trained.


def test_rank_files_swapped_or_copied_over_each_other_are_refused(trained, tmp_path):
    run, tag = _copy(trained, tmp_path, "engine-z3-bf16")
    first, second = rank_files(tag)[1]
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    result = _convert(run, tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    line = result.stderr.strip().splitlines()[-1]
    assert f"{first.resolve()} is not part of the same save" in line and f"wrote as {second.name}" in line, line


def test_a_rank_file_of_another_tag_is_refused(trained, tmp_path):
    run, tag = _copy(trained, tmp_path, "multi-tag-z2")
    older = sorted(p for p in run.iterdir() if p.is_dir() and p != tag)[0]
    stale = rank_files(tag)[1][1]
    shutil.copyfile(older / stale.name, stale)
    result = _convert(run, tmp_path / "out")
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "optimizer step count differs" in line and stale.name in line, line


def test_masters_of_another_save_with_the_same_config_and_step_are_refused(trained, tmp_path):
    """A ZeRO-2 optimizer file re-saved by torch.save with other masters (as a rerun of the same config with
    another seed would write): its name, config and step all fit; its masters do not round to the 16-bit
    copies the model-state file holds."""
    run, tag = _copy(trained, tmp_path, "engine-z2-bf16")
    optim_file = rank_files(tag)[1][1]
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)
    with torch.no_grad():
        saved["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].add_(0.01)
    torch.save(saved, optim_file)
    result = _convert(run, tmp_path / "out")
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "do not round to its bf16 copy" in line and not (tmp_path / "out").exists(), line

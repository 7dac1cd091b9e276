"""Damaged or hostile headers and weight indexes: every one is refused in one line naming the file, before
anything is allocated by its word (a header claiming 2^60 bytes is refused at once, not a MemoryError).

The safetensors reader raises :class:`~zero2merged.files.safetensors_reader.HeaderError`; the base model's files (the
index, the headers, a ``.bin``) raise ``BaseModelError``, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from zero2merged.core import names
from zero2merged.core.errors import BaseModelError
from zero2merged.files.pickled import PickledWeights
from zero2merged.files.safetensors_reader import REFERENCES_KEY, HeaderError, Reader
from zero2merged.files.safetensors_writer import Writer
from zero2merged.model.base import load_base, weight_files

FIXTURE = "engine-z2-bf16"


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b.bias": torch.ones(5, dtype=torch.bfloat16),
        "c.steps": torch.arange(2, dtype=torch.int64),
    }


def _file(tmp_path: Path, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    save_file(_tensors(), path, metadata={"format": "pt"})
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _rewrite(path: Path, change) -> Path:
    """The file with ``change(header)`` applied to its parsed header, its data kept."""
    header, data = _split(path)
    change(header)
    _write(path, header, data)
    return path


def _refused(path: Path, says: str) -> str:
    with pytest.raises(HeaderError) as caught:
        Reader(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert says in message, message
    return message


def _entry(name: str, **fields):
    def change(header):
        header[name].update(fields)

    return change


# --- the 8-byte length and the header itself -------------------------------------------------------------


def test_an_absurd_header_length_is_refused_at_once_without_allocating(tmp_path):
    path = _file(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    path.write_bytes(data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = _refused(path, f"claims {2**60} bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1 and peak < 1 << 20
    assert f"the file holds {len(data)}" in message and "damaged or not a safetensors file" in message


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    path = _file(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data))  # under safetensors' bound, but more than the file holds
    path.write_bytes(data)
    _refused(path, f"claims {len(data)} bytes but the file holds {len(data)}")


@pytest.mark.parametrize("size", [0, 5])
def test_a_file_too_short_for_the_length_is_refused(tmp_path, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01" * size)
    _refused(path, f"{size} bytes, too short")


@pytest.mark.parametrize(
    "blob, says",
    [
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b'{"a.weight": {"dtype": ', "not UTF-8 JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),  # nested past the parser's recursion limit
        (b"[1, 2]", "a JSON list, not an object"),
        (b'"text"', "a JSON str, not an object"),
    ],
    ids=["not utf-8", "not json", "nested too deep", "a list", "a string"],
)
def test_a_header_that_is_not_a_json_object_is_refused(tmp_path, blob, says):
    path = tmp_path / "model.safetensors"
    _write(path, blob, b"\0" * 16)
    _refused(path, says)


@pytest.mark.parametrize("metadata", [{"format": 1}, ["format", "pt"], "pt"], ids=["int value", "a list", "a string"])
def test_metadata_that_is_not_strings_is_refused(tmp_path, metadata):
    path = _rewrite(_file(tmp_path), lambda header: header.update(__metadata__=metadata))
    _refused(path, "__metadata__ is not a map of strings to strings")


# --- each tensor's entry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, says",
    [
        (_entry("a.weight", dtype="F8_E4M3"), "has dtype 'F8_E4M3', not one zero2merged reads"),
        (_entry("a.weight", dtype=["F32"]), "has dtype ['F32'], not one zero2merged reads"),
        (_entry("a.weight", shape=[3, -4]), "shape [3, -4] is not a list of sizes"),
        (_entry("a.weight", shape=[3, 4.0]), "shape [3, 4.0] is not a list of sizes"),
        (_entry("a.weight", shape=[True, 12]), "is not a list of sizes"),
        (_entry("a.weight", shape="3x4"), "is not a list of sizes"),
        (_entry("a.weight", shape=[0, 2**64]), "is not a list of sizes"),
        (_entry("a.weight", shape=[4, 4]), "span 48 bytes, the dtype and shape need 64"),
        (_entry("a.weight", dtype="F16"), "span 48 bytes, the dtype and shape need 24"),
        (_entry("a.weight", data_offsets=[-48, 0]), "data_offsets [-48, 0] are not [begin, end]"),
        (_entry("a.weight", data_offsets=[48]), "are not [begin, end]"),
        (_entry("a.weight", data_offsets=[0, 48, 96]), "are not [begin, end]"),
        (_entry("a.weight", data_offsets=None), "are not [begin, end]"),
        (_entry("a.weight", data_offsets=[48, 0]), "span -48 bytes"),
        (_entry("a.weight", data_offsets=[2**62, 2**62 + 48]), f"ends at byte {2**62 + 48} of the data"),
        (lambda header: header.update({"a.weight": [1, 2]}), "described by a JSON list, not an object"),
    ],
    ids=[
        "unknown dtype",
        "dtype not a string",
        "negative dimension",
        "float dimension",
        "bool dimension",
        "shape not a list",
        "dimension past int64",
        "shape larger than its bytes",
        "dtype smaller than its bytes",
        "negative offset",
        "one offset",
        "three offsets",
        "no offsets",
        "end before begin",
        "offsets out of the file",
        "entry not an object",
    ],
)
def test_an_entry_inconsistent_with_itself_or_the_file_is_refused(tmp_path, change, says):
    _refused(_rewrite(_file(tmp_path), change), says)


def test_overlapping_tensors_are_refused(tmp_path):
    def change(header):
        begin, _ = header["a.weight"]["data_offsets"]  # f32 [3, 4]: 48 bytes
        header["c.steps"]["data_offsets"] = [begin + 8, begin + 24]  # int64 [2]: 16 bytes, within a.weight

    _refused(_rewrite(_file(tmp_path), change), "overlap in the file")


def test_empty_tensors_overlap_nothing(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2, 2), "e": torch.empty(0, 3), "z": torch.empty(0)}, path)
    reader = Reader(path)
    assert reader.shape("e") == [0, 3] and torch.equal(reader.get("a"), torch.ones(2, 2))


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_a_truncated_data_section_is_refused_when_opened(tmp_path, cut):
    path = _file(tmp_path)
    path.write_bytes(path.read_bytes()[:-cut])
    message = _refused(path, "of the data, which holds")
    assert "truncated" in message


def test_every_intact_file_still_reads(tmp_path):
    path = _file(tmp_path)
    reader = Reader(path)
    assert reader.metadata == {"format": "pt"} and not reader.references
    for name, tensor in _tensors().items():
        assert torch.equal(reader.get(name), tensor)


# --- references (the work directory's store) -------------------------------------------------------------


def _referencing(tmp_path: Path, change=None) -> Path:
    """A store holding ``b.bias`` and listing ``a.weight`` by reference to two ranges of ``source.bin``."""
    weight = _tensors()["a.weight"]
    raw = weight.numpy().tobytes()
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 8 + raw)
    ranges = [(str(source), 8, 20), (str(source), 28, len(raw) - 20)]
    path = tmp_path / "consolidated.safetensors"
    bias = _tensors()["b.bias"]
    with Writer(path, {"b.bias": (bias.dtype, [5])}, {}, {"a.weight": (weight.dtype, [3, 4], ranges)}) as writer:
        writer.write("b.bias", bias)
    if change is not None:

        def edit(header):
            listed = json.loads(header["__metadata__"][REFERENCES_KEY])
            change(listed, source)
            header["__metadata__"][REFERENCES_KEY] = listed if change is _not_a_string else json.dumps(listed)

        _rewrite(path, edit)
    return path


def _not_a_string(listed, source):
    pass


def _ranges(ranges):
    def change(listed, source):
        listed["a.weight"]["ranges"] = [[str(source) if r[0] == "SOURCE" else r[0], *r[1:]] for r in ranges]

    return change


def test_intact_references_read(tmp_path):
    reader = Reader(_referencing(tmp_path))
    assert torch.equal(reader.get("a.weight"), _tensors()["a.weight"])


@pytest.mark.parametrize(
    "change, says",
    [
        (_not_a_string, "__metadata__ is not a map of strings to strings"),
        (_ranges([["SOURCE", 8, 20], ["SOURCE", 28, 100]]), "which holds 56; the file changed since"),
        (_ranges([["SOURCE", 8, 20], ["SOURCE", 28, 20]]), "ranges hold 40 bytes, the dtype and shape need 48"),
        (_ranges([["SOURCE", -8, 48]]), "ranges are not [[file, offset, bytes], ...]"),
        (_ranges([["SOURCE", 8]]), "ranges are not [[file, offset, bytes], ...]"),
        (_ranges([["/nonexistent/rank.pt", 0, 48]]), "is referenced in '/nonexistent/rank.pt', which cannot be read"),
        (lambda listed, source: listed["a.weight"].update(dtype="Q8"), "has dtype 'Q8'"),
        (lambda listed, source: listed.update({"b.bias": listed["a.weight"]}), "is both in the file and referenced"),
    ],
    ids=[
        "not a string",
        "range past its file",
        "ranges short of the tensor",
        "negative offset",
        "range without size",
        "missing file",
        "unknown dtype",
        "listed twice",
    ],
)
def test_a_reference_that_cannot_be_right_is_refused(tmp_path, change, says):
    _refused(_referencing(tmp_path, change), says)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"], ids=["not json", "not an object"])
def test_references_that_are_not_a_json_object_are_refused(tmp_path, text):
    path = _rewrite(_referencing(tmp_path), lambda header: header["__metadata__"].update({REFERENCES_KEY: text}))
    _refused(path, f"its {REFERENCES_KEY} are not")


# --- the base model's weight index and files ---------------------------------------------------------------


def _sharded(tmp_path: Path, weight_map) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    _file(folder, "model-00001-of-00001.safetensors")
    index = weight_map if isinstance(weight_map, str) else json.dumps({"metadata": {}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(index)
    return folder


def _index_refused(folder: Path, says: str) -> None:
    with pytest.raises(BaseModelError) as caught:
        weight_files(folder)
    message = str(caught.value)
    assert str(folder / "model.safetensors.index.json") in message and "\n" not in message, message
    assert says in message, message


SHARD = "model-00001-of-00001.safetensors"


def test_an_intact_index_lists_its_shards(tmp_path):
    folder = _sharded(tmp_path, {"a.weight": SHARD, "b.bias": SHARD})
    assert weight_files(folder) == [folder / SHARD]


@pytest.mark.parametrize(
    "weight_map, says",
    [
        ("{not json", "cannot read the weight index"),
        ("[1, 2]", "holds no weight_map object"),
        ('{"metadata": {}}', "holds no weight_map object"),
        ('{"weight_map": ["a.weight"]}', "holds no weight_map object"),
        ({}, "maps no weights to files"),
        ({"a.weight": 7}, "maps 'a.weight' to 7, not a file name"),
        ({"a.weight": [SHARD]}, "not a file name"),
        ({"a.weight": None}, "not a file name"),
        ({"a.weight": "/etc/passwd"}, "names a weight file '/etc/passwd' that is not a file of"),
        ({"a.weight": f"../{SHARD}"}, "that is not a file of"),
        ({"a.weight": ".."}, "that is not a file of"),
        ({"a.weight": ""}, "that is not a file of"),
        ({"a.weight": f"sub/{SHARD}"}, "that is not a file of"),
        ({"a.weight": "model-00002-of-00002.safetensors"}, "that is not a file of"),
        ({"a.weight": "config.json"}, "that is not a .safetensors file"),
    ],
    ids=[
        "not json",
        "not an object",
        "no weight map",
        "weight map a list",
        "empty weight map",
        "a number for a file",
        "a list for a file",
        "null for a file",
        "absolute path",
        "parent folder",
        "dot dot",
        "empty name",
        "sub folder",
        "missing file",
        "not a weight file",
    ],
)
def test_a_malformed_index_is_refused(tmp_path, weight_map, says):
    folder = _sharded(tmp_path, weight_map)
    (folder / "config.json").write_text("{}")
    (tmp_path / SHARD).write_bytes((folder / SHARD).read_bytes())  # what '../' would reach
    _index_refused(folder, says)


def test_an_index_not_utf8_is_refused(tmp_path):
    folder = _sharded(tmp_path, "{}")
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "x"}}')
    _index_refused(folder, "cannot read the weight index")


def test_a_huge_index_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from zero2merged.model import base as basemodel

    monkeypatch.setattr(basemodel, "MAX_INDEX_BYTES", 1000)
    folder = _sharded(tmp_path, {f"w{i}": SHARD for i in range(100)})
    _index_refused(folder, "is larger than a weight index can be (1000 bytes)")


def test_an_index_of_bin_shards_names_bin_files(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    torch.save(_tensors(), folder / "pytorch_model-00001-of-00001.bin")
    _file(folder, "stray.safetensors")
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "pytorch_model-00001-of-00001.bin"}}))
    assert weight_files(folder) == [folder / "pytorch_model-00001-of-00001.bin"]
    index.write_text(json.dumps({"weight_map": {"a.weight": "stray.safetensors"}}))
    with pytest.raises(BaseModelError, match="that is not a .bin file"):
        weight_files(folder)


def test_a_damaged_base_header_is_a_base_model_error_naming_the_file(tmp_path):
    folder = _sharded(tmp_path, {"a.weight": SHARD})
    _rewrite(folder / SHARD, _entry("a.weight", data_offsets=[0, 4096]))
    with pytest.raises(
        BaseModelError, match=rf"^{re.escape(str(folder / SHARD))}: tensor 'a\.weight'.* span 4096"
    ) as caught:
        weight_files(folder)
    assert isinstance(caught.value.__cause__, HeaderError)


def test_load_base_checks_the_headers_before_the_libraries_read_them(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    path = _file(folder)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    path.write_bytes(data)
    with pytest.raises(BaseModelError, match=rf"^{re.escape(str(path))}: the safetensors header claims {2**60} "):
        load_base("AutoModelForCausalLM", str(folder))


# --- a base stored as pytorch_model.bin ------------------------------------------------------------------


def _legacy_claiming(path: Path, numel: int) -> None:
    """A pre-zip torch file whose pickle claims ``numel`` elements for its storage (an 8-byte integer)."""
    torch.save({"w": torch.zeros(70001)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    needle = b"J" + struct.pack("<i", 70001)  # the storage's element count, as pickle writes it
    at = data.index(needle)
    path.write_bytes(data[:at] + b"\x8a\x08" + struct.pack("<q", numel) + data[at + len(needle) :])


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_a_truncated_bin_is_a_base_model_error(tmp_path, zipped, keep):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=zipped)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep % len(data)])
    with pytest.raises(BaseModelError, match=re.escape(str(path))) as caught:
        PickledWeights(path)
    assert "\n" not in str(caught.value)


def test_a_legacy_bin_claiming_an_absurd_size_is_a_base_model_error(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    _legacy_claiming(path, 2**60)
    start = time.perf_counter()
    with pytest.raises(BaseModelError, match=rf"cannot read the base's weights {re.escape(str(path))}: .*damaged"):
        PickledWeights(path)
    assert time.perf_counter() - start < 5


# --- end to end, through the CLI -------------------------------------------------------------------------


def _damaged_base(trained, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(trained(FIXTURE).base, base)
    data = bytearray((base / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    (base / "model.safetensors").write_bytes(data)
    return base


def _one_line_exit_2(result, says: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and says in lines[-1], lines[-1]
    assert "Traceback" not in result.output and "MemoryError" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in memory"])
def test_convert_with_a_base_header_claiming_2_to_the_60_stops_in_one_line(trained, tmp_path, in_memory):
    from zero2merged.cli import main

    base = _damaged_base(trained, tmp_path)
    output = tmp_path / "out"
    args = ["convert", str(trained(FIXTURE).checkpoint), "--output", str(output), "--base-model", str(base)]
    result = CliRunner().invoke(main, args + (["--in-memory"] if in_memory else []))
    _one_line_exit_2(result, f"{base / 'model.safetensors'}: the safetensors header claims {2**60} bytes")
    assert not output.exists()


@pytest.mark.slow
def test_convert_with_an_index_naming_a_file_outside_the_base_stops_in_one_line(trained, tmp_path):
    from zero2merged.cli import main

    base = tmp_path / "base"
    shutil.copytree(trained(FIXTURE).base, base)
    (base / "model.safetensors").rename(tmp_path / "model.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../model.safetensors"}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    output = tmp_path / "out"
    args = ["convert", str(trained(FIXTURE).checkpoint), "--output", str(output), "--base-model", str(base)]
    result = CliRunner().invoke(main, args)
    _one_line_exit_2(result, "names a weight file '../model.safetensors' that is not a file of")
    assert not output.exists()


@pytest.mark.slow
def test_damaged_work_and_output_files_never_give_a_traceback(trained, tmp_path):
    """A store of the work directory damaged on disk is redone (its sha256 no longer matches); an output
    whose header is damaged is refused by ``verify`` in one line."""
    from zero2merged.cli import main

    fixture = trained(FIXTURE)
    output, work = tmp_path / "out", tmp_path / "work"
    args = ["convert", str(fixture.checkpoint), "--output", str(output), "--work-dir", str(work)]
    assert CliRunner().invoke(main, args).exit_code == 0
    expected = (output / names.WEIGHTS).read_bytes()
    shutil.rmtree(output)
    store = work / names.CONSOLIDATED
    data = bytearray(store.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    store.write_bytes(data)
    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0, rerun.output
    assert Reader(store).keys() and (output / names.WEIGHTS).read_bytes() == expected  # the store written anew

    weights = output / names.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    weights.write_bytes(data)
    result = CliRunner().invoke(main, ["verify", str(output), "--checkpoint", str(fixture.checkpoint)])
    _one_line_exit_2(result, f"{weights}: the safetensors header claims {2**60} bytes")

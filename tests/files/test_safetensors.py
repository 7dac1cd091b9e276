"""The chunked safetensors writer and reader against the safetensors library itself."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.safetensors_writer import Writer


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(37, 11, generator=generator).to(torch.bfloat16),
        "a.weight": torch.randn(5, 3, 2, generator=generator),
        "a.bias": torch.randn(7, generator=generator).to(torch.float16),
        "steps": torch.arange(4, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }


def test_writer_is_byte_identical_to_save_file_in_any_order_and_chunking(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    order = list(tensors)
    random.Random(1).shuffle(order)
    with Writer(tmp_path / "ours.safetensors", specs, {"format": "pt"}) as writer:
        for name in order:
            tensor = tensors[name]
            if tensor.dim() > 1 and tensor.shape[0] > 1:  # rows in uneven chunks, last chunk first
                cut = tensor.shape[0] // 3
                row_bytes = tensor[0].numel() * tensor.element_size()
                writer.write(name, tensor[cut:], cut * row_bytes)
                writer.write(name, tensor[:cut])
            else:
                writer.write(name, tensor)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_copied_ranges_land_like_written_tensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "source.safetensors")
    source = Reader(tmp_path / "source.safetensors")
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    with Writer(tmp_path / "copied.safetensors", specs, {}) as writer:
        for name in tensors:
            [(file, offset, nbytes)] = source.ranges(name)
            half = nbytes // 2
            writer.copy(name, file, offset + half, nbytes - half, half)
            writer.copy(name, file, offset, half)
    assert (tmp_path / "copied.safetensors").read_bytes() == (tmp_path / "source.safetensors").read_bytes()


def test_reader_gets_tensors_rows_and_chunks(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "t.safetensors")
    reader = Reader(tmp_path / "t.safetensors")
    assert set(reader.keys()) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(reader.get(name), tensor), name
    assert torch.equal(reader.get("b.weight", slice(4, 9)), tensors["b.weight"][4:9])
    chunks = list(reader.chunks("b.weight", chunk_bytes=100))
    assert len(chunks) > 1
    assert torch.equal(torch.cat([rows for _, rows in chunks]), tensors["b.weight"])
    assert [first for first, _ in chunks] == list(range(0, 37, chunks[0][1].shape[0]))


def test_incomplete_or_mistyped_writes_are_refused(tmp_path):
    specs = {"w": (torch.float32, [4, 4])}
    with pytest.raises(ValueError, match="not written whole"):
        with Writer(tmp_path / "short.safetensors", specs, {}) as writer:
            writer.write("w", torch.zeros(2, 4))
    with Writer(tmp_path / "typed.safetensors", specs, {}) as writer:
        with pytest.raises(ValueError, match="declared"):
            writer.write("w", torch.zeros(4, 4, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="past the end"):
            writer.write("w", torch.zeros(4, 4), 16)
        writer.write("w", torch.ones(4, 4))
    assert torch.equal(load_file(tmp_path / "typed.safetensors")["w"], torch.ones(4, 4))


def test_truncated_file_is_reported(tmp_path):
    save_file({"w": torch.ones(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        Reader(tmp_path / "t.safetensors").get("w")


def test_referenced_tensors_read_from_the_ranges_they_list(tmp_path):
    """A tensor listed by reference, its bytes split across two other files, reads like a stored one."""
    tensors = _tensors()
    weight = tensors.pop("b.weight")
    raw = weight.contiguous().view(torch.uint8).numpy().tobytes()
    cut = 5 * 11 * 2 + 6  # not on a row boundary
    (tmp_path / "one.bin").write_bytes(b"x" * 7 + raw[:cut])
    (tmp_path / "two.bin").write_bytes(raw[cut:] + b"y" * 3)
    ranges = [(str(tmp_path / "one.bin"), 7, cut), (str(tmp_path / "two.bin"), 0, len(raw) - cut)]
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    with Writer(
        tmp_path / "t.safetensors", specs, {"format": "pt"}, {"b.weight": (weight.dtype, list(weight.shape), ranges)}
    ) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert load_file(tmp_path / "t.safetensors").keys() == tensors.keys()  # other readers see the stored ones
    reader = Reader(tmp_path / "t.safetensors")
    assert set(reader.keys()) == {*tensors, "b.weight"} and reader.ranges("b.weight") == ranges
    assert reader.nbytes("b.weight") == len(raw)
    assert torch.equal(reader.get("b.weight"), weight)
    assert torch.equal(reader.get("b.weight", slice(3, 30)), weight[3:30])
    buffer = torch.empty(1000, dtype=torch.uint8)
    for first, rows in reader.chunks("b.weight", chunk_bytes=200, into=buffer):
        assert rows.data_ptr() == buffer.data_ptr() and torch.equal(rows, weight[first : first + len(rows)])
    assert reader.get("b.weight", into=torch.empty(10, dtype=torch.uint8)).shape == weight.shape  # too small: fresh

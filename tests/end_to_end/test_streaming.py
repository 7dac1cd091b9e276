"""The streaming conversion (the default) writes exactly the files the in-memory path writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fixtures import TESTED
from fixtures.build import free_port
from tests.helpers import convert_fixture
from zero2merged.checks import layers
from zero2merged.core.options import Tuning
from zero2merged.model.layouts import conversion_mapping
from zero2merged.model.modelfiles import files_in
from zero2merged.stages import shards

pytestmark = pytest.mark.slow


def _assert_identical(streamed, in_memory):
    """Weights, index, configs and tokenizer identical; the model cards differ only in the checks each path
    made (per layer when streaming, on the whole model in memory)."""
    names = [p.relative_to(in_memory) for p in files_in(in_memory)]
    assert [p.relative_to(streamed) for p in files_in(streamed)] == names
    for name in names:
        if str(name) == "README.md":
            continue
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name


@pytest.mark.parametrize("name", TESTED)
def test_streaming_output_is_byte_identical_to_in_memory(trained, tmp_path, name):
    fixture = trained(name)
    streamed = convert_fixture(fixture, tmp_path / "streamed")
    in_memory = convert_fixture(fixture, tmp_path / "in-memory", in_memory=True)
    _assert_identical(tmp_path / "streamed", tmp_path / "in-memory")
    assert streamed.stage("merge").result.layers  # each LoRA layer checked on its own
    assert "parity" in in_memory.stage("save").metrics  # the whole model's outputs checked


@pytest.mark.parametrize(
    "name,dtype",
    [("engine-z3-bf16", "bf16"), ("gpt2-tied-z3", "fp32"), ("t5-seq2seq-z3", "fp16"), ("modules-to-save-z3", "auto")],
)
def test_sharded_streaming_output_is_byte_identical_to_in_memory(trained, tmp_path, name, dtype):
    fixture = trained(name)
    convert_fixture(fixture, tmp_path / "streamed", max_shard_size="60KB", dtype=dtype)
    convert_fixture(fixture, tmp_path / "in-memory", max_shard_size="60KB", dtype=dtype, in_memory=True)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    _assert_identical(tmp_path / "streamed", tmp_path / "in-memory")


@pytest.mark.parametrize(
    "name,max_shard_size,dtype",
    [
        ("engine-z3-bf16", "5GB", "auto"),
        ("rslora-patterns-z3", "5GB", "fp32"),
        ("all-linear-z2", "60KB", "bf16"),
        ("t5-seq2seq-z3", "60KB", "fp16"),
        ("bert-features-z3", "20KB", "auto"),
    ],
)
def test_layers_merged_a_few_rows_at_a_time_write_the_same_files(
    trained, tmp_path, monkeypatch, name, max_shard_size, dtype
):
    """Linear layers merged in blocks of a few rows (at the fixtures' size a layer is one block) write what
    the in-memory path writes. Where a layer's bias and weight fall in different shards (BERT's, in 20 KB
    shards), the later shard is opened early and the merged rows written into it at once."""
    first_rows, early = [], []
    given, write, opened = layers.LayerMerger._weights_given, shards._ShardWriter.write, shards._ShardWriter._writer

    def weights_given(merger, path, layer):
        for first_row in given(merger, path, layer):
            first_rows.append(first_row)
            yield first_row

    def write_shard(writer, shard, progress):
        writer.turn = shard
        return write(writer, shard, progress)

    def writer_of(writer, shard):
        if shard != writer.turn and shard not in writer.open:
            early.append(shard)  # a later shard opened for rows made now
        return opened(writer, shard)

    monkeypatch.setattr(layers.LayerMerger, "_weights_given", weights_given)
    monkeypatch.setattr(shards._ShardWriter, "write", write_shard)
    monkeypatch.setattr(shards._ShardWriter, "_writer", writer_of)
    fixture = trained(name)
    convert_fixture(
        fixture, tmp_path / "blocks", max_shard_size=max_shard_size, dtype=dtype, tuning=Tuning(block_bytes=1024)
    )
    assert any(first_rows)  # a layer was given a block that does not start at its first row
    # transformers 5 saves BERT's bias apart from its weight in 20 KB shards; transformers 4 orders the tensors
    # otherwise and keeps them together (the files are the same as in memory either way, below)
    assert bool(early) == (name == "bert-features-z3" and conversion_mapping())
    convert_fixture(fixture, tmp_path / "in-memory", max_shard_size=max_shard_size, dtype=dtype, in_memory=True)
    _assert_identical(tmp_path / "blocks", tmp_path / "in-memory")


def _merge_metrics(output):
    work = output.with_name(output.name + ".zero2merged-work")
    return json.loads((work / "manifest.json").read_text())["stages"]["merge"]["result"]


def test_workers_share_the_shards_and_write_the_same_files(trained, tmp_path):
    fixture = trained("gpt2-tied-z3")
    report = convert_fixture(fixture, tmp_path / "workers", max_shard_size="60KB", workers=2)
    convert_fixture(fixture, tmp_path / "in-memory", max_shard_size="60KB", in_memory=True)
    _assert_identical(tmp_path / "workers", tmp_path / "in-memory")
    assert report.stage("merge").metrics["processes"] == 2


def test_torchrun_ranks_share_the_shards_and_write_the_same_files(trained, tmp_path):
    """``torchrun -m zero2merged convert``: rank 0 converts, both ranks write shards, one output."""
    fixture = trained("engine-z3-bf16")
    merged = tmp_path / "ranks"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "zero2merged",
        "convert",
        str(fixture.checkpoint),
        "--output",
        str(merged),
        "--max-shard-size",
        "60KB",
        "--json",
    ]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    convert_fixture(fixture, tmp_path / "in-memory", max_shard_size="60KB", in_memory=True)
    _assert_identical(merged, tmp_path / "in-memory")
    assert _merge_metrics(merged)["processes"] == 2

"""Stage records: fingerprints, current-or-not, atomic writes."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file

from zero2merged.files import safetensors_writer
from zero2merged.files.atomic import write_text_atomic
from zero2merged.files.safetensors_writer import Writer
from zero2merged.running.manifest import FileHashes, Manifest, fingerprint


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def _recorded(tmp_path):
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(b"weights")
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.put(
        "consolidate", {"status": "done", "fingerprint": "fp", "outputs": manifest.describe(tmp_path, [artifact])}
    )
    return artifact


def test_current_only_with_same_inputs_and_intact_outputs(tmp_path):
    artifact = _recorded(tmp_path)
    manifest = Manifest(tmp_path / "manifest.json")
    assert manifest.current("consolidate", "fp", tmp_path)
    assert not manifest.current("consolidate", "other", tmp_path)
    assert not manifest.current("merge", "fp", tmp_path)
    artifact.write_bytes(b"weighTs")  # same size, other bytes
    assert not manifest.current("consolidate", "fp", tmp_path)
    artifact.unlink()
    assert not manifest.current("consolidate", "fp", tmp_path)


def test_running_stage_is_not_current(tmp_path):
    _recorded(tmp_path)
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.put("consolidate", {"status": "running", "fingerprint": "fp"})
    assert not Manifest(tmp_path / "manifest.json").current("consolidate", "fp", tmp_path)


def test_damaged_manifest_means_redo_everything(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert Manifest(tmp_path / "manifest.json").stages == {}


def test_atomic_write_leaves_only_the_file(tmp_path):
    write_text_atomic(tmp_path / "x.json", json.dumps({"a": 1}))
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_file_hashed_as_it_is_written_hashes_like_the_finished_file(tmp_path, monkeypatch):
    """Tensors written out of order, the file handed on a finished beginning at a time (small steps here):
    the pieces hashed in the background make the sha256 of the whole file, and the prefixes only grow."""
    monkeypatch.setattr(safetensors_writer, "PREFIX_STEP", 1000)
    path = tmp_path / "shard.safetensors"
    tensors = {f"t{i}": torch.randn(40 + i, 9) for i in range(12)}
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    with FileHashes() as hashes:
        writer = Writer(path, specs, {"format": "pt"}, sync=False)
        flushing, prefixes = hashes.flush_as_written(path), []
        writer.on_prefix = lambda n: (prefixes.append(n), flushing.upto(n))
        for name in [*sorted(tensors)[6:], *sorted(tensors)[:6]]:  # the file's second half first
            half = tensors[name].shape[0] // 2
            writer.write(name, tensors[name][:half])
            writer.write(name, tensors[name][half:], half * 9 * 4)
        writer.close()
        flushing.done().result()
        assert hashes.sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prefixes == sorted(prefixes) and len(prefixes) > 2 and prefixes[-1] == path.stat().st_size
    assert load_file(path).keys() == tensors.keys()

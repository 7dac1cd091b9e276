"""Stage records: fingerprints, current-or-not, atomic writes."""

from __future__ import annotations

import json

from zero2merged.manifest import Manifest, fingerprint, write_text_atomic


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

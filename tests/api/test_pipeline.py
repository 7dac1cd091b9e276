"""The runner: reruns skip what is still valid, changed inputs redo it, a lock guards the work directory,
and inside a distributed job rank 0 works while the other ranks wait."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import zero2merged
from fixtures.build import free_port
from tests.helpers import saved_state
from zero2merged import STAGES, OutputError

pytestmark = pytest.mark.slow


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_convert_leaves_the_calling_process_as_it_found_it(trained, tmp_path):
    """Called from a training script: torch's thread count (one fewer during the merge) and the garbage
    collector (its objects frozen during the run) are as they were: nothing left frozen where the caller had
    frozen nothing, and a caller's own freeze kept."""
    fixture = trained("engine-z3-bf16")
    threads = torch.get_num_threads()
    gc.unfreeze()  # the caller's state to begin with (an in-process CLI test before may have frozen this one)
    zero2merged.convert(fixture.checkpoint, tmp_path / "first")
    assert torch.get_num_threads() == threads
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller that froze its own objects
    try:
        zero2merged.convert(fixture.checkpoint, tmp_path / "second")
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_second_run_is_a_noop_and_force_redoes(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    output = tmp_path / "merged"
    first = zero2merged.convert(fixture.checkpoint, output)
    assert [s.status for s in first.stages] == ["ran"] * 6 and first.skipped == []
    written = _hashes(output)

    second = zero2merged.convert(fixture.checkpoint, output)
    assert second.skipped == list(STAGES)
    assert _hashes(output) == written
    assert second.stage("merge").metrics == first.stage("merge").metrics

    # Another dtype into another output, same work directory: streaming, merge writes the output's dtype, so
    # it runs again (with rebuild and load, which share its model); in memory, only save casts.
    third = zero2merged.convert(fixture.checkpoint, tmp_path / "fp32", dtype="fp32", work_dir=first.work_dir)
    assert third.skipped == ["inspect", "consolidate"]
    in_memory = zero2merged.convert(
        fixture.checkpoint, tmp_path / "fp32-mem", dtype="fp32", work_dir=first.work_dir, in_memory=True
    )
    assert in_memory.skipped == ["inspect", "consolidate"]
    recast = zero2merged.convert(fixture.checkpoint, tmp_path / "bf16-mem", work_dir=first.work_dir, in_memory=True)
    assert recast.skipped == list(STAGES[:-1])
    weights_and_configs = {name: digest for name, digest in written.items() if name != "README.md"}
    assert {k: v for k, v in _hashes(tmp_path / "bf16-mem").items() if k != "README.md"} == weights_and_configs

    forced = zero2merged.convert(fixture.checkpoint, tmp_path / "forced", force=True, work_dir=first.work_dir)
    assert forced.skipped == []
    assert _hashes(tmp_path / "forced") == written  # and the same input gives the same bytes


def test_a_new_save_under_the_same_tag_is_converted_again(trained, tmp_path):
    """The Trainer's checkpoint-3 and checkpoint-6 hold the same shapes: only the rank files' values differ."""
    fixture = trained("trainer-z3-bf16")
    early, late = fixture.run_dir / "checkpoint-3", fixture.run_dir / "checkpoint-6"
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(early, checkpoint)
    work = tmp_path / "work"
    zero2merged.convert(checkpoint, tmp_path / "a", work_dir=work)

    for source in (late / "global_step6").iterdir():  # overwrite the rank files, keep the tag name
        shutil.copyfile(source, checkpoint / "global_step3" / source.name)
    redo = zero2merged.convert(checkpoint, tmp_path / "b", work_dir=work)
    assert redo.skipped == []
    zero2merged.convert(late, tmp_path / "c")
    b, c = saved_state(tmp_path / "b"), saved_state(tmp_path / "c")
    assert all(torch.equal(b[k], c[k]) for k in c)
    a = saved_state(tmp_path / "a")
    assert not all(torch.equal(a[k], c[k]) for k in c)


def test_corrupted_artifact_is_redone(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    report = zero2merged.convert(fixture.checkpoint, tmp_path / "merged")
    consolidated = tmp_path / "merged.zero2merged-work" / "consolidated.safetensors"
    data = bytearray(consolidated.read_bytes())
    data[-1] ^= 0xFF
    consolidated.write_bytes(bytes(data))
    again = zero2merged.convert(fixture.checkpoint, tmp_path / "merged")
    assert "consolidate" not in again.skipped and "inspect" in again.skipped
    assert again.stage("save").status == "skipped"  # the rebuilt artifact is byte-identical
    assert report.work_dir == again.work_dir


def test_second_run_on_a_busy_work_directory_stops(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="in use by another zero2merged run"):
            zero2merged.convert(fixture.checkpoint, tmp_path / "merged", work_dir=work)
    assert not (tmp_path / "merged").exists()


def test_a_run_that_finds_its_new_work_directory_taken_leaves_it_to_the_other(trained, tmp_path, monkeypatch):
    """Two runs on one output with the default work directory, started together: both find it absent, the
    other creates and locks it first. The run refused must not remove it (it is the other's, in use)."""
    fixture = trained("engine-z2-bf16")
    work = tmp_path / "merged.zero2merged-work"
    real_mkdir, held = type(work).mkdir, []

    def mkdir(self, *args, **kwargs):
        if self == work and not held:  # the other run gets there between our look and our mkdir
            real_mkdir(self)
            held.append(open(work / "lock", "w"))  # noqa: SIM115 - held to the test's end
            fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(work), "mkdir", mkdir)
    with pytest.raises(OutputError, match="in use by another zero2merged run"):
        zero2merged.convert(fixture.checkpoint, tmp_path / "merged")
    assert (work / "lock").is_file()  # the other run's, left as it was
    held[0].close()


def test_rank_zero_converts_and_every_rank_gets_the_report(trained, tmp_path):
    fixture = trained("engine-z3-bf16")
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, torch.distributed as dist, zero2merged
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        report = zero2merged.convert({str(fixture.checkpoint)!r}, {str(tmp_path / "merged")!r})
        try:
            zero2merged.convert({str(fixture.checkpoint)!r}, {str(tmp_path / "bad")!r}, tag="global_step404")
            error = None
        except zero2merged.Zero2MergedError as e:
            error = type(e).__name__
        with open(f"{tmp_path}/rank{{rank}}.json", "w") as f:
            json.dump({{"pid": os.getpid(), "output": report.output, "ran": [s.name for s in report.stages
                       if s.status == "ran"], "error": error}}, f)
        dist.destroy_process_group()
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(script),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["output"] == ranks[1]["output"] == str(tmp_path / "merged")
    assert ranks[0]["ran"] == ranks[1]["ran"] == list(STAGES)
    assert ranks[0]["error"] == ranks[1]["error"] == "CheckpointError"
    owner = (tmp_path / "merged.zero2merged-work" / "lock").read_text().strip()
    assert owner == str(ranks[0]["pid"])  # rank 0 did the work

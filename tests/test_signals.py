"""A scheduler's SIGTERM (sent before its SIGKILL at preemption or time-out) and Ctrl-C's SIGINT, sent from
outside to a ``zero2merged convert`` process in the middle of its merge stage: it stops at once with one line
and the shell's exit code for the signal, the half-written scratch removed, the finished stages kept, its
``--workers`` helpers ended; the rerun resumes from the finished stages and writes the same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# The command line, with the merge stage made to pause once its own shards are written (scratch on disk, the
# helpers alive): it says so, with the helpers' pids, in a file, and waits for the signal.
PAUSED_CONVERT = """
import multiprocessing, sys, time
from pathlib import Path
import zero2merged.stages.merge as merge_stage

real, marker = merge_stage.write_shards, Path(sys.argv[1])

def paused(*args, **kwargs):
    worst = real(*args, **kwargs)
    helpers = [p.pid for p in multiprocessing.active_children()]
    marker.write_text(" ".join(map(str, helpers)))
    time.sleep(60)
    return worst

merge_stage.write_shards = paused
from zero2merged.cli import main
sys.argv = ["zero2merged", *sys.argv[2:]]
main()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")  # a zombie has ended


def _manifest_stages(work: Path) -> dict:
    return json.loads((work / "manifest.json").read_text())["stages"]


@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_mid_stage_stops_cleanly_and_the_rerun_resumes(trained, tmp_path, sig, code, name):
    fixture = trained("engine-z2-bf16")
    output, marker = tmp_path / "merged", tmp_path / "paused"
    args = ["convert", str(fixture.checkpoint), "-o", str(output), "--max-shard-size", "60KB", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CONVERT, str(marker), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()[1]
    helpers = [int(pid) for pid in marker.read_text().split()]
    assert helpers, "the conversion was to have helper processes"
    work = tmp_path / "merged.zero2merged-work"
    assert list(work.glob(".*.tmp")), "the merge stage was to have scratch on disk"

    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)  # at once: not after the 60 s pause
    lines = [line for line in stderr.splitlines() if line.strip()]

    assert process.returncode == code, stderr
    assert lines[-1] == f"interrupted ({name}): the finished stages are kept; run the same command again to resume"
    assert "Traceback" not in stderr
    assert not output.exists() and not list(work.glob(".*.tmp")), "half-written files left behind"
    stages = _manifest_stages(work)
    done = {s for s, record in stages.items() if record.get("status") == "done"}
    assert {"inspect", "consolidate"} <= done and not {"merge", "save"} & done, stages
    time.sleep(0.5)
    assert not [pid for pid in helpers if _alive(pid)], "helper processes left running"

    rerun = subprocess.run(
        [sys.executable, "-m", "zero2merged", *args, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert [s["name"] for s in report["stages"] if s["status"] == "skipped"] == ["inspect", "consolidate"]
    clean = tmp_path / "clean"
    done = subprocess.run(
        [sys.executable, "-m", "zero2merged", *args[:3], str(clean), *args[4:]], env=env, capture_output=True
    )
    assert done.returncode == 0
    weights = sorted(p.name for p in clean.glob("*.safetensors"))
    assert len(weights) > 1 and weights == sorted(p.name for p in output.glob("*.safetensors"))
    for name_ in weights:
        assert (output / name_).read_bytes() == (clean / name_).read_bytes()

"""Two runs on one output at once, each with its own work directory (a job started twice, a scheduler's retry
while the first still runs): the first to finish puts its verified model in place whole; the other stops in
one line (an OutputError, exit code 2) with its own files removed and its finished stages kept. Never a
traceback, never the two runs' files mixed, never a staging folder left behind.

Why not let the second succeed when its files are the same: its report and manifest would describe files it
did not write (its model card names its own work directory), and telling "the same" needs the whole model
read again; a second run on one output is a mistake to be told, and its finished stages make a rerun elsewhere
cheap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import zero2merged

pytestmark = pytest.mark.slow

FIXTURE = "engine-z2-bf16"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}  # the card: paths


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "merged"
    zero2merged.convert(trained(FIXTURE).checkpoint, output)
    return _files(output)


def _left_beside(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if "partial" in p.name)


# A conversion as the command runs it, its move into place held until the other run's model is staged too,
# and (run b) until run a has moved its model: the interleaving the race needs, forced. The conversion holds
# process-wide state (torch's allow-list of pickled classes, its default device), so the runs are processes.
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from zero2merged.cli import main
    from zero2merged.stages import save

    checkpoint, output, work, role, sync, *options = sys.argv[1:]
    sync, other, real_place = Path(sync), "b" if role == "a" else "a", save.place

    def wait_for(path):
        for _ in range(6000):
            if path.exists():
                return
            time.sleep(0.1)
        raise SystemExit(f"run {role}: {path.name} never came")

    def place(staged, final):
        (sync / f"staged-{role}").write_text(str(staged))
        wait_for(sync / f"staged-{other}")  # both models staged and verified, side by side
        if role == "b":
            wait_for(sync / "placed-a")
        try:
            return real_place(staged, final)
        finally:
            (sync / f"placed-{role}").write_text("")

    save.place = place
    main(["convert", checkpoint, "-o", output, "--work-dir", work, "-q", *options])
""")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in memory"])
def test_two_runs_reaching_the_output_together_one_wins_the_other_stops_in_one_line(
    trained, tmp_path, reference, in_memory
):
    """Both runs have staged and verified their model beside the output before either moves it into place;
    then run a moves its model, then run b tries (before, both wrote one shared folder: the second run's
    start deleted the first's files, and its move failed with FileNotFoundError or OSError's text)."""
    fixture = trained(FIXTURE)
    output, sync = tmp_path / "merged", tmp_path / "sync"
    sync.mkdir()
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    runs = {
        role: subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(fixture.checkpoint),
                str(output),
                str(tmp_path / f"work-{role}"),
                role,
                str(sync),
                *(["--in-memory"] if in_memory else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for role in ("a", "b")
    }
    done = {role: (run.wait(timeout=900), *run.communicate()) for role, run in runs.items()}
    assert done["a"][0] == 0, done["a"]
    code, _, stderr = done["b"]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: the output {output} was written by another run while this one ran")
    staged = {(sync / f"staged-{role}").read_text() for role in ("a", "b")}
    assert len(staged) == 2 and all(Path(p).parent == tmp_path for p in staged)  # each its own folder
    assert _files(output) == reference  # run a's model, whole: no file of run b's in it
    assert _left_beside(output) == []
    resumed = zero2merged.convert(fixture.checkpoint, tmp_path / "elsewhere", work_dir=tmp_path / "work-b")
    assert "consolidate" in resumed.skipped  # run b's finished stages were kept


def test_two_processes_converting_to_one_output_at_once(trained, tmp_path, reference):
    """The race as it happens, unforced: two commands started together on one output, each with its own work
    directory. However they interleave, one writes the model and the other stops in one line."""
    fixture = trained(FIXTURE)
    output = tmp_path / "merged"
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zero2merged",
                "convert",
                str(fixture.checkpoint),
                "-o",
                str(output),
                "-q",
                "--work-dir",
                str(tmp_path / f"work-{name}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for name in ("a", "b")
    ]
    done = [(run.wait(timeout=900), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in done) == [0, 2], done
    _, _, stderr = next(d for d in done if d[0] == 2)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the output ") and "Traceback" not in stderr, stderr
    assert "was written by another run" in lines[0] or "is not empty" in lines[0]
    assert _files(output) == reference and _left_beside(output) == []

"""Staging folders: each run its own beside the output, the first to finish puts its files in place whole, the
other stops in one line; what a killed run left is removed by the next, what a live run writes never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zero2merged.core import names
from zero2merged.core.errors import OutputError
from zero2merged.files.staging import clear_stale, place, staging, staging_path


def _write(folder: Path, text: str) -> None:
    (folder / "model.safetensors").write_text(text)
    (folder / "config.json").write_text(text)


def _siblings(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name != output.name)


def test_each_run_stages_in_its_own_folder(tmp_path):
    output = tmp_path / "merged"
    first, second = staging_path(output), staging_path(output)
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(f".merged{names.PARTIAL_SUFFIX}-{os.getpid()}-")


def test_the_first_run_to_finish_is_put_in_place_whole_and_the_other_stops_in_one_line(tmp_path):
    """Two runs staging at once (the old shared folder let the second delete the first's files, or add its
    own to them): the first rename wins, the second is refused and its files removed, nothing mixed."""
    output = tmp_path / "merged"
    with staging(output) as a, staging(output) as b:
        assert a != b and a.is_dir() and b.is_dir()
        _write(a, "run A")
        _write(b, "run B")
        place(a, output)
        with pytest.raises(OutputError, match="was written by another run while this one ran") as refused:
            place(b, output)
        assert "\n" not in str(refused.value)
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors"]  # no marker either
    assert {p.read_text() for p in output.iterdir()} == {"run A"}
    assert _siblings(output) == []  # B's folder removed on its way out


def test_an_empty_output_folder_is_replaced(tmp_path):
    output = tmp_path / "merged"
    output.mkdir()
    with staging(output) as staged:
        _write(staged, "run A")
        place(staged, output)
    assert {p.read_text() for p in output.iterdir()} == {"run A"} and _siblings(output) == []


def test_a_failed_run_leaves_no_staging_folder(tmp_path):
    output = tmp_path / "merged"
    with pytest.raises(RuntimeError), staging(output) as staged:
        _write(staged, "half")
        raise RuntimeError("a check failed")
    assert not output.exists() and _siblings(output) == []


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from zero2merged.files.staging import staging

    with staging(Path(sys.argv[1])) as staged:
        (staged / "model.safetensors").write_text("half")
        print(staged, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_runs_folder_is_removed_by_the_next_a_live_or_unmarked_one_never(tmp_path):
    output = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    killed = Path(done.stdout.strip())
    assert killed.is_dir() and killed.parent == tmp_path
    unmarked = tmp_path / f".merged{names.PARTIAL_SUFFIX}-1-notours"  # no marker: not known to be a run's
    unmarked.mkdir()
    with staging(output) as live:
        assert not killed.exists() and unmarked.is_dir()  # removed as this run began
        assert clear_stale(output) == []  # a live run's folder (its marker locked) is left alone
        assert live.is_dir()
    assert sorted(_siblings(output)) == [unmarked.name]

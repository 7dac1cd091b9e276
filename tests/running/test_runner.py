"""The runner on toy stages: a rerun skips what is current, a changed input redoes that stage and every one
after it, a group is run or skipped as one, and a failed stage leaves the earlier records and no scratch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from zero2merged.core.records import StageResult
from zero2merged.running.manifest import FileHashes
from zero2merged.running.runner import Runner, Stage


@dataclass
class Written(StageResult):
    text: str


class Write(Stage[Written]):
    """Writes ``text`` (and what the stage before it wrote) to ``<name>.txt``; counts its runs."""

    result_type = Written
    runs: dict[str, int] = {}

    def __init__(self, name: str, work: Path, text: str, before: Write | None = None, fail: bool = False):
        self.name, self.work, self.text, self.before, self.fail = name, work, text, before, fail

    def inputs(self) -> dict:
        return {"text": self.text}

    def outputs(self) -> list[Path]:
        return [self.work / f"{self.name}.txt"]

    def scratch(self) -> list[Path]:
        return [self.work / f"{self.name}.tmp"]

    def run(self) -> Written:
        Write.runs[self.name] = Write.runs.get(self.name, 0) + 1
        (self.work / f"{self.name}.tmp").mkdir(exist_ok=True)
        if self.fail:
            raise RuntimeError("failed")
        text = self.text + (self.before.result.text if self.before else "")
        (self.work / f"{self.name}.txt").write_text(text)
        return Written(text)


def _convert(work: Path, texts: dict[str, str], *, force: bool = False, fail: str = "") -> list[str]:
    """Stages a, then b and c as a group, then d; returns the statuses."""
    with FileHashes() as hashes:
        runner = Runner(work, force=force, hashes=hashes, order=tuple(texts))
        a = Write("a", work, texts["a"], fail=fail == "a")
        runner.run(a)
        b = Write("b", work, texts["b"], a, fail=fail == "b")
        c = Write("c", work, texts["c"], b, fail=fail == "c")
        runner.run_together(b, c)
        d = Write("d", work, texts["d"], c)
        assert runner.run(d).text == texts["d"] + texts["c"] + texts["b"] + texts["a"]
        return [report.status for report in runner.reports]


@pytest.fixture(autouse=True)
def _count():
    Write.runs = {}


TEXTS = {"a": "1", "b": "2", "c": "3", "d": "4"}


def test_rerun_skips_and_hands_on_the_same_results(tmp_path):
    assert _convert(tmp_path, TEXTS) == ["ran"] * 4
    assert _convert(tmp_path, TEXTS) == ["skipped"] * 4  # d's result, read back, is still a Written
    assert Write.runs == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert _convert(tmp_path, TEXTS, force=True) == ["ran"] * 4


def test_a_changed_input_redoes_that_stage_and_every_one_after(tmp_path):
    _convert(tmp_path, TEXTS)
    assert _convert(tmp_path, {**TEXTS, "a": "x"}) == ["ran"] * 4
    assert _convert(tmp_path, {**TEXTS, "a": "x", "d": "y"}) == ["skipped"] * 3 + ["ran"]


def test_a_group_runs_whole_when_one_member_is_not_current(tmp_path):
    _convert(tmp_path, TEXTS)
    (tmp_path / "c.txt").write_text("damaged")
    assert _convert(tmp_path, TEXTS) == ["skipped", "ran", "ran", "skipped"]  # d's input chain is unchanged
    assert (tmp_path / "c.txt").read_text() == "321"


def test_a_failed_stage_keeps_the_earlier_records_and_removes_its_scratch(tmp_path):
    with pytest.raises(RuntimeError):
        _convert(tmp_path, TEXTS, fail="b")
    assert not (tmp_path / "b.tmp").exists() and (tmp_path / "a.tmp").exists()
    assert _convert(tmp_path, TEXTS) == ["skipped", "ran", "ran", "ran"]

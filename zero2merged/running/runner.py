"""Stages, and the runner that skips those still valid.

A :class:`Stage` declares its name, what it depends on (:meth:`~Stage.inputs`), the files it writes
(:meth:`~Stage.outputs`) and how it runs (:meth:`~Stage.run`, returning a typed result). The
:class:`Runner` fingerprints a stage's inputs together with the fingerprint of the stage before it (every
stage is deterministic, so an unchanged chain means unchanged results), then skips it when the manifest's
record is current or runs it and records it. Stages that share state in memory (the model rebuild, load
and merge work on) are run as one group: all skipped, or all run.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from zero2merged.core import names
from zero2merged.core.errors import OutputError
from zero2merged.core.records import StageResult
from zero2merged.running.manifest import FileHashes, Manifest, fingerprint
from zero2merged.running.report import StageReport

log = logging.getLogger(__name__)

R = TypeVar("R", bound=StageResult)


class Stage(Generic[R]):
    """One step of a conversion. Subclasses set :attr:`name` and :attr:`result_type` and implement
    :meth:`run`; the runner sets :attr:`result` once the stage ran or was found still valid."""

    name: ClassVar[str]
    result_type: ClassVar[type[StageResult]]
    result: R

    def inputs(self) -> dict:
        """What, besides the stages before it, decides this stage's result (fingerprinted)."""
        return {}

    def outputs(self) -> list[Path]:
        """The files it wrote (hashed into its record): a rerun redoes it if any changed."""
        return []

    def root(self, work_dir: Path) -> Path:
        """The folder :meth:`outputs` are recorded relative to."""
        return work_dir

    def scratch(self) -> list[Path]:
        """Folders of half-written files, removed when it fails."""
        return []

    def run(self) -> R:
        raise NotImplementedError


class Runner:
    """Runs stages through a work directory's manifest, and keeps their reports.

    Args:
        work_dir: The work directory (its manifest is read now).
        force: Run every stage, current or not.
        hashes: The run's file hashes (and background flushes).
        order: The names of all the stages to come, in order (for the log: "stage 2 of 6").
    """

    def __init__(self, work_dir: Path, *, force: bool, hashes: FileHashes, order: tuple[str, ...]):
        self.work_dir, self.force, self.order = work_dir, force, order
        self.manifest = Manifest(work_dir / names.MANIFEST, hashes)
        self.reports: list[StageReport] = []
        self._chain = ""  # the fingerprint of the last stage run or skipped

    def run(self, stage: Stage[R]) -> R:
        """Run ``stage`` unless it is still current; returns its result."""
        return self.run_together(stage)[0]

    def run_together(self, *stages: Stage) -> list:
        """Run ``stages``, which share state in memory, as one: all skipped when each is still current, else
        all run, in order; returns their results."""
        prints = []
        for stage in stages:
            self._chain = fingerprint({"stage": stage.name, "after": self._chain, "inputs": stage.inputs()})
            prints.append(self._chain)
        records = [
            None if self.force else self.manifest.current(stage.name, fp, stage.root(self.work_dir))
            for stage, fp in zip(stages, prints, strict=True)
        ]
        if all(records):
            for stage, record in zip(stages, records, strict=True):
                stage.result = stage.result_type.from_dict(record["result"])
                log.info("%s: skipped (its result is still valid)", stage.name)
                self.reports.append(StageReport(stage.name, "skipped", 0.0, stage.result))
        else:
            for stage, fp in zip(stages, prints, strict=True):
                self._run(stage, fp)
        return [stage.result for stage in stages]

    def _run(self, stage: Stage, fp: str) -> None:
        """Run one stage and record it with its result and output files. If it fails, its scratch folders
        are removed; the earlier stages' records stay, so a rerun starts from this stage."""
        log.info("%s: running (stage %d of %d)", stage.name, self.order.index(stage.name) + 1, len(self.order))
        self.manifest.put(stage.name, {"status": "running", "fingerprint": fp})
        start = time.perf_counter()
        try:
            stage.result = stage.run()
        except BaseException as e:
            for path in stage.scratch():
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(
                    f"{stage.name}: no space left on the device ({e.filename or self.work_dir}); free "
                    "some, or put --work-dir and --output on a larger filesystem, and run again (the "
                    "finished stages are kept)"
                ) from e
            raise
        outputs = self.manifest.describe(stage.root(self.work_dir), stage.outputs())  # hashing is part of its cost
        seconds = time.perf_counter() - start
        self.manifest.put(
            stage.name,
            {
                "status": "done",
                "fingerprint": fp,
                "result": stage.result.to_dict(),
                "outputs": outputs,
                "seconds": round(seconds, 3),
            },
        )
        self.reports.append(StageReport(stage.name, "ran", seconds, stage.result))
        log.info("%s: done in %.2f s", stage.name, seconds)

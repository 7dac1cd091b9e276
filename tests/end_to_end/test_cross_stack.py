"""Checkpoints between the oldest supported stack and today's (``make test-oldest``, marker ``oldest``).

The oldest stack lives in a venv of its own (``build/oldest``, made by the Makefile from constraints-oldest.txt);
its Python is ``$ZERO2MERGED_OLDEST_PYTHON``. A checkpoint trained by one stack is converted by both: in this
process (today's stack) and by the other's ``zero2merged convert`` in a subprocess. Each output is judged
against the reference computed in the stack that trained the checkpoint (DeepSpeed's consolidation + PEFT's
merge in fp32, :mod:`fixtures.maker_reference`, nothing of zero2merged), and the oldest stack's ``verify``
passes on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import zero2merged
from fixtures import SPECS, Fixture
from fixtures.build import RECORD
from tests.helpers import as_saved, assert_within_one_rounding, reference_model, saved_state, tied_groups

pytestmark = [pytest.mark.slow, pytest.mark.oldest]

ROOT = Path(__file__).resolve().parents[2]
# A raw engine's ZeRO-3 save (partitioned masters, frozen weights in the model-state files), the Trainer's
# ZeRO-2 one, and GPT-2's tied embedding trained apart (modules_to_save on lm_head), Conv1D layers.
MOVED = ["engine-z3-bf16", "trainer-z2-bf16", "gpt2-lm-head-z2"]


@pytest.fixture(scope="session")
def oldest() -> str:
    python = os.environ.get("ZERO2MERGED_OLDEST_PYTHON")
    if not python or not Path(python).is_file():
        pytest.fail("set ZERO2MERGED_OLDEST_PYTHON to the oldest stack's python (make test-oldest does)")
    return python


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, (
        f"{' '.join(command[:4])} …: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}"
    )
    return done


@pytest.fixture(scope="session")
def trained_by_oldest(oldest, tmp_path_factory):
    """``get(name)`` -> (fixture, its reference file): trained by the oldest stack (cached beside today's
    fixtures, in a folder of its own), the reference computed there (unless ``reference=False``)."""
    root = Path(os.environ.get("ZERO2MERGED_FIXTURES") or ROOT / "fixtures" / ".cache") / "oldest"
    made = {}

    def get(name: str, *, reference: bool = True) -> tuple[Fixture, Path | None]:
        if name not in made:
            done = _run([oldest, "-m", "fixtures", "build", name], ZERO2MERGED_FIXTURES=str(root))
            folder = Path(done.stdout.strip().splitlines()[-1])
            record = json.loads((folder / RECORD).read_text())
            assert record["versions"]["transformers"].startswith("4."), record["versions"]
            made[name] = Fixture(SPECS[name], folder), None
        fixture, file = made[name]
        if reference and file is None:
            file = tmp_path_factory.mktemp(f"{name}-oldest") / "reference.safetensors"
            _run([oldest, str(ROOT / "fixtures" / "maker_reference.py"), str(fixture.root), str(file)])
            made[name] = fixture, file
        return made[name]

    return get


def _reference(path: Path) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    with safe_open(str(path), "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 - safe_open is not a dict
        return tensors, json.loads(file.metadata()["tied"])


def _assert_matches(output: Path, reference: dict[str, torch.Tensor], tied: list[list[str]]) -> None:
    """The output's tensors are the reference's, each rounded once to the saved dtype; tied names written once."""
    ours = saved_state(output)
    for group in tied:
        assert len(set(group) & set(ours)) == 1, group
    assert set(ours) <= set(reference)
    assert set(reference) - set(ours) <= {name for group in tied for name in group}
    for name, tensor in ours.items():
        if tensor.dtype == torch.float32:  # PEFT's merge on both sides: see tests.helpers.FP32_RTOL
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert_within_one_rounding(tensor, reference[name], name)


def _convert_and_verify_in_oldest(oldest: str, checkpoint: Path, output: Path) -> None:
    _run([oldest, "-m", "zero2merged", "-q", "convert", str(checkpoint), "--output", str(output)])
    done = _run([oldest, "-m", "zero2merged", "verify", str(output), "--checkpoint", str(checkpoint)])
    assert done.stdout.startswith("PASS"), done.stdout


@pytest.mark.parametrize("name", MOVED)
def test_a_checkpoint_from_the_oldest_stack_converts_in_both(oldest, trained_by_oldest, tmp_path, name):
    fixture, reference_file = trained_by_oldest(name)
    reference, tied = _reference(reference_file)
    zero2merged.convert(fixture.checkpoint, tmp_path / "today")
    _assert_matches(tmp_path / "today", reference, tied)
    assert zero2merged.verify(tmp_path / "today", fixture.checkpoint).passed
    _convert_and_verify_in_oldest(oldest, fixture.checkpoint, tmp_path / "oldest")
    _assert_matches(tmp_path / "oldest", reference, tied)


@pytest.mark.parametrize("name", MOVED)
def test_a_checkpoint_from_todays_stack_converts_in_the_oldest(oldest, trained, tmp_path, name):
    fixture = trained(name)
    saved = as_saved(reference_model(fixture))
    reference = {key: tensor.contiguous() for key, tensor in saved.items()}
    _convert_and_verify_in_oldest(oldest, fixture.checkpoint, tmp_path / "oldest")
    _assert_matches(tmp_path / "oldest", reference, tied_groups(saved))


def test_a_zero0_bf16_save_of_the_oldest_deepspeed_is_refused_in_one_line(trained_by_oldest, tmp_path):
    """DeepSpeed 0.17 saves no optimizer state under ZeRO-0 with bf16: the fp32 masters are not in the files,
    and a model from the bf16 copies would not be the trained one."""
    from click.testing import CliRunner

    from zero2merged.cli import main

    fixture, _ = trained_by_oldest("zero0-bf16", reference=False)
    result = CliRunner().invoke(main, ["convert", str(fixture.checkpoint), "--output", str(tmp_path / "never")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "holds no optimizer state" in lines[0] and "fp32 master weights are not in the checkpoint" in lines[0]
    assert not (tmp_path / "never").exists()

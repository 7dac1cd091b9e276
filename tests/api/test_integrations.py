"""The merged model as the last step of training, in real 2-rank DeepSpeed runs on CPU: the examples'
Trainer callback and custom-loop export, each checked against the checkpoint it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import zero2merged
from fixtures.build import free_port, remove_shm_buffers

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(EXAMPLES / script),
        *args,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    finally:
        remove_shm_buffers(port)


@pytest.mark.parametrize(
    "script,checkpoint", [("train_with_trainer.py", "checkpoint-3"), ("train_custom_loop.py", "checkpoint")]
)
def test_training_script_ends_with_a_verified_merged_model(trained, tmp_path, script, checkpoint):
    base = trained("engine-z3-bf16").base  # a tiny Llama with its tokenizer
    extra = ["--cpu"] if script == "train_with_trainer.py" else []
    done = _launch(script, "--base-model", str(base), "--output-dir", str(tmp_path), "--steps", "3", *extra)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "-> " + str(tmp_path / "merged") in done.stdout  # rank 0 printed the report
    report = zero2merged.verify(tmp_path / "merged", tmp_path / checkpoint)
    assert (
        report.passed and report.parity["top1_agreement"] >= 0.9
    )  # verify's bf16 tolerance (zero2merged.checks.parity)
    assert (tmp_path / "merged" / "README.md").is_file()

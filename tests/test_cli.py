"""The command line: help everywhere, one-line errors with the right exit codes, JSON that parses."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from zero2merged.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _commands():
    return list(main.commands.items())


@pytest.mark.parametrize("name,command", _commands())
def test_every_command_and_option_has_help(name, command):
    assert command.help and command.help.strip(), name
    assert "Example" in command.help, name
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts}"
    result = _run(name, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "zero2merged", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "version" in done.stdout


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    result = _run("convert", tmp_path, "--output", tmp_path.parent / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "not a DeepSpeed checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not (tmp_path.parent / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = _run("--debug", "inspect", tmp_path)
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "CheckpointError"


@pytest.mark.parametrize("where", ["before", "after"])
def test_output_flags_are_taken_before_or_after_the_command(tmp_path, where):
    flags = ["--debug", "-q"]
    args = ["inspect", tmp_path]
    result = _run(*(flags + args if where == "before" else args + flags))
    assert type(result.exception).__name__ == "CheckpointError", result.output  # --debug: the exception itself
    for flag in ("-q", "-v", "--quiet", "--verbose"):
        refused = _run(*(([flag] + args) if where == "before" else (args + [flag])))
        assert refused.exit_code == 2 and "No such option" not in refused.stderr, refused.stderr


def test_a_usage_error_is_one_line(tmp_path):
    result = _run("convert", tmp_path, "-o", tmp_path / "x", "--bogus")
    assert result.exit_code == 2 and result.stderr.startswith("error: No such option '--bogus'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exit_2(tmp_path):
    assert _run("convert", tmp_path).exit_code == 2  # --output missing
    assert _run("convert", tmp_path, "-o", tmp_path / "x", "--dtype", "int8").exit_code == 2
    assert _run("convert", tmp_path, "-o", tmp_path / "x", "--workers", "0").exit_code == 2
    both = _run("convert", tmp_path, "-o", tmp_path / "x", "--workers", "2", "--in-memory")
    assert both.exit_code == 2 and "apply to the streaming conversion" in both.stderr


def _a_tag(tmp_path):
    """A folder that resolves to a tag (``latest`` and its folder): enough to reach the first stage."""
    run = tmp_path / "run"
    (run / "global_step1").mkdir(parents=True)
    (run / "latest").write_text("global_step1")
    return run


def _raise_internal(*args, **kwargs):
    raise ValueError("a param table of 3 groups for 4 groups of masters\n  and a second line")


def test_an_internal_error_is_one_line_exit_3_and_leaves_nothing(tmp_path, monkeypatch):
    """A stage that raises something other than the library's errors (a bug, or a checkpoint it does not
    understand) stops in one line naming the exception, exit code 3, no traceback, nothing left behind."""
    from zero2merged.stages.inspect import Inspect

    monkeypatch.setattr(Inspect, "run", _raise_internal)
    output = tmp_path / "out"
    result = _run("convert", _a_tag(tmp_path), "-o", output)
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == [
        "internal error: ValueError: a param table of 3 groups for 4 groups of masters (this is a bug in "
        "zero2merged, or a checkpoint it does not understand; rerun with --debug for the traceback and report it)"
    ]
    assert "Traceback" not in result.output and not result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output, no work directory


def test_an_internal_error_in_another_command_is_one_line_too(tmp_path, monkeypatch):
    monkeypatch.setattr("zero2merged.stages.inspect.inspect_checkpoint", _raise_internal)
    result = _run("inspect", _a_tag(tmp_path))
    assert result.exit_code == 3 and result.stderr.startswith("internal error: ValueError: a param table")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_an_internal_errors_traceback(tmp_path, monkeypatch, where):
    from zero2merged.stages.inspect import Inspect

    monkeypatch.setattr(Inspect, "run", _raise_internal)
    args = ["convert", _a_tag(tmp_path), "-o", tmp_path / "out"]
    result = _run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert isinstance(result.exception, ValueError) and "internal error" not in result.output


def test_a_library_error_keeps_exit_2_and_clicks_exit_its_code(tmp_path, monkeypatch):
    from zero2merged.core.errors import CheckpointError
    from zero2merged.stages.inspect import Inspect

    def refuse(self):
        raise CheckpointError("the rank file lacks its param table")

    monkeypatch.setattr(Inspect, "run", refuse)
    run = _a_tag(tmp_path)
    refused = _run("convert", run, "-o", tmp_path / "out")
    assert refused.exit_code == 2 and refused.stderr == "error: the rank file lacks its param table\n"

    def leave(self):
        raise click.exceptions.Exit(5)  # click's own way out, a RuntimeError: not an internal error

    monkeypatch.setattr(Inspect, "run", leave)
    assert _run("convert", run, "-o", tmp_path / "out").exit_code == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_in_one_line(tmp_path):
    result = _run("convert", tmp_path, "-o", tmp_path.parent / "out", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_inspect_readable_and_json(trained):
    fixture = trained("trainer-z3-bf16")
    result = _run("inspect", fixture.checkpoint)
    assert result.exit_code == 0
    assert "stage 3, 2 ranks, bf16" in result.output and "not saved: taken from the base" in result.output
    assert "8 tensors, 3,584 params, 14.3 KB (fp32 masters)" in result.output  # r=8 on q, v of 2 layers x 64
    assert "adapter_model.safetensors holds the Trainer's 16-bit copies" in result.output
    data = json.loads(_run("inspect", fixture.checkpoint, "--json").output)
    assert data["layout"]["zero_stage"] == 3 and data["tag"] == "global_step6"


@pytest.mark.slow
def test_convert_then_verify_pass_and_fail(trained, tmp_path):
    fixture = trained("engine-z3-bf16")
    result = _run("convert", fixture.checkpoint, "-o", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["status"] for s in report["stages"]] == ["ran"] * 6

    passed = _run("verify", tmp_path / "merged", "--checkpoint", fixture.checkpoint, "--json")
    assert passed.exit_code == 0
    assert json.loads(passed.stdout)["passed"] is True

    # The bare base is not the merged model: verify says so with exit code 1.
    failed = _run("verify", fixture.base, "--checkpoint", fixture.checkpoint)
    assert failed.exit_code == 1
    assert failed.stdout.startswith("FAIL: ") and "top-1 agreement" in failed.stdout

    # The same check against the PEFT adapter exported from the checkpoint, on real prompts.
    assert _run("export-adapter", fixture.checkpoint, "-o", tmp_path / "adapter").exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t1 t2 t3 t4\n\nt9 t8 t7\nt5 t5 t5 t5 t5 t5\n")
    with_adapter = _run(
        "verify",
        tmp_path / "merged",
        "--adapter",
        tmp_path / "adapter",
        "--base-model",
        fixture.base,
        "--prompts",
        prompts,
    )
    assert with_adapter.exit_code == 0, with_adapter.output
    assert with_adapter.stdout.startswith("PASS: ") and "on 3 prompts from" in with_adapter.stdout
    assert (
        _run(
            "verify",
            fixture.base,
            "--adapter",
            tmp_path / "adapter",
            "--base-model",
            fixture.base,
            "--prompts",
            prompts,
        ).exit_code
        == 1
    )
    neither = _run("verify", tmp_path / "merged")
    assert neither.exit_code == 2 and "--checkpoint or --adapter" in neither.stderr

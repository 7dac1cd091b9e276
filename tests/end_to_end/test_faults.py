"""Faults: bad input stops in one line (exit 2, no traceback, nothing half-written left behind); a killed
run or a full disk leaves no model that looks complete and resumes to the same bytes; untrusted files are
refused. The README's fault table lists these cases."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import zero2merged
from zero2merged.checkpoint.layout import rank_files
from zero2merged.cli import main
from zero2merged.files import safetensors_writer
from zero2merged.running.manifest import Manifest

pytestmark = pytest.mark.slow

FIXTURE = "engine-z2-bf16"  # saves frozen params, adapter config beside `latest`, 2 ranks


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """The files an uninterrupted conversion writes (in 60 KB shards, so there are several)."""
    output = tmp_path_factory.mktemp("reference") / "merged"
    zero2merged.convert(trained(FIXTURE).checkpoint, output, max_shard_size="60KB")
    return _files(output)


@pytest.fixture
def run_copy(trained, tmp_path):
    """A writable copy of the fixture's checkpoint folder (its adapter config names the base by path)."""
    copy = tmp_path / "run"
    shutil.copytree(trained(FIXTURE).checkpoint, copy)
    return copy


def _tag_dir(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


# --- bad input -----------------------------------------------------------------------------------------


def _resave(path: Path, change) -> None:
    """Rewrite a rank file after ``change(state)`` (the test's own torch.save: a real, loadable file)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    change(state)
    torch.save(state, path)


def _other_base(trained, tmp_path, run):
    return ["--base-model", str(trained("gpt2-lm-head-z2").base)]


def _perturbed_base(trained, tmp_path, run):
    base = tmp_path / "base"
    shutil.copytree(trained(FIXTURE).base, base)
    weights = load_file(base / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.25
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return ["--base-model", str(base)]


def _adapter_config(*, drop: str | None = None, **changes):
    def change(trained, tmp_path, run):
        path = run / "adapter_config.json"
        config = {**json.loads(path.read_text()), **changes}
        config.pop(drop, None)
        path.write_text(json.dumps(config))
        return []

    return change


def _base_config(**changes):
    def change(trained, tmp_path, run):
        base = tmp_path / "base"
        shutil.copytree(trained(FIXTURE).base, base)
        path = base / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))  # json writes NaN as NaN
        return ["--base-model", str(base)]

    return change


def _nan_master(trained, tmp_path, run):
    optim = rank_files(_tag_dir(run))[1][0]

    def poison(state):
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].data[0] = float("nan")

    _resave(optim, poison)
    return []


class _RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickled_base(trained, tmp_path, run):
    """A base stored as pytorch_model.bin whose pickle would run a command if it were unpickled in full."""
    base = tmp_path / "pickled-base"
    shutil.copytree(trained(FIXTURE).base, base)
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save({**weights, "payload": _RunsACommand(tmp_path / "custom-code-ran")}, base / "pytorch_model.bin")
    return ["--base-model", str(base)]


def _custom_code_base(trained, tmp_path, run):
    """A base whose config asks for its own Python code, which would leave a marker if it ever ran."""
    base = tmp_path / "custom-base"
    shutil.copytree(trained(FIXTURE).base, base)
    marker = tmp_path / "custom-code-ran"
    (base / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (base / "config.json").write_text(json.dumps(config))
    return ["--base-model", str(base)]


def _missing_rank_file(trained, tmp_path, run):
    rank_files(_tag_dir(run))[1][-1].unlink()
    return []


def _extra_rank_file(trained, tmp_path, run):
    optim = rank_files(_tag_dir(run))[1][-1]
    shutil.copy(optim, optim.with_name(optim.name.replace("rank_1_", "rank_2_")))
    return []


def _truncated_rank_file(trained, tmp_path, run):
    optim = rank_files(_tag_dir(run))[1][-1]
    optim.write_bytes(optim.read_bytes()[:4096])
    return []


def _latest_names_missing_tag(trained, tmp_path, run):
    (run / "latest").write_text("global_step99")
    return []


def _latest_not_text(trained, tmp_path, run):
    (run / "latest").write_bytes(b"\xffglobal_step6")
    return []


def _latest_long(trained, tmp_path, run):
    (run / "latest").write_bytes(b"a" * (1 << 20))
    return []


def _not_a_checkpoint(trained, tmp_path, run):
    shutil.rmtree(run)
    run.mkdir()
    (run / "notes.txt").write_text("not a checkpoint")
    return []


def _output_inside_input(trained, tmp_path, run):
    return ["--output", str(run / "merged")]


def _output_not_empty(trained, tmp_path, run):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    return []


BAD_INPUTS = {
    "not a checkpoint": (_not_a_checkpoint, "is not a DeepSpeed checkpoint"),
    "latest names a missing tag": (_latest_names_missing_tag, "'global_step99' has no folder"),
    "latest not text": (_latest_not_text, "does not hold a tag name (not UTF-8 text)"),
    "latest a megabyte long": (_latest_long, "does not hold a tag name (too long)"),
    "a tag name too long for a file name": (lambda *a: ["--tag", "t" * 300], "has no folder"),
    "tag leaves the checkpoint": (lambda *a: ["--tag", "../../etc"], "refusing to leave"),
    "a rank's files missing": (_missing_rank_file, "split across 2 ranks but 1 optimizer files"),
    "more rank files than partitions": (_extra_rank_file, "split across 2 ranks but 3 optimizer files"),
    "truncated rank file": (_truncated_rank_file, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "base of another architecture": (_other_base, "PEFT cannot apply the run's LoRA config to GPT2LMHeadModel"),
    "base with other weights": (_perturbed_base, "model.layers.1.mlp.down_proj.weight, max abs diff 0.25"),
    "adapter config with another r": (_adapter_config(r=4), "is [8, 64] in the checkpoint but [4, 64] with this"),
    "adapter config with other targets": (
        _adapter_config(target_modules=["k_proj", "o_proj"]),
        "adapter_config.json does not match the checkpoint",
    ),
    # PEFT would take its default (lora_alpha 8 for the run's 16), or ignore a key it does not know
    "adapter config lacking lora_alpha": (_adapter_config(drop="lora_alpha"), "lacks lora_alpha"),
    "adapter config with a key PEFT does not know": (
        _adapter_config(lora_future_scaling=2.0),
        "sets lora_future_scaling=2.0, which PEFT",
    ),
    "adapter config with lora_alpha null": (_adapter_config(lora_alpha=None), "lora_alpha a number"),
    "base config with a NaN": (_base_config(rms_norm_eps=float("nan")), "sets rms_norm_eps to nan"),
    "NaN in a trained weight": (_nan_master, "holds NaN or inf"),
    "base that needs its own code": (_custom_code_base, "never runs code from a model folder"),
    "base .bin holding a pickled object": (_pickled_base, "holds pickled objects other than tensors"),
    "output inside the checkpoint": (_output_inside_input, "overlaps the checkpoint"),
    "output not empty": (_output_not_empty, "is not empty"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(trained, tmp_path, run_copy, case):
    change, says = BAD_INPUTS[case]
    extra = change(trained, tmp_path, run_copy)
    output = tmp_path / "out"
    args = ["convert", str(run_copy), "--output", str(output), *extra]
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[-1].startswith("error: ") and says in lines[-1], lines[-1]
    assert not any(line.startswith("error") for line in lines[:-1]) and "Traceback" not in result.output
    assert (
        [p.name for p in output.iterdir()] == (["mine.txt"] if case == "output not empty" else [])
        if output.exists()
        else True
    )
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.rglob(".merged.tmp"))
    work = tmp_path / "out.zero2merged-work"
    if work.exists():  # kept only for the stages that finished, so the corrected rerun starts after them
        assert any(r["status"] == "done" for r in Manifest(work / "manifest.json").stages.values())
    assert not (tmp_path / "custom-code-ran").exists()


@pytest.mark.parametrize("in_memory", [False, True], ids=["streaming", "in memory"])
def test_a_base_lacking_a_weight_the_checkpoint_did_not_save_is_refused(trained, tmp_path, in_memory):
    """The Trainer saves no frozen params: each comes from the base, which must have it (from_pretrained
    would initialize a missing one at random and say so only in a log line)."""
    fixture = trained("trainer-z3-bf16")
    base = tmp_path / "base"
    shutil.copytree(fixture.base, base)
    weights = load_file(base / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weigh_"] = weights.pop("model.layers.0.mlp.down_proj.weight")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    args = ["convert", str(fixture.checkpoint), "-o", str(tmp_path / "out"), "--base-model", str(base)]
    result = CliRunner().invoke(main, args + (["--in-memory"] if in_memory else []))
    line = result.stderr.strip().splitlines()[-1]
    says = "has no value for 1 weights" if in_memory else "give no model.layers.0.mlp.down_proj.weight"
    assert result.exit_code == 2 and says in line and not (tmp_path / "out").exists(), line


def test_nan_names_the_tensor(trained, tmp_path, run_copy):
    _nan_master(trained, tmp_path, run_copy)
    with pytest.raises(zero2merged.CheckpointError, match=r"trainable tensor base_model\.model\..*lora_A.*NaN"):
        zero2merged.convert(run_copy, tmp_path / "out")


# --- untrusted pickles ---------------------------------------------------------------------------------


def test_pickled_code_is_refused_unless_the_user_opts_in(tmp_path, run_copy):
    marker = tmp_path / "pickle-ran"
    model_states = rank_files(_tag_dir(run_copy))[0][0]
    _resave(model_states, lambda state: state.update(payload=_RunsACommand(marker)))

    refused = CliRunner().invoke(main, ["convert", str(run_copy), "--output", str(tmp_path / "out")])
    assert refused.exit_code == 2 and "refusing to load it" in refused.stderr and "--unsafe-pickle" in refused.stderr
    assert not marker.exists()

    trusted = CliRunner().invoke(main, ["convert", str(run_copy), "--output", str(tmp_path / "out"), "--unsafe-pickle"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()  # unpickled in full, as asked


# --- interruption --------------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    import zero2merged
    from zero2merged.files import safetensors_writer
    from zero2merged.stages import save

    checkpoint, output, point = sys.argv[1:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "consolidate":  # in the middle of writing the consolidated file
        calls = [0]
        for method in ("write", "copy"):
            def patched(self, *args, _original=getattr(safetensors_writer.Writer, method), **kwargs):
                calls[0] += 1
                if "consolidated" in self.path.name and calls[0] == 3:
                    die()
                return _original(self, *args, **kwargs)
            setattr(safetensors_writer.Writer, method, patched)
    elif point == "merge":  # after the first shard of the merged model was written
        original_close = safetensors_writer.Writer.close
        def close(self):
            original_close(self)
            if "merged.tmp" in str(self.path):
                die()
        safetensors_writer.Writer.close = close
    elif point == "save":  # the output written and verified beside its place, not yet renamed
        def place(staged, final):
            die()
        save.place = place
    zero2merged.convert(checkpoint, output, max_shard_size="60KB")
""")


@pytest.mark.parametrize(
    "point,resumes_after",
    [
        ("consolidate", ["inspect"]),
        ("merge", ["inspect", "consolidate"]),
        ("save", ["inspect", "consolidate", "rebuild", "load", "merge"]),
    ],
)
def test_killed_run_leaves_no_model_and_resumes_to_the_same_bytes(trained, tmp_path, reference, point, resumes_after):
    fixture = trained(FIXTURE)
    output = tmp_path / "merged"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run(
        [sys.executable, str(script), str(fixture.checkpoint), str(output), point],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not output.exists()  # never a model that looks complete but is not

    resumed = zero2merged.convert(fixture.checkpoint, output, max_shard_size="60KB")
    assert resumed.skipped == resumes_after
    assert _files(output) == reference
    assert not list(tmp_path.glob(".*partial*"))


# --- a full disk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["writing", "flushing"])
def test_full_disk_stops_cleanly_and_keeps_earlier_stages(trained, tmp_path, reference, monkeypatch, when):
    """The disk fills while a shard is written, or only when it is flushed (delayed allocation), which
    happens on a background thread: either way, one clean error from the merge stage."""
    fixture = trained(FIXTURE)
    output = tmp_path / "merged"
    real_pwrite, real_copy, real_fsync = os.pwrite, os.copy_file_range, os.fsync

    def into_merged(fd: int) -> bool:
        return ".merged.tmp" in os.readlink(f"/proc/self/fd/{fd}")

    def pwrite(fd, data, offset):
        if into_merged(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        if into_merged(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, count, offset_src, offset_dst)

    def fsync(fd):
        if into_merged(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    if when == "writing":
        monkeypatch.setattr(safetensors_writer.os, "pwrite", pwrite)
        monkeypatch.setattr(safetensors_writer.os, "copy_file_range", copy_file_range)
    else:
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(zero2merged.OutputError, match="merge: no space left on the device"):
        zero2merged.convert(fixture.checkpoint, output, max_shard_size="60KB")
    work = tmp_path / "merged.zero2merged-work"
    assert not output.exists() and not list(tmp_path.glob(".*partial*"))
    assert not (work / ".merged.tmp").exists()  # the half-written shards are gone
    manifest = Manifest(work / "manifest.json")
    assert manifest.current("consolidate", manifest.stages["consolidate"]["fingerprint"], work)  # intact

    monkeypatch.undo()  # space freed
    resumed = zero2merged.convert(fixture.checkpoint, output, max_shard_size="60KB")
    assert resumed.skipped == ["inspect", "consolidate"]
    assert _files(output) == reference


# --- the same input, the same bytes --------------------------------------------------------------------


def test_same_input_gives_byte_identical_files(trained, tmp_path, reference):
    zero2merged.convert(trained(FIXTURE).checkpoint, tmp_path / "again", max_shard_size="60KB")
    assert _files(tmp_path / "again") == reference

"""Stage 1: finding the tag, the LoRA config and the base; the errors a user meets there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures import SPECS
from zero2merged import (
    AdapterConfigError,
    BaseModelError,
    CheckpointError,
    inspect_checkpoint,
)
from zero2merged.checkpoint.location import resolve_tag
from zero2merged.stages.inspect import CheckpointInfo


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        resolve_tag(tmp_path / "nope", None)


def test_empty_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a DeepSpeed checkpoint"):
        resolve_tag(tmp_path, None)


def test_latest_naming_a_missing_tag_lists_the_tags(tmp_path):
    (tmp_path / "latest").write_text("global_step9")
    (tmp_path / "global_step3").mkdir()
    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'global_step9' has no folder .*tags found: global_step3"):
        resolve_tag(tmp_path, None)


@pytest.mark.parametrize("tag", ["../outside", "/etc", "a/b", ".."])
def test_tag_that_leaves_the_checkpoint_is_refused(tmp_path, tag):
    (tmp_path / "latest").write_text(tag)
    with pytest.raises(CheckpointError, match="refusing to leave"):
        resolve_tag(tmp_path, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["engine-z3-bf16", "trainer-z2-bf16", "engine-z1-bf16"])
def test_finds_config_and_base(trained, name):
    fixture = trained(name)
    info = inspect_checkpoint(fixture.checkpoint)
    assert info.adapter_config_path == str(fixture.checkpoint / "adapter_config.json")
    assert info.base_model == str(fixture.base.resolve())
    assert info.lora_config["r"] == SPECS[name].lora["r"]
    assert info.adapter_name == "default"
    assert info.tag == f"global_step{SPECS[name].steps}" and info.tags == [info.tag]
    assert CheckpointInfo.from_json(info.to_json()) == info
    if SPECS[name].layout == "trainer":
        assert any("not saved" in w for w in info.warnings)


@pytest.mark.slow
def test_tag_folder_itself_and_explicit_tag(trained):
    fixture = trained("engine-z2-bf16")
    by_latest = inspect_checkpoint(fixture.checkpoint)
    assert inspect_checkpoint(fixture.checkpoint / by_latest.tag) == by_latest
    assert inspect_checkpoint(fixture.checkpoint, tag=by_latest.tag) == by_latest
    with pytest.raises(CheckpointError, match="tags found: global_step6"):
        inspect_checkpoint(fixture.checkpoint, tag="global_step99")


@pytest.mark.slow
def test_run_folder_with_several_checkpoints(trained):
    fixture = trained("trainer-z3-bf16")  # run/checkpoint-3 and run/checkpoint-6
    newest = inspect_checkpoint(fixture.run_dir)
    assert (Path(newest.checkpoint).name, newest.tag) == ("checkpoint-6", "global_step6")
    assert newest.checkpoints == ["checkpoint-3", "checkpoint-6"]
    for tag in ("checkpoint-3", "global_step3"):
        chosen = inspect_checkpoint(fixture.run_dir, tag=tag)
        assert (Path(chosen.checkpoint).name, chosen.tag) == ("checkpoint-3", "global_step3")
    with pytest.raises(CheckpointError, match="checkpoints: checkpoint-3, checkpoint-6"):
        inspect_checkpoint(fixture.run_dir, tag="global_step9")


@pytest.mark.slow
def test_several_tags_in_one_folder(trained):
    fixture = trained("multi-tag-z2")  # global_step3 and global_step6, latest -> global_step6
    info = inspect_checkpoint(fixture.checkpoint)
    assert (info.tag, info.tags) == ("global_step6", ["global_step3", "global_step6"])
    assert inspect_checkpoint(fixture.checkpoint, tag="global_step3").layout.global_step == 3
    assert info.adapter_config_path == str(fixture.root / "adapter_config.json")  # found in the parent


@pytest.mark.slow
def test_missing_adapter_config_and_how_to_pass_it(trained, tmp_path):
    fixture = trained("engine-z3-fp32")  # saved without adapter_config.json
    with pytest.raises(AdapterConfigError, match="pass --adapter-config"):
        inspect_checkpoint(fixture.checkpoint)
    config = dict(SPECS["engine-z3-fp32"].lora, peft_type="LORA")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="pass --base-model"):
        inspect_checkpoint(fixture.checkpoint, adapter_config=tmp_path)
    info = inspect_checkpoint(
        fixture.checkpoint, adapter_config=tmp_path / "adapter_config.json", base_model=str(fixture.base)
    )
    assert info.base_model == str(fixture.base.resolve())


@pytest.mark.slow
def test_moved_base_model_is_named(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    copy = tmp_path / "run"
    shutil.copytree(fixture.checkpoint, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="does not exist here; pass --base-model"):
        inspect_checkpoint(copy)


@pytest.mark.slow
def test_not_a_lora_adapter(trained, tmp_path):
    fixture = trained("engine-z2-bf16")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterConfigError, match="IA3 adapter"):
        inspect_checkpoint(fixture.checkpoint, adapter_config=tmp_path)

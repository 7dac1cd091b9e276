"""The library's merge and save paths on a tiny model of a family, against PEFT's merge_and_unload +
save_pretrained (no DeepSpeed: the trained adapter is PEFT's own randomly initialized one, handed to the
stages as stage 2 would hand it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fixtures.families import Family, lora_for, tiny_config
from zero2merged.core.results import CheckpointInfo, ZeroLayout

DTYPE = torch.bfloat16


def build(family: Family, root: Path, seed: int = 0):
    """The family's base (saved in bf16 at ``root/base``), the run's LoRA config and its trained tensors
    (random, nonzero), and the stage-1 result a checkpoint of that run would give."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    auto = getattr(transformers, family.auto_class)
    auto.from_config(tiny_config(family), dtype=DTYPE).save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_for(family))
    model = get_peft_model(auto.from_pretrained(root / "base", dtype=torch.float32), config)
    trained = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    config.save_pretrained(root / "adapter")
    lora = json.loads((root / "adapter" / "adapter_config.json").read_text())
    lora["base_model_name_or_path"] = str(root / "base")
    layout = ZeroLayout(
        zero_stage=3,
        world_size=1,
        dtype="bf16",
        ds_version=None,
        global_step=1,
        trainable=[{k: list(t.shape) for k, t in trained.items()}],
        frozen={},
        frozen_source=None,
        buffers={},
    )
    info = CheckpointInfo(
        checkpoint=str(root),
        tag="t",
        tags=["t"],
        checkpoints=[],
        layout=layout,
        adapter_config_path=str(root / "adapter"),
        lora_config=lora,
        adapter_name="default",
        base_model=str(root / "base"),
    )
    save_file({k: t.float().contiguous() for k, t in trained.items()}, root / "consolidated.safetensors")
    return model, info


def reference(model, auto_class: str, output: Path, max_shard_size: int) -> None:
    """PEFT's merge (in fp32) and transformers' save in bf16, as a user would do it by hand: the merged
    model saved, loaded again in bf16 (``from_pretrained`` keeps the modules a model wants in fp32 so), saved."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as merged:
        model.merge_and_unload().save_pretrained(merged)
        getattr(transformers, auto_class).from_pretrained(merged, dtype=DTYPE).save_pretrained(
            output, max_shard_size=max_shard_size
        )


def streamed(info: CheckpointInfo, root: Path, output: Path, max_shard_size: int, block_bytes: int):
    """Stages 3 to 5 of the streaming conversion (stage 2's store written by :func:`build`)."""
    from zero2merged.running.manifest import FileHashes
    from zero2merged.stages.load import plan_sources
    from zero2merged.stages.merge import merge_streaming
    from zero2merged.stages.rebuild import rebuild
    from zero2merged.stages.workers import ShardTask

    model, rebuilt = rebuild(info, on_meta=True)
    loaded = plan_sources(model, root / "consolidated.safetensors", info, rebuilt)
    output.mkdir(parents=True)
    task = ShardTask(info, loaded.sources, str(output), "bf16", max_shard_size, "cpu", block_bytes)
    with FileHashes() as hashes:
        return merge_streaming(model, rebuilt, task, helpers=None, hashes=hashes)


def in_memory(info: CheckpointInfo, root: Path, output: Path, max_shard_size: int):
    """Stages 3 to 6 of the in-memory conversion."""
    from zero2merged.stages.load import load_weights, open_consolidated, read_consolidated
    from zero2merged.stages.merge import merge
    from zero2merged.stages.rebuild import rebuild
    from zero2merged.stages.save import save

    model, rebuilt = rebuild(info)
    tensors = read_consolidated(*open_consolidated(root / "consolidated.safetensors"))
    load_weights(model, tensors, info, resized_vocab=rebuilt.resized_vocab)
    work = root / "work"
    work.mkdir()
    merge(model, work)
    save(
        work,
        output,
        auto_class=rebuilt.auto_class,
        dtype="bf16",
        max_shard_size=max_shard_size,
        info=info,
        card=lambda parity, served: "",
    )


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}

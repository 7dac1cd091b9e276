"""The model card (``README.md``) written into every merged output: where the model came from and how it
was checked. It holds no timestamps or absolute timings, so the same input still gives the same bytes.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

from zero2merged.checkpoint.quantized import merged_into
from zero2merged.core.results import CheckpointInfo, MergeResult, Parity, Served

LIBRARIES = ("zero2merged", "deepspeed", "peft", "transformers", "torch", "safetensors")


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def render(info: CheckpointInfo, *, dtype: str, merged: MergeResult, save_parity: Parity | None, served: Served) -> str:
    """The card's Markdown, front matter first (the Hugging Face Hub reads ``base_model`` and ``tags``).

    Args:
        info: What stage 1 found (the provenance).
        dtype: The output dtype's short name.
        merged: Stage 5's result: the merged vs unmerged parity.
        save_parity: In memory, the saved model reloaded vs the fp32 merge (None when streaming).
        served: Where the tokenizer, chat template and generation config came from, and what was changed.
    """
    layout, lora = info.layout, info.lora_config
    versions = library_versions()
    lora_fields = {
        key: lora.get(key)
        for key in (
            "r",
            "lora_alpha",
            "target_modules",
            "use_dora",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "task_type",
        )
        if lora.get(key) not in (None, {}, [])
    }
    parity = merged.parity
    checks = [
        f"- Each LoRA layer merged by PEFT and compared with the unmerged layer on seeded probe inputs "
        f"(fp32): max abs diff {parity.max_abs_diff:.3g}, top-1 agreement "
        f"{parity.top1_agreement:.4f} over {merged.layers} layers."
        if merged.layers is not None
        else f"- Merged vs unmerged model (PEFT `merge_and_unload`, fp32) on seeded probe inputs: max abs diff "
        f"{parity.max_abs_diff:.3g}, top-1 agreement {parity.top1_agreement:.4f}."
    ]
    if save_parity:
        checks.append(
            f"- This {dtype} model reloaded with the plain Auto class vs the fp32 merge: max abs diff "
            f"{save_parity.max_abs_diff:.3g}, top-1 agreement {save_parity.top1_agreement:.4f}."
        )
    checks.append(
        "- Every weight written once (tied ones once), named and sharded as `save_pretrained` writes "
        "them, checked against the model the saved config builds."
    )
    lines = [
        "---",
        f"base_model: {json.dumps(info.base_model)}",
        "library_name: transformers",
        "tags:",
        "- lora-merged",
        "- deepspeed",
        "- zero2merged",
        "---",
        "",
        "# Merged LoRA model",
        "",
        f"The base model with its LoRA adapter merged in (W0 + scaling·B·A, by PEFT), written in {dtype} by "
        f"zero2merged {versions['zero2merged']} from a DeepSpeed ZeRO checkpoint. It loads with "
        "`from_pretrained` alone: no PEFT, no DeepSpeed.",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| source checkpoint | `{info.checkpoint}` |",
        *_saved_by(info),
        *([f"| PEFT model | under `{layout.prefix.removesuffix('.')}` in the saved names |"] if layout.prefix else []),
        f"| adapter | `{info.adapter_name}` |",
        f"| base model | `{info.base_model}` |",
        *([f"| base weights | {merged_into(merged.qlora)} |"] if merged.qlora else []),
        f"| LoRA config | `{json.dumps(lora_fields, sort_keys=True)}` (from `{info.adapter_config_path}`) |",
        "| converted with | " + ", ".join(f"{name} {v}" for name, v in versions.items()) + " |",
        "",
        "## Checks",
        "",
        *checks,
        "",
        *_serving(served),
        "Check it again at any time: `zero2merged verify <this folder> --checkpoint <source checkpoint>`.",
        "",
    ]
    return "\n".join(lines)


def _serving(served: Served) -> list[str]:
    """The serving files' section: where each came from, and each special token id rewritten."""

    def source(path: str | None) -> str:
        return f"`{path}`" if path else "none"

    lines = [
        "## Serving files",
        "",
        "| | |",
        "|---|---|",
        f"| tokenizer | {source(served.tokenizer_from)} |",
        f"| chat template | {source(served.chat_template_from)} |",
        f"| generation config | {source(served.generation_config_from)} |",
        "",
    ]
    if served.changed:
        lines += [
            "Special token ids rewritten to name the tokenizer's tokens (the base's files disagreed with the "
            "tokenizer the run used):",
            "",
            *(f"- {change}" for change in served.changed),
            "",
        ]
    elif served.tokenizer_from:
        lines += ["The special token ids in `config.json` and `generation_config.json` agree with the tokenizer.", ""]
    return lines


def _saved_by(info: CheckpointInfo) -> list[str]:
    """What the run saved: DeepSpeed's rank files (the fp32 masters), or its adapter gathered in 16 bits."""
    layout = info.layout
    if layout.kind == "adapter":
        return [
            f"| saved as | a PEFT adapter folder, gathered ({layout.dtype}): no ZeRO files |",
            f"| trained weights | the run's {layout.dtype} copies, not fp32 masters: it saved none "
            f"({len(layout.trainable_shapes)} tensors) |",
        ]
    return [
        f"| tag | `{info.tag}` (optimizer step {layout.global_step}) |",
        f"| ZeRO | stage {layout.zero_stage}, {layout.world_size} ranks, {layout.dtype} training, saved by "
        f"DeepSpeed {layout.ds_version} |",
        f"| trained weights | the fp32 master copies ({len(layout.trainable_shapes)} tensors) |",
    ]

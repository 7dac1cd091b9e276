"""Where the PEFT model sits in the saved names, and which of its adapters a conversion takes.

DeepSpeed names every param by its path in the module the script handed to ``deepspeed.initialize``. The HF
Trainer, TRL and Accelerate hand it the ``PeftModel`` itself: names start with PEFT's ``base_model.model.``.
Other scripts hand it a module holding the PEFT model: OpenRLHF's actor and a LightningModule keep it as an
attribute (``model.base_model.model.…``), ``torch.compile`` wraps it (``_orig_mod.``), Lightning's strategy
wraps the LightningModule (``_forward_module.model.``). The prefix is found from the trained LoRA keys
(nothing here knows a script's attribute names), stripped from every table of the layout and kept in it, so
that the reader adds it back to find a tensor in the rank files. Where the module holds several PEFT models
(an actor and a critic, a policy and a reference) or a model several adapters, the user names one: nothing is
guessed. Params outside the chosen PEFT model (a critic's value head) and the other adapters' weights are not
part of the merged model: they are left out, and named in :attr:`ZeroLayout.outside`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from zero2merged.checkpoint.adapter_keys import adapter_of, trained_by_peft
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.core.results import ZeroLayout

ROOT = "."  # how --peft-model names a PEFT model that is the engine's module itself (no prefix)
# The shortest prefix before PEFT's own names: a model's inner modules never start with `base_model.model.`.
_PREFIXED = re.compile(rf"^(?P<prefix>(?:[^.]+\.)*?){re.escape(names.PEFT_PREFIX)}")


def peft_models(names_: list[str]) -> dict[str, set[str]]:
    """prefix -> the adapters trained there, for every PEFT model whose LoRA weights are among ``names_``."""
    found: dict[str, set[str]] = {}
    for name in names_:
        match = _PREFIXED.match(name)
        adapter = match and adapter_of(name[len(match["prefix"]) :])
        if adapter:
            found.setdefault(match["prefix"], set()).add(adapter)
    return found


def trained_by_peft_anywhere(name: str) -> bool:
    """Whether a saved name is one PEFT trains, under whatever prefix."""
    match = _PREFIXED.match(name)
    return bool(match) and trained_by_peft(name[len(match["prefix"]) :])


def shown(prefix: str) -> str:
    return f"'{prefix.removesuffix('.')}'" if prefix else "the engine's module itself"


def choose(layout: ZeroLayout, tag_dir: Path, *, peft_model: str | None, adapter: str | None) -> ZeroLayout:
    """The layout in the PEFT model's own names, for the one PEFT model and adapter the run (or the user)
    names; ``adapter_name`` of the result is the adapter's.

    Raises:
        CheckpointError: several PEFT models or adapters and none named, or one named that is not there.
    """
    models = peft_models(list(layout.trainable_shapes))
    if not models:
        return layout  # no LoRA weights: inspect says so
    if peft_model is not None:
        prefix = "" if peft_model.strip(".") == "" else peft_model.strip(".") + "."
        if prefix not in models:
            raise CheckpointError(
                f"{tag_dir}: no PEFT model under {shown(prefix)} (--peft-model); trained LoRA weights sit under "
                f"{_listed(models)}"
            )
    elif len(models) > 1:
        raise CheckpointError(
            f"{tag_dir}: the saved module holds {len(models)} PEFT models, under {_listed(models)}; pass "
            "--peft-model with the one to convert (its attribute path, '.' for the module itself)"
        )
    else:
        prefix = next(iter(models))
    adapters = models[prefix]
    if adapter is not None and adapter not in adapters:
        raise CheckpointError(
            f"{tag_dir}: no trained adapter named {adapter!r} (--adapter-name); the run trained {_names(adapters)}"
        )
    if adapter is None and len(adapters) > 1:
        raise CheckpointError(
            f"{tag_dir}: the model trained {len(adapters)} adapters ({_names(adapters)}); pass --adapter-name with the "
            "one to merge (one adapter per conversion)"
        )
    chosen = adapter or next(iter(adapters))
    return _renamed(layout, prefix, chosen)


def _renamed(layout: ZeroLayout, prefix: str, adapter: str) -> ZeroLayout:
    outside: list[str] = []

    def ours(name: str) -> str | None:
        """The name in the PEFT model, or None for a param left out."""
        if not name.startswith(prefix) or not name[len(prefix) :].startswith(names.PEFT_PREFIX):
            return None
        inner = name[len(prefix) :]
        other = adapter_of(inner)
        return inner if other in (None, adapter) else None

    def table(shapes: dict) -> dict:
        kept = {}
        for name, value in shapes.items():
            inner = ours(name)
            if inner is None:
                outside.append(name)
            else:
                kept[inner] = value
        return kept

    # A trainable param left out keeps its saved name and its place: the flat groups' offsets count it.
    trainable = [{ours(name) or name: shape for name, shape in group.items()} for group in layout.trainable]
    outside += [name for group in layout.trainable for name in group if ours(name) is None]
    shared = {ours(a): ours(b) for a, b in layout.shared.items() if ours(a) and ours(b)}
    return dataclasses.replace(
        layout,
        trainable=trainable,
        frozen=table(layout.frozen),
        buffers=table(layout.buffers),
        quantized=table(layout.quantized),
        shared=shared,
        prefix=prefix,
        adapter=adapter,
        outside=sorted(set(outside)),
    )


def _listed(models: dict[str, set[str]]) -> str:
    return ", ".join(f"{shown(prefix)} (adapter {_names(adapters)})" for prefix, adapters in sorted(models.items()))


def _names(adapters: set[str]) -> str:
    return ", ".join(f"'{a}'" for a in sorted(adapters))

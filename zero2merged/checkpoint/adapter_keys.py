"""What a checkpoint's trained param names and shapes say about its LoRA adapter.

PEFT names every adapter tensor ``base_model.model.<module>.<kind>.<adapter>[.<param>]``. From those keys and
shapes we read the adapter's name, the modules it targets and with which rank, whether it is DoRA, and
which modules were trained in full (``modules_to_save``): enough to describe a checkpoint, and to rebuild
its LoraConfig when the run did not save one. (PEFT has no reader for this: it always starts from a config.)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from zero2merged.core import names
from zero2merged.core.errors import AdapterConfigError

_KEY = re.compile(
    rf"^{re.escape(names.PEFT_PREFIX)}(?P<module>.+)\."
    r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)\."
    r"(?P<adapter>[^.]+)(?:\.(?P<param>weight|bias))?$"  # embedding LoRA is a ParameterDict: no suffix
)


@dataclass
class AdapterKeys:
    """The adapter as its trained keys describe it.

    Attributes:
        adapters: Adapter names found (PEFT's ``default`` unless the run chose another).
        ranks: LoRA target module path -> rank ``r``.
        embeddings: Target modules that are embeddings (``lora_embedding_A/B``).
        dora: DoRA magnitude vectors were trained.
        modules_to_save: Module paths trained in full.
        biases: Trained biases outside the LoRA matrices (``bias="lora_only"`` or ``"all"``).
    """

    adapters: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    embeddings: set[str] = field(default_factory=set)
    dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)

    @property
    def leaves(self) -> list[str]:
        """The targets' last names (``q_proj``…), in order of first appearance."""
        return list(dict.fromkeys(module.rsplit(".", 1)[-1] for module in self.ranks))


# Any tensor that belongs to one adapter: LoRA's own and modules_to_save's (above), and trainable tokens'.
_ADAPTER_TENSOR = re.compile(
    rf"^{re.escape(names.PEFT_PREFIX)}.+\.(?:trainable_tokens_delta|trainable_tokens_original)\.(?P<adapter>[^.]+)$"
)


def adapter_of(name: str) -> str | None:
    """The adapter a PEFT model's tensor belongs to (by its name in the PEFT model), or None for a base one."""
    found = _KEY.match(name) or _ADAPTER_TENSOR.match(name)
    return found["adapter"] if found else None


def trained_by_peft(name: str) -> bool:
    """Whether a wrapper key is one PEFT trains (LoRA's own weights, a module trained in full), by its name."""
    return _KEY.match(name) is not None


def read_adapter_keys(trainable: dict[str, list[int]]) -> AdapterKeys:
    """Sort the trained keys into what they are."""
    keys = AdapterKeys()
    for name, shape in trainable.items():
        found = _KEY.match(name)
        if not found:
            if name.endswith(".bias"):
                keys.biases.append(name)
            continue
        module, kind = found["module"], found["kind"]
        keys.adapters.add(found["adapter"])
        if kind == "lora_A" or kind == "lora_embedding_A":
            keys.ranks[module] = shape[0]
        if kind.startswith("lora_embedding"):
            keys.embeddings.add(module)
        elif kind == "lora_magnitude_vector":
            keys.dora = True
        elif kind == "modules_to_save" and module not in keys.modules_to_save:
            keys.modules_to_save.append(module)
    return keys


def infer_lora_config(keys: AdapterKeys, *, lora_alpha: float, use_rslora: bool = False) -> tuple[dict, list[str]]:
    """A LoraConfig (as PEFT saves it) for a run that saved none, and what was inferred, line by line.

    The targets are the exact module paths that have LoRA weights (PEFT matches a target by the end of a
    module's path), the rank the most common one with ``rank_pattern`` for the others. ``lora_alpha`` and
    ``use_rslora`` change the merge but leave no trace in the weights: they must be given.

    Raises:
        AdapterConfigError: the keys show no LoRA target.
    """
    if not keys.ranks:
        raise AdapterConfigError("the checkpoint has no LoRA weights to infer an adapter config from")
    r = Counter(keys.ranks.values()).most_common(1)[0][0]
    rank_pattern = {module: rank for module, rank in keys.ranks.items() if rank != r}
    bias = "none"
    if keys.biases:
        lora_only = all(
            b.removesuffix(".base_layer.bias").removeprefix(names.PEFT_PREFIX) in keys.ranks for b in keys.biases
        )
        bias = "lora_only" if lora_only else "all"
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(keys.ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "use_rslora": use_rslora,
        "use_dora": keys.dora,
        "modules_to_save": keys.modules_to_save or None,
        "bias": bias,
        "lora_dropout": 0.0,
    }
    notes = [
        f"target_modules: {', '.join(keys.leaves)} in {len(keys.ranks)} modules (from the lora_A/lora_B keys)",
        f"r={r} (from the lora_A shapes)" + (f", rank_pattern for {len(rank_pattern)} modules" if rank_pattern else ""),
        f"lora_alpha={lora_alpha:g} (given)",
        f"use_rslora={use_rslora} ({'given' if use_rslora else 'assumed; pass --use-rslora if the run used it'})",
        f"use_dora={keys.dora} (from {'the' if keys.dora else 'no'} lora_magnitude_vector keys)",
        "alpha_pattern: none (assumed: per-module alphas leave no trace in the weights)",
    ]
    if keys.modules_to_save:
        notes.append(f"modules_to_save: {', '.join(keys.modules_to_save)} (from the modules_to_save keys)")
    if bias != "none":
        notes.append(f"bias={bias} (from the trained biases)")
    return config, notes


def describe(lora: dict, keys: AdapterKeys) -> list[str]:
    """The adapter's notable traits, for ``inspect``."""
    traits = []
    targets = lora.get("target_modules")
    if targets == "all-linear":
        traits.append("target_modules=all-linear")
    if lora.get("use_dora") or keys.dora:
        traits.append("DoRA (magnitude vectors rescale the merged rows)")
    if lora.get("use_rslora"):
        traits.append("rsLoRA (scale lora_alpha/sqrt(r))")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if lora.get(pattern):
            traits.append(f"{pattern}: {lora[pattern]}")
    if keys.embeddings:
        traits.append(f"LoRA on embeddings: {', '.join(sorted(keys.embeddings))}")
    if lora.get("target_parameters"):
        traits.append(
            f"LoRA on parameters (target_parameters): {', '.join(lora['target_parameters'])}; fused "
            "experts are merged a block of experts at a time"
        )
    if keys.modules_to_save:
        traits.append(f"trained in full (modules_to_save): {', '.join(keys.modules_to_save)}")
    if lora.get("fan_in_fan_out"):
        traits.append("fan_in_fan_out (Conv1D weights, as GPT-2 stores them)")
    if lora.get("task_type"):
        traits.append(f"task type {lora['task_type']}")
    return traits

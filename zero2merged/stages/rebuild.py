"""Stage 3, rebuild: the base model through the right transformers Auto class, wrapped by PEFT.

The wrapper is built from the run's own LoraConfig with PEFT's ``get_peft_model``, so its keys are the
keys training saved; the stage checks that they are, before any weight is loaded into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zero2merged.core.environment import PEFT_FEATURES, require_peft_feature
from zero2merged.core.errors import AdapterConfigError, BaseModelError, CheckpointError, first_line
from zero2merged.core.results import CheckpointInfo, RebuildResult, ResizedVocab
from zero2merged.model.base import (
    base_config,
    base_dtype,
    checkpoint_vocab,
    choose_base,
    embedding_modules,
    load_base,
    meta_model,
)
from zero2merged.model.modelfiles import files_in
from zero2merged.running.manifest import files_stat
from zero2merged.running.runner import Stage


class Rebuild(Stage[RebuildResult]):
    """Stage 3 in a conversion, the first of the three that share a model in memory (rebuild, load,
    merge: run or skipped together). Its model (:attr:`model`) is the one load fills and merge merges.

    Args:
        info: Stage 1's result.
        streaming: Build on the meta device (no weights), for the streaming merge.
    """

    name = "rebuild"
    result_type = RebuildResult

    def __init__(self, info: CheckpointInfo, *, streaming: bool):
        self.info, self.streaming = info, streaming
        self.model: Any = None

    def inputs(self) -> dict:
        return {"base": base_fingerprint(self.info.base_model), "streaming": self.streaming}

    def run(self) -> RebuildResult:
        self.model, result = rebuild(self.info, on_meta=self.streaming)
        return result


def base_fingerprint(base: str) -> Any:
    """A base model folder by its files' names, sizes and mtimes (a hub id by itself)."""
    path = Path(base)
    return files_stat(files_in(path)) if path.is_dir() else base


# Keys a newer PEFT writes that only record where the file came from: nothing of the merge depends on them.
RECORDS_ONLY = {"peft_version"}


def lora_config(info: CheckpointInfo):
    """The run's LoraConfig, built by PEFT from the saved JSON.

    Raises:
        AdapterConfigError: PEFT cannot build it, or it sets a key this PEFT does not know (PEFT would
            ignore it with a warning: a newer PEFT's feature, or a damaged key, that may change the merge).
        LibraryError: it uses a feature PEFT gained after the installed version (:data:`PEFT_FEATURES`).
    """
    import dataclasses
    import warnings

    import peft
    from peft import LoraConfig
    from peft.config import PeftConfig

    for key in PEFT_FEATURES:  # a feature this PEFT lacks: say which PEFT has it
        if info.lora_config.get(key):
            require_peft_feature(key, str(info.adapter_config_path))
    known = {f.name for f in dataclasses.fields(LoraConfig)} | RECORDS_ONLY
    unknown = {k: v for k, v in info.lora_config.items() if k not in known and v not in (None, False, "", [], {})}
    if unknown:  # a newer PEFT's keys left at their defaults (None, False, empty) change nothing: let them be
        key = sorted(unknown)[0]
        raise AdapterConfigError(
            f"{info.adapter_config_path} sets {key}={unknown[key]!r}, which PEFT {peft.__version__} does not know "
            "(a newer PEFT wrote it, or the file is damaged) and would ignore: upgrade PEFT to the training's, or "
            "remove the key if it does not change the merge"
        )
    try:
        with warnings.catch_warnings():  # PEFT's notice about those ignored keys
            warnings.simplefilter("ignore", UserWarning)
            return PeftConfig.from_peft_type(**info.lora_config)
    except (TypeError, ValueError) as e:
        raise AdapterConfigError(f"PEFT cannot build a LoraConfig from {info.adapter_config_path}: {e}") from e


def rebuild(info: CheckpointInfo, *, on_meta: bool = False, real_buffers: bool = False) -> tuple[Any, RebuildResult]:
    """Stage 3: build the base model in fp32 and wrap it with PEFT; check the wrapper has the saved keys.

    Args:
        info: Stage 1's result.
        on_meta: Build on the meta device (no weights: the streaming path materializes one layer at a time).
        real_buffers: With ``on_meta``, compute the buffers (to run it a block at a time: ``verify``).

    Returns:
        ``(peft_model, result)``; the result names the classes and dtypes used, and for each wrapper key
        that is a base param, the base's own names for it (``base_keys``).

    Raises:
        BaseModelError: the base cannot be loaded.
        AdapterConfigError: the wrapper's LoRA params differ from the checkpoint's.
    """
    from peft import get_peft_model

    config = lora_config(info)
    base_cfg = base_config(info.base_model)
    auto_name, base = choose_base(info.lora_config, base_cfg, list(info.layout.trainable_shapes))
    # fp32, whatever the base is stored in: PEFT merges in the weights' dtype, and the masters are fp32.
    if real_buffers:
        base = meta_model(auto_name, base_cfg, real_buffers=True)
    elif not on_meta:
        base = load_base(auto_name, info.base_model)
    resized = resize_to_checkpoint(base, info)
    names_in_base = _names_by_object(base)
    # PEFT names the base it is given in the config, and warns when the run's config named another path (a
    # base moved or copied since training, the usual case here): the base used is reported already.
    config.base_model_name_or_path = None
    try:
        model = get_peft_model(base, config, adapter_name=info.adapter_name)
    except ValueError as e:  # e.g. the target modules are not in this model
        raise BaseModelError(
            f"PEFT cannot apply the run's LoRA config to {type(base).__name__} from "
            f"{info.base_model} ({first_line(e).rstrip('.')}); is --base-model the model this run trained?"
        ) from e
    _check_against_checkpoint(model, info)
    base_keys = {
        key: names_in_base[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in names_in_base
    }
    return model, RebuildResult(
        auto_class=auto_name,
        model_class=type(base).__name__,
        peft_class=type(model).__name__,
        base_model=info.base_model,
        base_dtype=base_dtype(base_cfg),
        lora={
            key: info.lora_config.get(key) for key in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")
        },
        resized_vocab=resized,
        base_keys=base_keys,
        in_4bit={
            name: settings
            for key, settings in info.layout.quantized.items()
            if settings["storage"] is None
            for name in base_keys.get(key, [])
        },
    )


def _names_by_object(model) -> dict[int, list[str]]:
    """Each param and buffer of ``model`` (by identity) -> its names (several when tied). PEFT wraps
    modules in place, so identity leads from a wrapper key back to the base's own name."""
    found: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        found.setdefault(id(tensor), []).append(name)
    return found


def resize_to_checkpoint(base, info: CheckpointInfo) -> ResizedVocab | None:
    """Grow (or shrink) the base's vocabulary to the size training used, as the run did before training.

    Returns what was resized, if anything. The new rows are placeholders here: load takes their values
    from the checkpoint, and refuses to go on if the checkpoint did not save them.
    """
    modules = embedding_modules(base)
    if not modules:
        return None
    shapes = {**info.layout.trainable_shapes, **info.layout.frozen}
    rows = set().union(*(checkpoint_vocab(shapes, m) for m in modules))
    current = base.get_input_embeddings().weight.shape[0]
    if not rows or rows == {current}:
        return None
    if len(rows) > 1:
        raise CheckpointError(
            f"{info.tag_dir / info.layout.model_files[0]}: the checkpoint's embeddings disagree on the vocabulary "
            f"size (its shape tables give {', '.join(map(str, sorted(rows)))} rows): the file is damaged"
        )
    target = rows.pop()
    base.resize_token_embeddings(target, mean_resizing=False)
    return ResizedVocab(base_rows=current, rows=target, modules=modules)


def _check_against_checkpoint(model, info: CheckpointInfo) -> None:
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    saved = info.layout.trainable_shapes
    problems = []
    for name, shape in saved.items():
        if name not in shapes:
            problems.append(f"{name} was trained but the adapter config builds no such param")
        elif shapes[name] != shape:
            problems.append(f"{name} is {shape} in the checkpoint but {shapes[name]} with this adapter config")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    problems += [
        f"the adapter config adds {name}, which the checkpoint did not train" for name in trainable if name not in saved
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterConfigError(
            f"{info.adapter_config_path} does not match the checkpoint: {problems[0]}{more}; "
            "pass the adapter_config.json the run was trained with (--adapter-config)"
        )

"""Saved layouts under transformers 4: files named as the modules are, but for a few renamings.

transformers 4 has no weight conversion mapping (:mod:`transformers.core_model_loading` came with 5): a model's
files hold its module tensors one for one. What differs is the name, in two ways, both applied by
``from_pretrained`` and reverted by ``save_pretrained``, and followed here the same way:

* a vision-language model's ``_checkpoint_conversion_mapping`` (LLaVA keeps ``model.language_model`` in memory
  and ``language_model.model`` on disk), for the classes transformers 4 lists in ``modeling_utils.VLMS``;
* the base model's prefix (``model.``), added or dropped when a task model reads a bare model's files or the
  other way round.

So every group of :mod:`zero2merged.model.layouts` is one tensor renamed: nothing is ever converted, and a
tensor is read and written as it is stored. Also here: the two other things a transformers-4 ``save_pretrained``
decides its own way, which of several tied names is written and which weights keep fp32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch


def key_mapping(model: Any) -> dict[str, str]:
    """File pattern -> module name, as ``from_pretrained`` renames the files' keys for ``model``'s class (only
    the classes transformers 4 lists as vision-language models use their mapping)."""
    from transformers import modeling_utils

    listed = getattr(modeling_utils, "VLMS", [])
    classes = type(model).__mro__[:-1]
    if not any(name in cls.__name__.lower() for cls in classes for name in listed):
        return {}
    return dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})


def describe(model: Any) -> list[str]:
    """What the renamings do, one line each (``inspect`` shows it); empty when files and modules share names."""
    mapping = key_mapping(model)
    return [f"renamed: {pattern.lstrip('^')} (files) -> {target} (modules)" for pattern, target in mapping.items()]


def loaded_names(model: Any, files: list[str]) -> dict[str, str]:
    """How the base's files load into ``model``: module name -> the file's name it is loaded from (one tensor
    each, renamed), as transformers 4's ``_get_key_renaming_mapping`` names them."""
    mapping = key_mapping(model)
    prefix = model.base_model_prefix or ""
    has_prefix = bool(prefix) and any(name.startswith(prefix) for name in files)
    expects_prefix = bool(prefix) and hasattr(model, prefix)
    names: dict[str, str] = {}
    for name in files:
        target = _first_rename(name, mapping)
        if expects_prefix and not has_prefix:  # a task model from a bare model's files
            target = f"{prefix}.{target}"
        elif has_prefix and not expects_prefix:  # a bare model from a task model's files: the rest is not loaded
            if not target.startswith(f"{prefix}."):
                continue
            target = target[len(prefix) + 1 :]
        names[target] = name
    return names


def saved_names(model: Any, names: list[str]) -> dict[str, str]:
    """How transformers 4's ``save_pretrained`` names the model's tensors: module name -> name in the files, the
    mapping reverted, the first of its patterns that matches."""
    reverse = {target: pattern for pattern, target in key_mapping(model).items()}
    saved_as = {}
    for name in names:
        saved = name
        for pattern, replacement in reverse.items():
            replacement = re.sub(r"\(.*\)", "", replacement.lstrip("^"))  # as save_pretrained strips them
            saved, count = re.subn(pattern, replacement, saved)
            if count:
                break
        saved_as[name] = saved
    return saved_as


def _first_rename(name: str, mapping: dict[str, str]) -> str:
    for pattern, replacement in mapping.items():
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name


def untied(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """``state`` (``state_dict(keep_vars=True)``: a tied weight is one object under several names) without the
    names transformers 4's ``save_pretrained`` leaves out: of the names sharing a tensor, those its
    ``_tied_weights_keys`` patterns match, in sorted order, all but the last name."""
    from transformers.modeling_utils import _get_tied_weight_keys

    patterns = _get_tied_weight_keys(model)
    sharing: dict[int, list[str]] = {}
    for name, tensor in state.items():
        sharing.setdefault(id(tensor), []).append(name)
    dropped = set()
    for names in sharing.values():
        if len(names) < 2:
            continue
        found = 0
        for name in sorted(names):
            if any(re.search(pattern, name) for pattern in patterns):
                found += 1
                if found < len(names):
                    dropped.add(name)
    return {name: tensor for name, tensor in state.items() if name not in dropped}


def saved_dtypes(model: Any, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """name -> the dtype transformers 4's ``from_pretrained(dtype=dtype)`` gives it: ``dtype``, but fp32 for
    ``_keep_in_fp32_modules`` when ``dtype`` is fp16 and for ``_keep_in_fp32_modules_strict`` when it is fp16
    or bf16 (module names matched as whole dotted parts)."""
    kept = list(model._keep_in_fp32_modules or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        kept += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not kept:
        return lambda name: dtype
    pattern = re.compile("|".join(rf"((^|\.){module}($|\.))" for module in kept))
    return lambda name: torch.float32 if pattern.search(name) else dtype


def set_dtype(config: Any, dtype: str) -> None:
    """``config`` as transformers 4's ``from_pretrained(dtype=...)`` leaves it: the dtype set on the config and
    on each of its sub-configs (a vision-language model's text and vision configs)."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype


def tying_config(config: Any) -> Any:
    """The config whose ``tie_word_embeddings`` transformers 4 ties the embeddings by: the text decoder's."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

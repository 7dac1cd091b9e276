"""The base model: its config, the Auto class that builds it, loading it, its embeddings.

Shared by inspect (which looks at the base on the meta device, without weights) and rebuild.
"""

from __future__ import annotations

import math
import pickle
import reprlib
from collections.abc import Iterator
from pathlib import Path

import torch

from zero2merged.core import names
from zero2merged.core.dtypes import SHORT_NAMES
from zero2merged.core.errors import BaseModelError, first_line
from zero2merged.files.safetensors_reader import HeaderError, read_header
from zero2merged.model import transformers4
from zero2merged.model.layouts import conversion_mapping

# PEFT's task types and the Auto class each one trains.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Without a task type: the first Auto class whose mapping lists the base's architecture, in this order.
AUTO_CLASS_MAPPINGS = [
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
]


def base_config(base_model: str):
    from transformers import AutoConfig

    if base_model.startswith(("/", "./", "../", "~")) and not Path(base_model).expanduser().exists():
        # A path, not a hub id: say so, rather than the hub's complaint about the id's characters
        raise BaseModelError(f"the base model {base_model} does not exist; pass --base-model with its folder")
    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)  # never a model folder's code
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        if "trust_remote_code" in str(e):
            raise BaseModelError(
                f"the base model {base_model} needs code of its own (trust_remote_code), and "
                "zero2merged never runs code from a model folder; use a transformers-native "
                "architecture"
            ) from e
        raise BaseModelError(
            f"cannot read the base model's config at {base_model}: {first_line(e)}; "
            "pass --base-model with the model the adapter was trained on"
        ) from e
    # JSON has no NaN or infinity, but Python's reader takes them: such a value (an rms_norm_eps, say) would
    # make every output NaN, which the per-layer checks of the streaming merge never run into
    for key, value in _numbers(config.to_dict()):
        if not math.isfinite(value):
            raise BaseModelError(
                f"the base model's config at {base_model} sets {key} to {value}: the file is damaged; "
                "get an intact copy of the model"
            )
    return config


def _numbers(value, key: str = "") -> Iterator[tuple[str, float]]:
    """The floats of a config's dict, with their keys, however nested."""
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{key}[{i}]")


def base_dtype(config) -> str:
    """The dtype the base model is stored in (``auto`` output dtype), as a short name."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return SHORT_NAMES.get(dtype, "fp32")


def auto_class_name(lora: dict, config) -> str:
    """The Auto class that builds the base: from the LoRA task type, else from the base's architecture."""
    return auto_class_names(lora, config)[0]


def auto_class_names(lora: dict, config) -> list[str]:
    """The Auto classes that may have built the model a run trained, most likely first: the LoRA task
    type's, then each whose mapping lists the base's architecture (PEFT's task types predate vision-language
    models: a run on one says ``CAUSAL_LM``), then ``AutoModel``."""
    from transformers.models.auto import modeling_auto

    names = [TASK_AUTO_CLASSES[lora["task_type"]]] if lora.get("task_type") in TASK_AUTO_CLASSES else []
    arch = (lora.get("auto_mapping") or {}).get("base_model_class") or (config.architectures or [None])[0]
    for auto_name, mapping_name in AUTO_CLASS_MAPPINGS:
        classes = getattr(modeling_auto, mapping_name, {}).values()
        if any(arch == c or (isinstance(c, tuple) and arch in c) for c in classes):
            names.append(auto_name)
    return list(dict.fromkeys([*names, "AutoModel"]))


def trained_modules(trained: list[str]) -> set[str]:
    """The base's modules a run's trained keys belong to (PEFT's prefix and its own parts cut off)."""
    found = set()
    for key in trained:
        parts = key.removeprefix(names.PEFT_PREFIX).split(".")
        cut = next((i for i, part in enumerate(parts) if part in PEFT_PARTS), len(parts) - 1)
        found.add(".".join(parts[:cut]))
    return found


PEFT_PARTS = {
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "base_layer",
    "modules_to_save",
    "original_module",
}


def choose_base(lora: dict, config, trained: list[str]):
    """The Auto class whose model (built on the meta device) has every module the run's trained keys name,
    and that model; the most likely one's if none has (the mismatch is then reported by rebuild).

    Returns:
        ``(Auto class name, meta model)``.
    """
    wanted, first = trained_modules(trained), None
    for auto_name in auto_class_names(lora, config):
        try:
            model = meta_model(auto_name, config)
        except (ValueError, KeyError):  # this Auto class does not build this config
            continue
        if wanted <= {name for name, _ in model.named_modules()}:
            return auto_name, model
        first = first or (auto_name, model)
    if first is None:
        raise BaseModelError(
            f"no transformers Auto class builds {type(config).__name__}; is --base-model a transformers model?"
        )
    return first


def is_vision_language(model) -> bool:
    """Whether ``model`` is one transformers builds for image-text-to-text (a vision-language model)."""
    from transformers.models.auto import modeling_auto

    names = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()
    return any(type(model).__name__ == n or (isinstance(n, tuple) and type(model).__name__ in n) for n in names)


def load_base(auto_name: str, path: str, dtype: torch.dtype = torch.float32):
    """``AutoX.from_pretrained`` with errors turned into one line for the user; a folder's weight index and
    safetensors headers are checked first (:func:`check_weight_files`)."""
    import transformers
    from safetensors import SafetensorError

    if Path(path).is_dir():
        check_weight_files(Path(path))
    try:
        model, loading = getattr(transformers, auto_name).from_pretrained(
            path, dtype=dtype, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        # pickle: a .bin's refused pickle; SafetensorError: a file the library refuses that passed our checks
        raise BaseModelError(f"cannot load the base model {path} with {auto_name}: {first_line(e)}") from e
    missing = sorted(loading.get("missing_keys") or [])
    if missing:  # transformers initializes them at random, and says so only in a log line
        raise BaseModelError(
            f"the base model {path} has no value for {len(missing)} weights {auto_name} needs, e.g. {missing[0]}: "
            "its files are damaged, or it is another architecture than the run trained"
        )
    return model


def base_dir(base_model: str) -> Path:
    """The base model's folder: the path itself, or its snapshot in the local Hugging Face cache."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not here"
        raise BaseModelError(
            f"the base model {base_model} is neither a folder nor in the local Hugging Face "
            f"cache ({type(e).__name__}); pass --base-model with its folder"
        ) from e


# The weight files from_pretrained reads, in the order it prefers them: safetensors first.
WEIGHT_FILES = [
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
]
MAX_INDEX_BYTES = 100_000_000  # a weight index lists names: even the largest models' take a few MB


def weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files, as ``from_pretrained`` finds them: the shards a ``*.index.json`` lists
    (each a file of the folder itself, of the index's kind), or the single file; safetensors before ``.bin``.
    The index and each safetensors header are checked whole before anything is read by their word.

    Raises:
        BaseModelError: no weight file; an index that is not a weight map of file names (too large, not
            JSON, empty), or names a file outside the folder or not there; a damaged safetensors header.
    """
    files = _weight_files(folder)
    if files is None:
        raise BaseModelError(
            f"{folder} holds no model weights (model.safetensors, pytorch_model.bin, or the index of "
            "their shards); pass --base-model with the base model's folder"
        )
    return files


def check_weight_files(folder: Path) -> None:
    """Check a folder's weight index and safetensors headers as :func:`weight_files` does, where it has
    any: ``from_pretrained`` trusts them (a header claiming 2^60 bytes is a ``MemoryError`` there). A folder
    without them is left for ``from_pretrained`` to say what it lacks."""
    _weight_files(folder)


def _weight_files(folder: Path) -> list[Path] | None:
    for index_name, single in WEIGHT_FILES:
        index = folder / index_name
        if index.is_file():
            files = [folder / shard for shard in _index_shards(index, Path(single).suffix)]
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        for file in files:
            if file.suffix == ".safetensors":
                try:
                    read_header(file)
                except HeaderError as e:
                    raise BaseModelError(f"{e}; get an intact copy of the model") from e
                except OSError as e:
                    raise BaseModelError(f"cannot read the weight file {file}: {first_line(e)}") from e
        return files
    return None


def _index_shards(index: Path, suffix: str) -> list[str]:
    """The files a weight index maps weights to, each checked to be a ``suffix`` file of the index's folder."""
    import json

    try:
        with open(index, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)  # bounded, whatever the file's size
        if len(raw) > MAX_INDEX_BYTES:
            raise BaseModelError(
                f"{index} is larger than a weight index can be ({MAX_INDEX_BYTES} bytes); the file is "
                "damaged or not a weight index"
            )
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        raise BaseModelError(f"cannot read the weight index {index}: {first_line(e)}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise BaseModelError(
            f"cannot read the weight index {index}: it holds no weight_map object (weight name -> file); "
            "the file is damaged or not a weight index"
        )
    if not weight_map:
        raise BaseModelError(f"the weight index {index} maps no weights to files; the file is damaged")
    folder = index.parent
    shards = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise BaseModelError(f"{index} maps {name!r} to {reprlib.repr(shard)}, not a file name")
        shards.add(shard)
    for shard in sorted(shards):
        # A bare name of a file of this folder (a link, as in the Hugging Face cache, may lead elsewhere).
        if Path(shard).name != shard or shard in ("", ".", "..") or not (folder / shard).is_file():
            raise BaseModelError(f"{index} names a weight file {shard!r} that is not a file of {folder}")
        if not shard.endswith(suffix):
            raise BaseModelError(f"{index} names a weight file {shard!r} that is not a {suffix} file")
    return sorted(shards)


def meta_model(auto_name: str, config, *, real_buffers: bool = False):
    """The base's module tree without weights (meta device): for names, shapes and ties, at no cost. With
    ``real_buffers``, in fp32 with its buffers computed (a rotary embedding's frequencies), ready to run with
    its weights given a block at a time (:mod:`zero2merged.checks.blockwise`)."""
    import transformers

    build = getattr(transformers, auto_name).from_config
    if real_buffers:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = build(config, dtype=torch.float32)
        model.tie_weights()  # the context gives each parameter a fresh meta tensor, tied ones too
        return model
    with torch.device("meta"):
        return build(config)


def _module_name(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def embedding_modules(model) -> list[str]:
    """Names of the input and (if separate) output embedding modules."""
    found = [_module_name(model, model.get_input_embeddings())]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        found.append(_module_name(model, output))
    return [name for name in dict.fromkeys(found) if name]


def checkpoint_vocab(shapes: dict[str, list[int]], module: str) -> set[int]:
    """Rows of an embedding module as the checkpoint saved it (any of its LoRA, copy or frozen tensors)."""
    prefix = f"{names.PEFT_PREFIX}{module}."
    rows = set()
    for key, shape in shapes.items():
        if not key.startswith(prefix):
            continue
        part = key[len(prefix) :]
        if part.startswith("lora_embedding_A."):
            rows.add(shape[1])  # (r, vocab)
        elif part.endswith("weight") and not part.startswith("lora_"):
            rows.add(shape[0])
    return rows


def saved_dtypes(model, dtype: torch.dtype):
    """name -> the dtype ``from_pretrained(dtype=dtype)`` gives that weight, and so the dtype it is saved in:
    ``dtype``, except in modules transformers keeps in fp32 (``_keep_in_fp32_modules``: T5's ``wo`` in fp16,
    for one). Uses transformers' own plan and pattern matching, so both paths agree with it."""
    if not conversion_mapping():
        return transformers4.saved_dtypes(model, dtype)
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: dtype
    pattern, group_to_glob, _ = build_glob_alternation(list(plan))

    def of(name: str) -> torch.dtype:
        found = pattern.search(name)
        return plan[group_to_glob[found.lastgroup]] if found else dtype

    return of

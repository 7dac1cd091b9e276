"""The base model: its config, the Auto class that builds it, loading it, its embeddings.

Shared by inspect (which looks at the base on the meta device, without weights) and rebuild.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zero2merged import names
from zero2merged.dtypes import SHORT_NAMES
from zero2merged.errors import BaseModelError

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
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
]


def base_config(base_model: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_model, trust_remote_code=False)  # never a model folder's code
    except (OSError, ValueError, KeyError) as e:
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


def base_dtype(config) -> str:
    """The dtype the base model is stored in (``auto`` output dtype), as a short name."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return SHORT_NAMES.get(dtype, "fp32")


def auto_class_name(lora: dict, config) -> str:
    """The Auto class that builds the base: from the LoRA task type, else from the base's architecture."""
    task = lora.get("task_type")
    if task in TASK_AUTO_CLASSES:
        return TASK_AUTO_CLASSES[task]
    from transformers.models.auto import modeling_auto

    arch = (lora.get("auto_mapping") or {}).get("base_model_class") or (config.architectures or [None])[0]
    for auto_name, mapping_name in AUTO_CLASS_MAPPINGS:
        classes = getattr(modeling_auto, mapping_name, {}).values()
        if any(arch == c or (isinstance(c, tuple) and arch in c) for c in classes):
            return auto_name
    return "AutoModel"


def load_base(auto_name: str, path: str, dtype: torch.dtype = torch.float32):
    """``AutoX.from_pretrained`` with errors turned into one line for the user."""
    import transformers

    try:
        return getattr(transformers, auto_name).from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BaseModelError(f"cannot load the base model {path} with {auto_name}: {first_line(e)}") from e


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


def base_weights(base_model: str) -> dict[str, str]:
    """Tensor name -> safetensors file, over the base's weight files (headers only)."""
    from zero2merged.safetensors_io import Reader

    found = {}
    for file in sorted(base_dir(base_model).glob("*.safetensors")):
        found.update({name: str(file) for name in Reader(file).keys()})
    return found


def meta_model(auto_name: str, config):
    """The base's module tree without weights (meta device): for names, shapes and ties, at no cost."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_name).from_config(config)


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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def saved_dtypes(model, dtype: torch.dtype):
    """name -> the dtype ``from_pretrained(dtype=dtype)`` gives that weight, and so the dtype it is saved in:
    ``dtype``, except in modules transformers keeps in fp32 (``_keep_in_fp32_modules``: T5's ``wo`` in fp16,
    for one). Uses transformers' own plan and pattern matching, so both paths agree with it."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: dtype
    pattern, group_to_glob, _ = build_glob_alternation(list(plan))

    def of(name: str) -> torch.dtype:
        found = pattern.search(name)
        return plan[group_to_glob[found.lastgroup]] if found else dtype

    return of

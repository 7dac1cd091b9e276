"""The base model: its config, the Auto class that builds it, loading it, its embeddings.

Shared by inspect (which looks at the base on the meta device, without weights) and rebuild.
"""

from __future__ import annotations

import torch

from zero2merged import names
from zero2merged.errors import BaseModelError
from zero2merged.zero import DTYPE_NAMES

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
        return AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"cannot read the base model's config at {base_model}: {_first_line(e)}; "
                             "pass --base-model with the model the adapter was trained on") from e


def base_dtype(config) -> str:
    """The dtype the base model is stored in (``auto`` output dtype), as a short name."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return DTYPE_NAMES.get(dtype, "fp32")


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
        return getattr(transformers, auto_name).from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BaseModelError(f"cannot load the base model {path} with {auto_name}: {_first_line(e)}") from e


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
        part = key[len(prefix):]
        if part.startswith("lora_embedding_A."):
            rows.add(shape[1])  # (r, vocab)
        elif part.endswith("weight") and not part.startswith("lora_"):
            rows.add(shape[0])
    return rows


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__

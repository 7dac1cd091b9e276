"""Stage 3, rebuild: the base model through the right transformers Auto class, wrapped by PEFT.

The wrapper is built from the run's own LoraConfig with PEFT's ``get_peft_model``, so its keys are the
keys training saved; the stage checks that they are, before any weight is loaded into it.
"""

from __future__ import annotations

import torch

from zero2merged.errors import AdapterConfigError, BaseModelError
from zero2merged.stages.inspect import CheckpointInfo
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


def lora_config(info: CheckpointInfo):
    """The run's LoraConfig, built by PEFT from the saved JSON."""
    from peft.config import PeftConfig

    try:
        return PeftConfig.from_peft_type(**info.lora_config)
    except (TypeError, ValueError) as e:
        raise AdapterConfigError(f"PEFT cannot build a LoraConfig from {info.adapter_config_path}: {e}") from e


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


def auto_class_name(info: CheckpointInfo, config) -> str:
    """The Auto class that builds the base: from the LoRA task type, else from the base's architecture."""
    task = info.lora_config.get("task_type")
    if task in TASK_AUTO_CLASSES:
        return TASK_AUTO_CLASSES[task]
    from transformers.models.auto import modeling_auto

    arch = (info.lora_config.get("auto_mapping") or {}).get("base_model_class") or (config.architectures or [None])[0]
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


def rebuild(info: CheckpointInfo):
    """Stage 3: build the base model in fp32 and wrap it with PEFT; check the wrapper has the saved keys.

    Returns:
        ``(peft_model, record)``; the record names the classes and dtypes used.

    Raises:
        BaseModelError: the base cannot be loaded.
        AdapterConfigError: the wrapper's LoRA params differ from the checkpoint's.
    """
    from peft import get_peft_model

    config = lora_config(info)
    base_cfg = base_config(info.base_model)
    auto_name = auto_class_name(info, base_cfg)
    # fp32, whatever the base is stored in: PEFT merges in the weights' dtype, and the masters are fp32.
    base = load_base(auto_name, info.base_model)
    model = get_peft_model(base, config, adapter_name=info.adapter_name)
    _check_against_checkpoint(model, info)
    record = {
        "auto_class": auto_name,
        "model_class": type(base).__name__,
        "peft_class": type(model).__name__,
        "base_model": info.base_model,
        "base_dtype": base_dtype(base_cfg),
        "lora": {key: info.lora_config.get(key) for key in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")},
    }
    return model, record


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
    problems += [f"the adapter config adds {name}, which the checkpoint did not train" for name in trainable if name not in saved]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterConfigError(f"{info.adapter_config_path} does not match the checkpoint: {problems[0]}{more}; "
                                 "pass the adapter_config.json the run was trained with (--adapter-config)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__

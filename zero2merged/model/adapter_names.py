"""A PEFT adapter file's names, mapped to the PEFT model's own: PEFT saves an adapter without its name in the
keys (``…q_proj.lora_A.weight`` for the module's ``…q_proj.lora_A.default.weight``), and a module trained in
full under the base weight's own name. The map is PEFT's: its ``get_peft_model_state_dict`` run on the PEFT
model built on the meta device, each saved tensor followed back to its param (nothing renamed by hand).
"""

from __future__ import annotations

from typing import Any

from zero2merged.core.errors import AdapterConfigError, first_line
from zero2merged.model.base import base_config, choose_base


def saved_adapter_names(lora: dict[str, Any], base: str, adapter: str = "default") -> dict[str, str]:
    """Adapter file key -> the PEFT model's param name, for the run's LoRA config on its base.

    Raises:
        AdapterConfigError: PEFT cannot apply the config to the base.
        BaseModelError: the base's config cannot be read.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = {k: v for k, v in lora.items() if k in LoraConfig.__dataclass_fields__}
    _, model = choose_base(lora, base_config(base), [])
    try:
        peft = get_peft_model(model, LoraConfig(**{**config, "base_model_name_or_path": None}), adapter_name=adapter)
    except (ValueError, TypeError) as e:
        raise AdapterConfigError(f"PEFT cannot apply the adapter config to {base}: {first_line(e)}") from e
    names = {id(param): name for name, param in peft.state_dict(keep_vars=True).items()}
    saved = get_peft_model_state_dict(peft, state_dict=peft.state_dict(keep_vars=True), adapter_name=adapter)
    return {key: names[id(tensor)] for key, tensor in saved.items() if id(tensor) in names}

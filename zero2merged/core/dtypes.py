"""Floating-point dtypes by the short names users give (``--dtype``) and reports show, and torch's."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

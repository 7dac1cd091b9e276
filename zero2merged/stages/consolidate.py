"""Stage 2, consolidate: every saved param of the checkpoint in one safetensors file.

Trainable params come from the fp32 master copies in the optimizer files (more precise than the 16-bit
weights the Trainer's adapter file holds); frozen params stay in the dtype they were saved in (lossless, and
half the bytes of fp32 for a 16-bit run). Keys are the checkpoint's own (PEFT's ``base_model.model.…``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zero2merged.errors import CheckpointError, VerificationError
from zero2merged.manifest import replacing
from zero2merged.stages.inspect import CheckpointInfo
from zero2merged.zero import ZeroReader

ALIASES_KEY = "zero2merged.aliases"  # metadata: alias name -> the saved name it shares storage with


def consolidate(info: CheckpointInfo, path: Path) -> dict:
    """Stage 2: read the rank files and write ``path`` (safetensors), verified against the param tables.

    Args:
        info: Stage 1's result.
        path: The file to write (replaced atomically).

    Returns:
        Metrics: tensor counts per kind and bytes written.

    Raises:
        CheckpointError: a tensor is missing, mis-sized or holds NaN/inf.
    """
    layout = info.layout
    reader = ZeroReader(info.tag_dir, layout)
    tensors: dict[str, torch.Tensor] = {}
    counts = {}
    for kind, items in (("trainable", reader.trainable()), ("frozen", reader.frozen()), ("buffers", reader.buffers())):
        counts[kind] = 0
        for name, tensor in items:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{kind} tensor {name} in {info.tag_dir} holds NaN or inf values: training "
                                      "diverged before this save; convert an earlier tag with --tag")
            tensors[name] = tensor.contiguous()
            counts[kind] += 1

    metadata = {"format": "pt", ALIASES_KEY: json.dumps(layout.shared, sort_keys=True)}
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        _verify(tmp, info, tensors)
    return {**counts, "bytes": path.stat().st_size}


def _verify(path: Path, info: CheckpointInfo, written: dict[str, torch.Tensor]) -> None:
    """Every name of the checkpoint's shape tables is there with its shape, and reads back identical."""
    layout = info.layout
    expected = {**layout.trainable_shapes, **layout.frozen, **layout.buffers}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise VerificationError(f"{path} lacks {len(missing)} params of the checkpoint, e.g. {missing[0]}")
        for name, shape in expected.items():
            tensor = f.get_tensor(name)
            if list(tensor.shape) != list(shape) or not torch.equal(tensor, written[name]):
                raise VerificationError(f"{path}: {name} did not read back as written (shape {list(tensor.shape)}, "
                                        f"expected {shape})")
        for name in layout.trainable_shapes:
            if f.get_slice(name).get_dtype() != "F32":
                raise VerificationError(f"{path}: trainable {name} is not fp32")

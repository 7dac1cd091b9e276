"""Stage 2, consolidate: every saved param of the checkpoint in one safetensors file.

Trainable params come from the fp32 master copies in the optimizer files (more precise than the 16-bit
weights the Trainer's adapter file holds); frozen params stay in the dtype they were saved in (lossless, and
half the bytes of fp32 for a 16-bit run). Keys are the checkpoint's own (PEFT's ``base_model.model.…``).
The file is written a bounded piece at a time, straight from the memory-mapped rank files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from zero2merged.errors import CheckpointError, VerificationError
from zero2merged.manifest import replacing
from zero2merged.progress import Progress
from zero2merged.safetensors_io import Reader, Writer, writer_bytes
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
    specs = reader.specs()
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(layout.shared, sort_keys=True)}
    sizes = {name: math.prod(shape) for name, (_, shape) in specs.items()}
    with replacing(path) as tmp, Progress("consolidate", writer_bytes(specs), len(specs)) as progress:
        with Writer(tmp, specs, metadata) as writer:
            for name, offset, piece in reader.pieces():
                progress.update(piece.numel() * piece.element_size(), offset + piece.numel() == sizes[name])
                start = offset * piece.element_size()
                if name in layout.trainable_shapes:
                    if not torch.isfinite(piece).all():
                        raise CheckpointError(f"trainable tensor {name} in {info.tag_dir} holds NaN or inf values: "
                                              "training diverged before this save; convert an earlier tag with --tag")
                    writer.write(name, piece, start)
                elif where := reader.file_range(piece):  # frozen: stage 4 compares them with the base
                    writer.copy(name, *where, piece.numel() * piece.element_size(), start)
                else:
                    writer.write(name, piece, start)
        _verify(tmp, info, specs, writer.size)
    return {
        "trainable": len(layout.trainable_shapes),
        "frozen": len(layout.frozen),
        "buffers": len(layout.buffers),
        "bytes": path.stat().st_size,
        "parameters": sum(math.prod(shape) for _, shape in specs.values()),
    }


def _verify(path: Path, info: CheckpointInfo, specs: dict, size: int) -> None:
    """Every name of the checkpoint's shape tables is there with its shape and dtype, the file whole."""
    if path.stat().st_size != size:
        raise VerificationError(f"{path} is {path.stat().st_size} bytes, {size} were written")
    reader = Reader(path)
    expected = {**info.layout.trainable_shapes, **info.layout.frozen, **info.layout.buffers}
    missing = sorted(set(expected) - set(reader.keys()))
    if missing:
        raise VerificationError(f"{path} lacks {len(missing)} params of the checkpoint, e.g. {missing[0]}")
    for name, shape in expected.items():
        if reader.shape(name) != list(shape) or reader.dtype(name) != specs[name][0]:
            raise VerificationError(f"{path}: {name} reads back as {reader.dtype(name)} {reader.shape(name)}, "
                                    f"{specs[name][0]} {shape} was written")
    for name in info.layout.trainable_shapes:
        if reader.dtype(name) != torch.float32:
            raise VerificationError(f"{path}: trainable {name} is not fp32")

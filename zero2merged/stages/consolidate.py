"""Stage 2, consolidate: every saved param of the checkpoint in one safetensors file.

Trainable params come from the fp32 master copies in the optimizer files (more precise than the 16-bit
weights the Trainer's adapter file holds), written into the file. Frozen params, nearly all of a LoRA
model's bytes, are listed by reference: the byte ranges of the rank files that hold them, in the dtype
they were saved in (see :mod:`zero2merged.files.safetensors_reader`). Copying them would write the whole model once
more, and hash it, for nothing: the later stages read the same bytes from either place, and the rank files
are inputs of this stage already (a new save under the tag redoes it). Where a file range is unknown (no
/proc/self/maps), they are copied in. Keys are the checkpoint's own (PEFT's ``base_model.model.…``). The
file is written a bounded piece at a time, straight from the memory-mapped rank files.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from zero2merged.checkpoint.adapter_file import AdapterFileReader
from zero2merged.checkpoint.quantized import quant_state_tensors
from zero2merged.checkpoint.reader import ZeroReader
from zero2merged.core.errors import CheckpointError, VerificationError
from zero2merged.core.options import Tuning
from zero2merged.core.results import CheckpointInfo, ConsolidateResult
from zero2merged.files.atomic import replacing
from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.safetensors_writer import Writer, writer_bytes
from zero2merged.running.progress import Progress
from zero2merged.running.runner import Stage

ALIASES_KEY = "zero2merged.aliases"  # metadata: alias name -> the saved name it shares storage with


class Consolidate(Stage[ConsolidateResult]):
    """Stage 2 in a conversion; it reads the rank files, which are inspect's inputs too (a new save under the
    tag redoes both).

    Args:
        info: Stage 1's result.
        path: The store to write (``consolidated.safetensors`` in the work directory).
        tuning: How many elements of the rank files to read at a time.
    """

    name = "consolidate"
    result_type = ConsolidateResult

    def __init__(self, info: CheckpointInfo, path: Path, tuning: Tuning):
        self.info, self.path, self.tuning = info, path, tuning

    def outputs(self) -> list[Path]:
        return [self.path]

    def run(self) -> ConsolidateResult:
        return consolidate(self.info, self.path, piece_elements=self.tuning.piece_elements)


def consolidate(info: CheckpointInfo, path: Path, *, piece_elements: int = Tuning.piece_elements) -> ConsolidateResult:
    """Stage 2: read the rank files and write ``path`` (safetensors, frozen params by reference), verified
    against the param tables.

    Args:
        info: Stage 1's result.
        path: The file to write (replaced atomically).
        piece_elements: The most elements read from the rank files at a time.

    Returns:
        Tensor counts per kind and the bytes written.

    Raises:
        CheckpointError: a tensor is missing, mis-sized or holds NaN/inf.
    """
    layout = info.layout
    if layout.kind == "adapter":
        reader = AdapterFileReader(info.tag_dir, layout)
    else:
        reader = ZeroReader(info.tag_dir, layout, piece_elements=piece_elements)
    specs = reader.specs()
    referenced = reader.frozen_ranges()
    stored = {name: spec for name, spec in specs.items() if name not in referenced}
    quant_states = quant_state_tensors(info)  # a QLoRA run's: what dequantizes its 4-bit weights
    stored.update({name: (tensor.dtype, list(tensor.shape)) for name, tensor in quant_states.items()})
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(layout.shared, sort_keys=True)}
    sizes = {name: math.prod(shape) for name, (_, shape) in specs.items()}
    with replacing(path) as tmp, Progress("consolidate", writer_bytes(stored), len(stored)) as progress:
        references = {name: (*specs[name], ranges) for name, ranges in referenced.items()}
        with Writer(tmp, stored, metadata, references) as writer:
            for name, offset, piece in reader.pieces(skip=referenced):  # those are checked as stage 4 reads them
                progress.update(piece.numel() * piece.element_size(), offset + piece.numel() == sizes[name])
                if name in layout.trainable_shapes and not torch.isfinite(piece).all():
                    raise CheckpointError(
                        f"trainable tensor {name} in {info.tag_dir} holds NaN or inf values: "
                        "training diverged before this save; convert an earlier tag with --tag"
                    )
                writer.write(name, piece, offset * piece.element_size())
            for name, tensor in quant_states.items():
                writer.write(name, tensor)
        _check_store(tmp, info, specs, writer.size)
    return ConsolidateResult(
        trainable=len(layout.trainable_shapes),
        frozen=len(layout.frozen),
        frozen_by_reference=len(referenced),
        buffers=len(layout.buffers),
        bytes=path.stat().st_size,
        parameters=sum(math.prod(shape) for _, shape in specs.values()),
        checked=reader.records.checked,
    )


def _check_store(path: Path, info: CheckpointInfo, specs: dict, size: int) -> None:
    """Every name of the checkpoint's shape tables is there with its shape and dtype, the file whole, and
    every reference within the files it names."""
    if path.stat().st_size != size:
        raise VerificationError(f"{path} is {path.stat().st_size} bytes, {size} were written")
    reader = Reader(path)
    expected = {**info.layout.trainable_shapes, **info.layout.frozen, **info.layout.buffers}
    missing = sorted(set(expected) - set(reader.keys()))
    if missing:
        raise VerificationError(f"{path} lacks {len(missing)} params of the checkpoint, e.g. {missing[0]}")
    file_size = functools.cache(lambda file: Path(file).stat().st_size)
    for name, shape in expected.items():
        if reader.shape(name) != list(shape) or reader.dtype(name) != specs[name][0]:
            raise VerificationError(
                f"{path}: {name} reads back as {reader.dtype(name)} {reader.shape(name)}, "
                f"{specs[name][0]} {shape} was written"
            )
        needed = math.prod(shape) * specs[name][0].itemsize
        if reader.nbytes(name) != needed or any(
            offset + nbytes > file_size(file) for file, offset, nbytes in reader.ranges(name)
        ):
            raise VerificationError(
                f"{path}: {name} spans {reader.nbytes(name)} bytes of its files, {needed} are needed"
            )
    for name in info.layout.trainable_shapes:
        if reader.dtype(name) != torch.float32:
            raise VerificationError(f"{path}: trainable {name} is not fp32")

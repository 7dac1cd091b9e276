"""A run's adapter saved gathered, as a plain PEFT adapter folder (``adapter_model.safetensors`` and its
config, no ZeRO files): what the HF Trainer and TRL leave with ZeRO-3's
``stage3_gather_16bit_weights_on_model_save`` and ``save_only_model``. The adapter's weights are then the
run's 16-bit copies (the fp32 masters were not saved); the base's weights all come from the base. Read like a
ZeRO checkpoint (:class:`~zero2merged.checkpoint.reader.ZeroReader`'s interface) so that every later stage,
check and report is the same.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from pathlib import Path

import torch

from zero2merged.core import names
from zero2merged.core.dtypes import SHORT_NAMES
from zero2merged.core.errors import CheckpointError
from zero2merged.core.results import ZeroLayout
from zero2merged.files.safetensors_reader import HeaderError, Reader
from zero2merged.files.zipcheck import RecordCheck

ADAPTER_FILE = "adapter_model.safetensors"


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_FILE).is_file()


def adapter_layout(folder: Path, module_names: dict[str, str]) -> ZeroLayout:
    """The adapter file's tensors as a layout: trained params in the PEFT model's names (``module_names``:
    the file's key -> the model's, from PEFT), nothing frozen.

    Raises:
        CheckpointError: the file is unreadable, holds ZeRO-3 placeholders (empty tensors: saved without
            gathering), or keys PEFT's model does not have.
    """
    path = folder / ADAPTER_FILE
    try:
        reader = Reader(path)
    except HeaderError as e:
        raise CheckpointError(str(e)) from e
    keys = reader.keys()
    empty = [key for key in keys if math.prod(reader.shape(key)) == 0]
    if empty:
        raise CheckpointError(
            f"{path} holds empty tensors ({empty[0]}, ...): ZeRO-3 placeholders, saved without gathering the "
            "weights (stage3_gather_16bit_weights_on_model_save off), and no ZeRO files are here to read them "
            f"from; convert the run's DeepSpeed checkpoint (the folder holding '{names.LATEST}') instead"
        )
    unknown = [key for key in keys if key not in module_names]
    if unknown:
        raise CheckpointError(
            f"{path}: {unknown[0]} is not a tensor the adapter config's PEFT model has ({len(unknown)} such keys); "
            "is the adapter_config.json beside it the one it was saved with?"
        )
    dtypes = {reader.dtype(key) for key in keys}
    return ZeroLayout(
        zero_stage=0,
        world_size=1,
        dtype=SHORT_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "fp32",
        ds_version=None,
        global_step=None,
        trainable=[{module_names[key]: reader.shape(key) for key in keys}],
        frozen={},
        frozen_source=None,
        buffers={},
        model_files=[ADAPTER_FILE],
        kind="adapter",
        renamed={module_names[key]: key for key in keys},
    )


class AdapterFileReader:
    """The adapter file's tensors, in fp32, as :class:`~zero2merged.checkpoint.reader.ZeroReader` gives a
    checkpoint's (its 16-bit values widen to fp32 exactly)."""

    def __init__(self, folder: Path, layout: ZeroLayout):
        self.layout, self.file = layout, Reader(folder / ADAPTER_FILE)
        self.records = RecordCheck([])  # no zip records: the safetensors header was checked whole

    def specs(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        return {name: (torch.float32, shape) for name, shape in self.layout.trainable_shapes.items()}

    def frozen_ranges(self) -> dict[str, list[tuple[str, int, int]]]:
        return {}

    def pieces(self, skip: Collection[str] = ()) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name in self.layout.trainable_shapes:
            if name not in skip:
                yield name, 0, self.file.get(self.layout.saved_name(name)).float().reshape(-1)
        self.records.finish()

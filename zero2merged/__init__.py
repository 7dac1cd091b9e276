"""zero2merged: turn the DeepSpeed ZeRO checkpoint of a LoRA fine-tune into one merged, verified model.

    import zero2merged
    report = zero2merged.convert("run/checkpoint-500", "merged", base_model="meta-llama/Llama-3.2-1B")
    print(report.summary())

The work is six stages (inspect → consolidate → rebuild → load → merge → save), each writing a verified
artifact to a work directory and recorded in its manifest, so a rerun skips what is still valid.
"""

from importlib.metadata import PackageNotFoundError, version

from zero2merged.errors import (
    AdapterConfigError,
    BaseModelError,
    CheckpointError,
    OutputError,
    VerificationError,
    Zero2MergedError,
)
from zero2merged.export import ExportReport, export_adapter
from zero2merged.pipeline import STAGES, ConvertReport, StageReport, convert
from zero2merged.stages.inspect import CheckpointInfo, inspect_checkpoint
from zero2merged.verify import VerifyReport, verify

try:
    __version__ = version("zero2merged")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "STAGES",
    "AdapterConfigError",
    "BaseModelError",
    "CheckpointError",
    "CheckpointInfo",
    "ConvertReport",
    "ExportReport",
    "OutputError",
    "StageReport",
    "VerificationError",
    "VerifyReport",
    "Zero2MergedError",
    "__version__",
    "convert",
    "export_adapter",
    "inspect_checkpoint",
    "verify",
]

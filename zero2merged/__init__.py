"""zero2merged: turn the DeepSpeed ZeRO checkpoint of a LoRA fine-tune into one merged, verified model.

    import zero2merged
    report = zero2merged.convert("run/checkpoint-500", "merged", base_model="meta-llama/Llama-3.2-1B")
    print(report.summary())

The work is six stages (inspect → consolidate → rebuild → load → merge → save), each writing a verified
artifact to a work directory and recorded in its manifest, so a rerun skips what is still valid.

The public names below are imported when first used: the library's functions need torch, transformers
and PEFT, which take seconds to import, and ``import zero2merged`` (the command line's ``--help``, say)
should not wait for them.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from zero2merged.core.errors import (
    AdapterConfigError,
    BaseModelError,
    CheckpointError,
    OptionError,
    OutputError,
    VerificationError,
    Zero2MergedError,
)

try:
    __version__ = version("zero2merged")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "convert": "zero2merged.api.pipeline",
    "inspect_checkpoint": "zero2merged.stages.inspect",
    "verify": "zero2merged.api.verify",
    "export_adapter": "zero2merged.api.export",
    "STAGES": "zero2merged.api.pipeline",
    "ConvertReport": "zero2merged.running.report",
    "StageReport": "zero2merged.running.report",
    "VerifyReport": "zero2merged.api.verify",
    "ExportReport": "zero2merged.api.export",
    "CheckpointInfo": "zero2merged.core.results",
    "Source": "zero2merged.core.options",
    "ConvertOptions": "zero2merged.core.options",
    "Tuning": "zero2merged.core.options",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'zero2merged' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "STAGES",
    "AdapterConfigError",
    "BaseModelError",
    "CheckpointError",
    "CheckpointInfo",
    "ConvertOptions",
    "ConvertReport",
    "ExportReport",
    "OptionError",
    "OutputError",
    "Source",
    "StageReport",
    "Tuning",
    "VerificationError",
    "VerifyReport",
    "Zero2MergedError",
    "__version__",
    "convert",
    "export_adapter",
    "inspect_checkpoint",
    "verify",
]

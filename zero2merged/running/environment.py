"""What ``zero2merged env`` prints: the installed libraries against their supported ranges
(:mod:`zero2merged.core.environment`), Python, and whether torch sees CUDA: the lines for a bug report."""

from __future__ import annotations

import sys

from zero2merged import __version__
from zero2merged.core.environment import python_line, statuses


def environment_lines() -> tuple[list[str], str]:
    """The report's lines, and the refused libraries named in one string ("" when none is)."""
    found = statuses()
    lines = [f"{'zero2merged':13} {__version__}", python_line(), *(status.line() for status in found)]
    lines.append(f"{'CUDA':13} {cuda_visible()}")
    refused = ", ".join(f"{s.library.name} ({s.verdict})" for s in found if s.refused)
    return lines, refused


def environment_record() -> dict:
    """The same as JSON-ready data."""
    libraries = {
        s.library.name: {"version": s.version, "verdict": s.verdict, "supported": s.library.spec} for s in statuses()
    }
    return {
        "zero2merged": __version__,
        "python": sys.version.split()[0],
        "libraries": libraries,
        "cuda": cuda_visible(),
    }


def cuda_visible() -> str:
    """Whether torch sees CUDA devices (torch imported here, on demand: a few seconds, and it may be absent)."""
    try:
        import torch
    except ImportError:
        return "unknown (torch is not installed)"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        return f"not visible (torch {torch.__version__}: {build})"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"{torch.cuda.device_count()} device(s) visible: {', '.join(names)} (CUDA {torch.version.cuda})"

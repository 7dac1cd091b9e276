"""The libraries zero2merged runs with: which versions it supports, and what is installed.

Two of its three uses run inside the training job (the Trainer callback, ``export_engine``), in whatever
environment trained the model, often one pinned for months; so the supported ranges are wide, and tested at
both ends (``make test`` on today's releases, ``make test-oldest`` on the oldest). They are written here once,
as pip specifiers; ``pyproject.toml`` states the same (a test holds them equal).

A library below its range, or in a range known not to work, is refused at the start of ``convert``,
``verify``, ``export-adapter`` and ``inspect`` in one line (:func:`require_supported`). One newer than the
newest tested, or above an upper bound, still runs: it is untested, not known to be broken; ``zero2merged
env`` says so.

Reads installed versions from package metadata only: nothing here imports torch or the other libraries.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from zero2merged.core.errors import LibraryError

# transformers 5.0 to 5.20 lack what the streaming layouts call (core_model_loading's apply_converters and
# apply_renamings came with 5.21); transformers 4 has no conversion mapping at all and is read its own way.
TRANSFORMERS_WITHOUT_LAYOUT_API = ",".join(f"!=5.{minor}.*" for minor in range(21))


@dataclass(frozen=True)
class Library:
    """A library zero2merged runs with.

    Attributes:
        name: Its distribution name (as pip knows it).
        spec: The supported versions, as a pip specifier.
        oldest: The oldest version tested (``make test-oldest``).
        newest: The newest version tested (``make test``).
        required: Needed to convert at all; else used only by some runs (it is checked where installed).
        role: What it is needed for, for ``zero2merged env``.
    """

    name: str
    spec: str
    oldest: str
    newest: str
    required: bool = True
    role: str = ""


LIBRARIES = [
    # torch's upper bound keeps pip from replacing a machine's torch with a multi-GB CUDA build of a newer one.
    Library("torch", ">=2.6,<2.14", "2.6.0", "2.13.0"),
    Library("transformers", f">=4.56.2,{TRANSFORMERS_WITHOUT_LAYOUT_API}", "4.56.2", "5.25.0"),
    Library("peft", ">=0.17.1", "0.17.1", "0.21.2"),
    Library("accelerate", ">=1.10.1", "1.10.1", "1.16.0"),
    Library("safetensors", ">=0.4.3", "0.4.3", "0.8.0"),
    Library("deepspeed", ">=0.17.6", "0.17.6", "0.19.8", required=False, role="for training; converting needs none"),
    Library("bitsandbytes", ">=0.50.2", "0.50.2", "0.50.2", required=False, role="for QLoRA runs: the qlora extra"),
]
BY_NAME = {library.name: library for library in LIBRARIES}

# A run's feature and the first PEFT with it: a config asking for it under an older PEFT is refused in one line.
PEFT_FEATURES = {"target_parameters": ("LoRA on parameters (MoE experts)", "0.17.0")}


@dataclass(frozen=True)
class Status:
    """One library as installed.

    Attributes:
        library: What is supported.
        version: The installed version; None when it is not installed.
        verdict: ``ok`` (in the supported range, not newer than tested), ``untested`` (newer than tested,
            or above the upper bound: it runs),
            ``too old`` or ``excluded`` (versions known not to work: refused), ``missing``.
    """

    library: Library
    version: str | None
    verdict: str

    @property
    def refused(self) -> bool:
        return self.verdict in ("too old", "excluded") or (self.verdict == "missing" and self.library.required)

    def line(self) -> str:
        """``name  version  verdict  (the supported range; the versions tested)`` for ``zero2merged env``."""
        lib = self.library
        verdict = "optional" if self.verdict == "missing" and not lib.required else self.verdict
        tested = lib.oldest if lib.oldest == lib.newest else f"{lib.oldest} and {lib.newest}"
        role = f"; {lib.role}" if lib.role else ""
        return f"{lib.name:13} {self.version or 'not installed':15} {verdict:9} (supported {_readable(lib.spec)}; " + (
            f"tested {tested}{role})"
        )


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def status(library: Library, version: str | None = None) -> Status:
    """How ``version`` (default: the installed one) of ``library`` stands against its supported range."""
    version = version if version is not None else installed(library.name)
    if version is None:
        return Status(library, None, "missing")
    try:
        parsed = Version(version)
    except InvalidVersion:
        return Status(library, version, "untested")
    release = Version(parsed.base_version)  # 2.13.0+cpu and 5.0.0rc1 are judged as 2.13.0 and 5.0.0
    failed = [spec for spec in SpecifierSet(library.spec) if not spec.contains(release, prereleases=True)]
    if any(spec.operator in (">=", ">", "==", "~=") for spec in failed):
        return Status(library, version, "too old")
    if any(spec.operator == "!=" for spec in failed):
        return Status(library, version, "excluded")
    if failed or release > Version(library.newest):
        return Status(library, version, "untested")
    return Status(library, version, "ok")


def statuses() -> list[Status]:
    return [status(library) for library in LIBRARIES]


def require_supported(*names: str) -> None:
    """Refuse, in one line, a library (of ``names``, default: every one) outside what zero2merged supports:
    below its range, in a range known not to work, or a required one missing. Newer ones pass.

    Raises:
        LibraryError: the first such library, with what to install.
    """
    for library in [BY_NAME[n] for n in names] if names else LIBRARIES:
        found = status(library)
        if not found.refused:
            continue
        if found.verdict == "missing":
            raise LibraryError(f"{library.name} is not installed: zero2merged needs {library.name}{library.spec}")
        why = "is older than" if found.verdict == "too old" else "is one of the versions outside"
        raise LibraryError(
            f"{library.name} {found.version} {why} the supported {_readable(library.spec)}: install "
            f"'{library.name}{_minimum(library.spec)}' or newer (zero2merged env lists every library)"
        )


def require_peft_feature(key: str, path: str) -> None:
    """Refuse a run whose LoRA config uses ``key`` (see :data:`PEFT_FEATURES`) under a PEFT without it."""
    what, first = PEFT_FEATURES[key]
    version = installed("peft")
    if version is not None and Version(Version(version).base_version) < Version(first):
        raise LibraryError(
            f"{path} uses {key} ({what}), which needs PEFT {first} or newer; PEFT {version} is installed"
        )


PYTHON = ">=3.10"


def python_line() -> str:
    version = platform.python_version()
    verdict = "ok" if Version(version) in SpecifierSet(PYTHON) else "too old"
    return f"{'python':13} {version:15} {verdict:9} (supported {PYTHON}; {platform.python_implementation()})"


def _minimum(spec: str) -> str:
    return next((str(s) for s in SpecifierSet(spec) if s.operator == ">="), spec)


def _readable(spec: str) -> str:
    """A specifier for people: ``>=4.56.2, not 5.0-5.20`` rather than twenty-one ``!=`` clauses."""
    specs = sorted(SpecifierSet(spec), key=lambda s: (s.operator != ">=", s.operator, s.version))
    kept = [str(s) for s in specs if s.operator != "!="]
    excluded = [s.version.removesuffix(".*") for s in specs if s.operator == "!="]
    if excluded:
        ordered = sorted(excluded, key=Version)
        kept.append(f"not {ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else f"not {ordered[0]}")
    return ", ".join(kept)

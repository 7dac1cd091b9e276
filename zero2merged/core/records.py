"""Typed records that round-trip through JSON: what the stages hand on is kept in the work directory's
manifest and read back as the same types (:mod:`zero2merged.core.results` holds the stages' own)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union


class Record:
    """A dataclass that turns into JSON-ready data and back, nested records included."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _revive(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})


def _revive(hint: Any, value: Any) -> Any:
    """``value`` (as JSON gave it) as the type ``hint`` names: records rebuilt, containers followed."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value)
    if origin in (Union, types.UnionType):
        [inner] = [arg for arg in args if arg is not type(None)]  # only ``X | None`` is used
        return _revive(inner, value)
    if origin is list:
        return [_revive(args[0], item) for item in value]
    if origin is dict:
        return {key: _revive(args[1], item) for key, item in value.items()}
    return value


class StageResult(Record):
    """What a stage hands on; its report shows :meth:`metrics` and a one-line :meth:`headline`."""

    def metrics(self) -> dict:
        """The figures for the run's report (what the next stages need but a reader does not is left out)."""
        return self.to_dict()

    def headline(self) -> str:
        return ""

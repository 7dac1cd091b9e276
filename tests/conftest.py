"""Shared test fixtures: real DeepSpeed checkpoints, trained once and cached (see fixtures/)."""

from __future__ import annotations

import pytest

from fixtures import Fixture, build_fixture


@pytest.fixture(scope="session")
def trained():
    """``trained(name)`` -> the fixture ``name`` from ``fixtures.SPECS``, trained by DeepSpeed if not cached."""
    built: dict[str, Fixture] = {}

    def get(name: str) -> Fixture:
        if name not in built:
            built[name] = build_fixture(name)
        return built[name]

    return get

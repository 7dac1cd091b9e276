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


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """``converted(name)`` -> (fixture, output folder, report): the fixture converted (streaming, the
    defaults) once per test module."""
    from tests.helpers import convert_fixture

    done = {}

    def get(name: str):
        if name not in done:
            fixture = trained(name)
            output = tmp_path_factory.mktemp(name) / "merged"
            done[name] = fixture, output, convert_fixture(fixture, output)
        return done[name]

    return get

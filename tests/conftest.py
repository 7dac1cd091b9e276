"""Shared test fixtures: real DeepSpeed checkpoints, trained once and cached (see fixtures/)."""

from __future__ import annotations

import pytest

from fixtures import SPECS, Fixture, build_fixture, build_fixtures
from fixtures.specs import unsupported


def pytest_collection_modifyitems(config, items):
    """Note the fixtures the selected tests take (a parameter naming one), to train them together."""
    config.wanted_fixtures = sorted(
        {value for item in items for value in getattr(getattr(item, "callspec", None), "params", {}).values()
         if isinstance(value, str) and value in SPECS and not unsupported(SPECS[value])}
    )  # fmt: skip


@pytest.fixture(scope="session")
def trained(request):
    """``trained(name)`` -> the fixture ``name`` from ``fixtures.SPECS``, trained by DeepSpeed if not cached.
    The first call trains every fixture the selected tests take, in as few launches as it can. A fixture the
    installed stack cannot train (an old DeepSpeed's limits, say: ``fixtures.specs.unsupported``) skips the test,
    saying why."""
    built: dict[str, Fixture] = {}

    def get(name: str) -> Fixture:
        reason = unsupported(SPECS[name])
        if reason:
            pytest.skip(f"{name}: {reason}")
        if not built:
            build_fixtures([*getattr(request.config, "wanted_fixtures", []), name])
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

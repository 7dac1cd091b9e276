"""The fuzzer (:mod:`tests.fuzzing`) as tests: each seed a real checkpoint, base or adapter config damaged one
way, converted in its own process with a time and memory limit. Every case must end refused in one line
with nothing written, or with the undamaged conversion's files (or, for a well-formed input that means
something else, a model ``verify`` passes against that input). ``make test`` runs a seeded subset (every
mutation family once); ``make fuzz`` the full set."""

from __future__ import annotations

import pytest

from tests.fuzzing import FULL_SEEDS, SUBSET_SEEDS, Harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("seed", SUBSET_SEEDS)
def test_a_damaged_input_is_refused_in_one_line_or_converts_faithfully(harness, seed):
    outcome = harness.run(seed)
    assert outcome.ok, outcome.report()


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", [seed for seed in FULL_SEEDS if seed not in SUBSET_SEEDS])
def test_full_set(harness, seed):
    outcome = harness.run(seed)
    assert outcome.ok, outcome.report()

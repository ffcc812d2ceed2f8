"""The committed mutation check (scripts/mutants.py, `make mutants`) still applies to today's code: each
mutant's code occurs exactly once in its file and its tests exist. A refactor that moves mutated code fails
here, in CI, instead of at the next (slow, manual) mutation run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants", REPO / "scripts" / "mutants.py")
mutants = sys.modules["mutants"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(mutants)
MUTANTS = mutants.MUTANTS


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_names_existing_tests(mutant):
    source = (REPO / mutant.path).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.name}: {mutant.old!r} occurs {source.count(mutant.old)} times in {mutant.path}"
    assert mutant.new != mutant.old
    for test in (t for t in mutant.tests if not t.startswith("-") and t.startswith("tests/")):
        assert (REPO / test.split("::")[0]).exists(), f"{mutant.name}: {test} does not exist"


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))

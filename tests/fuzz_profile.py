"""How the property-based (hypothesis) tests run: reproducibly in CI, exploring under `make fuzz`.

Two settings profiles, chosen by HYPOTHESIS_PROFILE (tests/conftest.py loads it; default `ci`):

- `ci`: every @given test runs from the fixed seed `CI_SEED` (`reproducible`), after replaying the stored
  examples of tests/fuzz-examples/ read-only: the same commit draws the same inputs on every machine, from a
  clean checkout (no .hypothesis/ needed).
- `fuzz` (`make fuzz`): fresh random inputs each run; every failure found is written to tests/fuzz-examples/
  and never deleted there (`KeepEveryExample`), so that once committed CI replays it as a regression example.

Hypothesis' own `derandomize=True` would be a fixed seed too, but it turns the example database off; a fixed
seed through `hypothesis.seed` keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

EXAMPLES_DIR = Path(__file__).resolve().parent / "fuzz-examples"
CI_SEED = 20_251_203
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


class KeepEveryExample(DirectoryBasedExampleDatabase):
    """A directory database that only adds: an example that stops failing (its bug fixed) stays as a
    regression example, where hypothesis would delete it."""

    def delete(self, key: bytes, value: bytes) -> None:
        pass

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.save(dest, value)


def load() -> None:
    settings.register_profile("ci", database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES_DIR)),
                              derandomize=False, print_blob=True)
    settings.register_profile("fuzz", database=KeepEveryExample(EXAMPLES_DIR), derandomize=False, print_blob=True)
    if PROFILE not in ("ci", "fuzz"):
        raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'fuzz', got {PROFILE!r}")
    settings.load_profile(PROFILE)


def reproducible(test):
    """A @given test with the fixed seed under the `ci` profile; as it is (a fresh seed) under `fuzz`."""
    return seed(CI_SEED)(test) if PROFILE == "ci" else test

"""The handlers most tests of tests/serving share (a module may define its own, as the fuzz does)."""

from __future__ import annotations

import pytest

from tests.serving.handlers import LIMITS, make_handler


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    """Continuous batching, as shipped, with a warm-up that times the slowest step."""
    return make_handler(tiny_model_dir, warmup=True, limits=LIMITS)


@pytest.fixture(scope="module")
def static_handler(tiny_model_dir):
    """The same, each batch run to completion (continuousBatching: false)."""
    return make_handler(tiny_model_dir, continuousBatching=False, warmup=False, limits=LIMITS)

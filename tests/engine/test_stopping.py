"""StoppingCriteria, the one place that decides why a generation ends on the host: a stop string takes
precedence over what the device decided in the same look (an end-of-text token, or max_new_tokens), and the
deadline comes last."""

from __future__ import annotations

import pytest

from handler.engine.stopping import FinishReason, StoppingCriteria
from handler.engine.text import IncrementalText, detokenizer


@pytest.fixture
def criteria(tokenizer):
    def make(stops=(), deadline=None) -> StoppingCriteria:
        return StoppingCriteria(IncrementalText(detokenizer(tokenizer), tuple(stops)), deadline)

    return make


@pytest.mark.parametrize("device_reason", [None, FinishReason.EOS, FinishReason.LENGTH])
def test_a_stop_string_in_the_same_look_wins_over_the_devices_reason(criteria, tokenizer, device_reason):
    tokens = tokenizer.encode("Hello world, and more")
    keep_all = criteria(["world"])
    reason, keep = keep_all.reason_to_stop(tokens, device_reason, now=0.0)
    assert reason is FinishReason.STOP
    assert 0 < keep < len(tokens) and keep_all.text.text() == "Hello "


@pytest.mark.parametrize("device_reason", [FinishReason.EOS, FinishReason.LENGTH])
def test_without_a_stop_string_the_devices_reason_ends_it(criteria, tokenizer, device_reason):
    assert criteria(["never"], deadline=1.0).reason_to_stop(tokenizer.encode("Hello"), device_reason, now=5.0) == \
        (device_reason, None)


def test_the_deadline_ends_it_only_once_passed(criteria, tokenizer):
    c = criteria(deadline=10.0)
    assert c.reason_to_stop(tokenizer.encode("Hello"), None, now=9.0) == (None, None)
    assert c.reason_to_stop(tokenizer.encode(" world"), None, now=10.5) == (FinishReason.TIMEOUT, None)

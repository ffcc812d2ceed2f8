"""The request deadline, through the whole handler: preparation sets it from `request_budget_s`
(timeout_fraction x responseTimeout) on the monotonic clock, and a request that outlives it ends as
`timeout`, keeping what it generated. (Other tests set `deadline` on engine requests by hand.)"""

from __future__ import annotations

import pytest

from tests.serving.handlers import make_handler, run


@pytest.fixture(scope="module")
def hurried(tiny_model_dir):
    """A worker whose requests may generate for 1 ms (responseTimeout 1 s x timeout_fraction 0.001); no
    warm-up, so admission refuses nothing for time and the deadline alone ends the request."""
    return make_handler(tiny_model_dir, warmup=False, responseTimeout=1, timeout_fraction=0.001,
                        limits={"max_new_tokens": 96})


def test_the_budget_gives_a_deadline_on_the_monotonic_clock(hurried):
    import time

    request = hurried.native.prepare("d", {"body": {"prompt": "hi"}},
                                                    {"Content-Type": "application/json"}).request
    assert hurried.settings.request_budget_s == pytest.approx(0.001)
    assert 0 < request.deadline - time.monotonic() <= 0.001


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_budget_ends_as_timeout_with_its_tokens(hurried, stream):
    body = {"prompt": "Once upon a time", "decoding": "greedy", "max_new_tokens": 96, "ignore_eos": True,
            "stream": stream, "return_token_ids": True}
    codes, answers, _ = run(hurried, [body])
    assert codes == [200]
    answer = answers[0]
    assert answer["finish_reason"] == "timeout", answer
    assert 0 < len(answer["token_ids"]) < 96

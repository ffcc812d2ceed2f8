"""The scheduler alone (`handler.engine.scheduler`): no model, no tensors, hand-made step outputs.

Each test plays the runner: it takes `schedule()`'s admissions (prefilling nothing), says what the device
did in a `StepOutput`, and checks what the scheduler decided: who is admitted and where, who finishes and
why, which slots the device must stop. The model-backed promises (a request's tokens do not depend on its
neighbours) are tests/engine/test_scheduler.py and test_batch_invariance.py.
"""

from __future__ import annotations

import pytest

from handler.engine.params import GenerationParams
from handler.engine.scheduler import Request, Scheduler, StepOutput
from handler.engine.stopping import FinishReason

GREEDY = GenerationParams(decoding="greedy", max_new_tokens=8)


def letters(tokens: list[int]) -> str:
    """A detokenizer for hand-made tokens: token t is the letter chr(ord('a') + t)."""
    return "".join(chr(ord("a") + t) for t in tokens)


def scheduler(slots: int = 2, max_len: int = 32, max_top_k: int = 8) -> Scheduler:
    return Scheduler(slots, max_len, max_top_k, detokenize=letters)


def request(name: str, params: GenerationParams = GREEDY, deadline: float | None = None) -> Request:
    return Request(name, [1, 2, 3], params, deadline=deadline)


def admit(s: Scheduler, failed: dict | None = None) -> list[tuple[int, str]]:
    """One admission round as the runner does it: (slot, request id) admitted, in order."""
    out = s.schedule()
    s.prefilled(out, failed or {}, now=0.0)
    return [(slot, gen.request_id) for slot, gen in out.admitted]


def step(s: Scheduler, tokens: dict[int, list[int]], device: dict | None = None, now: float = 1.0,
         error: BaseException | None = None):
    return s.update(StepOutput(tokens, device or {}, now, steps=4, error=error))


def test_requests_are_admitted_in_arrival_order_into_the_lowest_free_slots():
    s = scheduler(slots=2)
    for name in ("a", "b", "c"):
        s.submit(request(name))
    assert admit(s) == [(0, "a"), (1, "b")]
    assert [g.request_id for g in s.waiting] == ["c"] and s.stats().slots_in_use == 2
    batch = s.decode_batch()
    assert batch.slots == (0, 1) and batch.rows == 2 and batch.known == {0: 0, 1: 0} and not batch.sampling


def test_a_finished_request_frees_its_slot_for_the_next_one_and_the_device_is_told():
    s = scheduler(slots=2)
    for name in ("a", "b", "c"):
        s.submit(request(name))
    admit(s)
    changed, events = step(s, {0: [4, 5], 1: [6]}, {0: FinishReason.EOS})
    assert events and {g.request_id for g in changed} == {"a", "b"}
    a = s.get("a")
    assert a.finish_reason is FinishReason.EOS and a.tokens == [4, 5] and a.slot == 0
    out = s.schedule()
    assert out.released == (0,) and [(slot, g.request_id) for slot, g in out.admitted] == [(0, "c")]
    s.prefilled(out, {}, now=2.0)
    assert s.decode_batch().known == {0: 0, 1: 1}


def test_each_device_reason_and_the_host_reasons_end_their_requests():
    s = scheduler(slots=4)
    s.submit(request("eos"))
    s.submit(request("length"))
    s.submit(request("stop", GenerationParams(decoding="greedy", max_new_tokens=8, stop=("cd",))))
    s.submit(request("timeout", deadline=5.0))
    admit(s)
    step(s, {0: [1], 1: [1], 2: [1, 2, 3], 3: [1]}, {0: FinishReason.EOS, 1: FinishReason.LENGTH}, now=6.0)
    reasons = {name: s.get(name).finish_reason for name in ("eos", "length", "stop", "timeout")}
    assert reasons == {"eos": FinishReason.EOS, "length": FinishReason.LENGTH, "stop": FinishReason.STOP,
                       "timeout": FinishReason.TIMEOUT}
    assert s.get("stop").text.text() == "b" and s.get("timeout").tokens == [1]  # cut at "cd"; kept what it made
    assert sorted(s.schedule().released) == [0, 1, 2, 3] and not s.busy


def test_a_stop_string_wins_over_the_devices_reason_in_the_same_look():
    s = scheduler(slots=1)
    s.submit(request("a", GenerationParams(decoding="greedy", max_new_tokens=8, stop=("c",))))
    admit(s)
    step(s, {0: [1, 2, 3]}, {0: FinishReason.EOS})
    assert s.get("a").finish_reason is FinishReason.STOP


def test_a_deadline_not_yet_passed_keeps_the_request_running():
    s = scheduler(slots=1)
    s.submit(request("a", deadline=5.0))
    admit(s)
    _, events = step(s, {0: [1]}, now=4.9)
    assert events and s.get("a").first_token_at == 4.9  # its first tokens are an event, not an end
    _, events = step(s, {0: [2]}, now=5.0)
    assert not events and not s.get("a").done  # at the deadline, not past it
    step(s, {}, now=5.1)
    assert s.get("a").finish_reason is FinishReason.TIMEOUT and s.get("a").tokens == [1, 2]


def test_cancelling_a_running_request_frees_its_slot_and_a_waiting_one_never_takes_a_slot():
    s = scheduler(slots=1)
    running, waiting, later = (s.submit(request(n)) for n in ("running", "waiting", "later"))
    admit(s)
    s.cancel("waiting")
    s.cancel("running")
    assert running.finish_reason is FinishReason.CANCELLED and waiting.finish_reason is FinishReason.CANCELLED
    assert waiting.slot is None and s.take_released() == (0,)
    assert admit(s) == [(0, "later")] and s.cancel("running") is running  # a second cancel changes nothing
    assert later.slot == 0 and not later.done


def test_a_failed_prefill_fails_its_request_alone_and_frees_its_slot():
    s = scheduler(slots=2)
    bad, good = s.submit(request("bad")), s.submit(request("good"))
    out = s.schedule()
    failed = s.prefilled(out, {0: MemoryError("simulated")}, now=0.0)
    assert failed == [bad] and bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, MemoryError)
    assert good.admitted_at == 0.0 and s.decode_batch().slots == (1,) and 0 in s.free


def test_a_failed_step_fails_every_live_request_and_no_waiting_one():
    s = scheduler(slots=1)
    live, queued = s.submit(request("live")), s.submit(request("queued"))
    admit(s)
    err = RuntimeError("device fault")
    changed, events = step(s, {}, error=err)
    assert events and changed == [live] and live.finish_reason is FinishReason.ERROR and live.error is err
    assert not queued.done and admit(s) == [(0, "queued")]


def test_records_are_kept_until_forgotten_and_counted():
    s = scheduler(slots=1)
    a = s.submit(request("a"))
    admit(s)
    step(s, {0: [1, 2, 3]}, {0: FinishReason.LENGTH})
    stats = s.stats()
    assert (stats.generated_tokens, stats.steps, s.tracked) == (3, 4, 1) and a.done
    s.forget("a")
    assert s.tracked == 0 and s.get("a") is None


@pytest.mark.parametrize("bad,words", [
    (Request("long", list(range(30)), GenerationParams(max_new_tokens=8)), "exceeds the slots' 32 positions"),
    (Request("wide", [1], GenerationParams(top_k=9, max_new_tokens=2)), "top_k 9 exceeds the pool's 8"),
    (Request("empty", [], GREEDY), "no tokens"),
])
def test_what_the_pool_cannot_hold_is_refused_at_submit(bad, words):
    s = scheduler()
    with pytest.raises(ValueError, match=words):
        s.submit(bad)
    assert not s.busy


def test_a_request_id_is_taken_once():
    s = scheduler()
    s.submit(request("a"))
    with pytest.raises(ValueError, match="already in the engine"):
        s.submit(request("a"))


# ---- issue 22: the extras flag, logprobs cut with the tokens, scoring with max_new_tokens=0 ----


def test_the_extras_flag_and_the_logprobs_slots_follow_the_live_requests():
    from handler.engine.logprobs import TokenLogprob

    s = scheduler(slots=3)
    s.submit(request("plain"))
    s.submit(request("scored", GenerationParams(decoding="greedy", max_new_tokens=8, logprobs=2)))
    s.submit(request("penalized", GenerationParams(decoding="greedy", max_new_tokens=8, presence_penalty=0.5)))
    admit(s)
    batch = s.decode_batch()
    assert batch.extras and batch.logprobs == {1: 2}
    lp = [TokenLogprob(t, -0.5, ((t, -0.5), (9, -1.0))) for t in (4, 5)]
    s.update(StepOutput({0: [4], 1: [4, 5], 2: [4]}, {1: FinishReason.EOS}, 1.0, new_logprobs={1: lp}))
    assert s.get("scored").logprobs == lp and s.get("plain").logprobs == [] and s.get("penalized").logprobs == []
    batch = s.decode_batch()  # the request with logprobs ended; the penalized one keeps the extras on
    assert batch.slots == (0, 2) and batch.extras and batch.logprobs == {}
    step(s, {0: [6], 2: [6]}, {2: FinishReason.EOS})
    batch = s.decode_batch()  # only the plain request is left: the step runs without its extras
    assert batch.slots == (0,) and not batch.extras


def test_logprobs_are_cut_where_a_stop_string_cuts_the_tokens():
    from handler.engine.logprobs import TokenLogprob

    s = scheduler(slots=1)
    s.submit(request("a", GenerationParams(decoding="greedy", max_new_tokens=8, logprobs=0, stop=("cd",))))
    admit(s)
    new = [1, 2, 3, 4]  # b c d e: "cd" ends at the third token
    s.update(StepOutput({0: new}, {}, 1.0, new_logprobs={0: [TokenLogprob(t, -float(t), ()) for t in new]}))
    gen = s.get("a")
    assert gen.finish_reason is FinishReason.STOP and gen.tokens == [1, 2, 3]
    assert [x.token_id for x in gen.logprobs] == gen.tokens


def test_a_plain_batch_has_the_extras_off():
    s = scheduler(slots=2)
    s.submit(request("a"))
    s.submit(request("b", GenerationParams(decoding="greedy", max_new_tokens=8, prompt_logprobs=3)))
    admit(s)
    batch = s.decode_batch()
    assert not batch.extras and batch.logprobs == {}  # prompt logprobs come from the prefill, not the step


def test_max_new_tokens_0_ends_at_its_prefill_and_frees_its_slot():
    s = scheduler(slots=1)
    s.submit(request("score", GenerationParams(max_new_tokens=0, prompt_logprobs=0)))
    s.submit(request("next"))
    out = s.schedule()
    ended = s.prefilled(out, {}, now=0.0)
    assert [g.request_id for g in ended] == ["score"] and ended[0].finish_reason is FinishReason.LENGTH
    assert ended[0].tokens == [] and s.decode_batch() is None
    out = s.schedule()
    assert out.released == (0,) and [(slot, g.request_id) for slot, g in out.admitted] == [(0, "next")]

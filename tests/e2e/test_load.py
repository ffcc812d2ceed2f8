"""A bounded load test in CI: concurrent clients, continuous batching, zero lost or wrong answers."""

from __future__ import annotations

from benchmarks.load import SHORT, run_load, run_open_loop, RunResult, workload
from gpt2ops import REPO
from gpt2ops.expected import ExpectedAnswers
from tests.e2e.conftest import MODEL


def test_load_loses_nothing_and_answers_right(server, tiny_model_dir, tokenizer):
    expected = ExpectedAnswers(tiny_model_dir)
    mix = workload(tokenizer, REPO / "data" / "corpus.txt", 24, seed=3, longest=64)
    want = [expected(body).tokens for body in mix]
    before = len(server.batch_sizes())
    result = run_load(server.client, MODEL, mix, want, clients=12, requests=96, seconds=240)
    print("\n" + result.table(12))
    assert result.sent == 96
    assert (result.lost, result.wrong) == (0, 0)
    assert result.ok == 96 and dict(result.statuses) == {200: 96}
    joined = server.batch_sizes()[before:]
    assert sum(joined) == 96 and max(joined) > 1  # requests arrived together and joined the running batch


def test_open_loop_arrivals_short_requests_are_not_held_by_long_ones(server, tiny_model_dir, tokenizer):
    """Poisson arrivals: every answer right, and short requests finish well before the long ones."""
    bodies = workload(tokenizer, REPO / "data" / "corpus.txt", 40, seed=4, longest=160)
    expected = ExpectedAnswers(tiny_model_dir)
    result = RunResult("continuous", bodies, run_open_loop(server.client, MODEL, bodies, rate=20),
                       [expected(b).tokens for b in bodies])
    assert (result.lost, result.wrong) == (0, 0), result.statuses
    long_p50 = percentile_of(result, lambda b: b["max_new_tokens"] > 96)
    assert result.latency_ms(0.5, short_only=True) < long_p50 / 2
    assert any(b["max_new_tokens"] <= SHORT for b in bodies)


def percentile_of(result, keep) -> float:
    xs = sorted(1000 * o.latency for o, b in zip(result.outcomes, result.bodies) if keep(b))
    return xs[len(xs) // 2]

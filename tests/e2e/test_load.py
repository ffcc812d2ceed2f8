"""A bounded load test in CI: concurrent clients, dynamic batching, zero lost or wrong answers."""

from __future__ import annotations

from benchmarks.load import expected_tokens, request_mix, run_load
from tests.e2e.conftest import MODEL


def test_load_with_batching_loses_nothing_and_answers_right(server, tiny_model_dir):
    mix = request_mix(16)
    expected = expected_tokens(tiny_model_dir, mix)
    result = run_load(server.client, MODEL, mix, expected, clients=16, requests=160, seconds=120,
                      batch_sizes=server.batch_sizes)
    print("\n" + result.table(16))
    assert result.sent == 160
    assert (result.lost, result.wrong) == (0, 0)
    assert result.ok == 160 and dict(result.statuses) == {200: 160}
    assert sum(k * v for k, v in result.batch_sizes.items()) == 160
    assert max(result.batch_sizes) > 1  # TorchServe batched concurrent requests

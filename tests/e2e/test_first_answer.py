"""The first thing a new user sees: `make run` asks the served tiny model "你是谁?" and prints its answer."""

from __future__ import annotations

from tests.e2e.conftest import MODEL
from tests.readability import readability_problems


def test_make_runs_question_gets_a_readable_answer(client):
    answer = client.generate(MODEL, "你是谁?")  # what scripts/query.py sends for `make run`: the defaults
    assert readability_problems(answer["generated_text"]) == [], answer
    assert answer["full_text"] == "你是谁?" + answer["generated_text"]
    assert answer["finish_reason"] == "eos", answer  # a whole answer, not one cut at max_new_tokens

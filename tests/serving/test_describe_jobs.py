"""handler.serving.describe_jobs: the describe job answered, and one that comes back recognised."""

from __future__ import annotations

import logging

import pytest

from handler.serving.describe_jobs import METRIC, DescribeJobs, is_describe_job


class RecordedMetrics:  # a fake of TorchServe's context.metrics: records what is published
    def __init__(self):
        self.published = []

    def add_metric(self, name, value, unit, metric_type=None, dimensions=None):
        self.published.append((name, value))


class Context:
    def __init__(self):
        self.metrics = RecordedMetrics()


@pytest.mark.parametrize("headers, entry, expected", [
    ({"describe": "True"}, {}, True),                       # the management API's job: no parameters
    ({"describe": "True"}, {"body": b""}, True),
    ({"describe": "True"}, {"body": {"prompt": "x"}}, False),  # a prediction carrying the header
    ({"describe": "true"}, {}, False),                      # the frontend sends "True" exactly
    ({}, {}, False),
])
def test_what_is_a_describe_job(headers, entry, expected):
    assert is_describe_job(headers, entry) is expected


def test_a_describe_job_that_comes_back_is_logged_once_and_published(caplog):
    jobs, context = DescribeJobs(lambda: '{"memory": {}}'), Context()
    with caplog.at_level(logging.ERROR):
        assert jobs.answer("a", context) == '{"memory": {}}'
        assert jobs.answer("b", context) == '{"memory": {}}'
        assert context.metrics.published == [] and not caplog.records
        for _ in range(3):
            jobs.answer("a", context)  # the wedge: the same job again and again
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "pollInferJob" in errors[0].getMessage() and "scripts/serve.sh" in errors[0].getMessage()
    assert context.metrics.published == [(METRIC, 1)]  # once, then at most every REPUBLISH_S
    jobs._wedged("a", context, now=jobs.published_at + 60)
    assert context.metrics.published[-1] == (METRIC, 4)  # every return counted

"""TorchServe's describe jobs (`GET /models/<m>?customized=true`, gRPC `DescribeModel` with `customized`).

The frontend sends such a job as a request with the header `describe: True` and no body. It is answered
here with the worker's report (`describe_handle`: the memory breakdown, pool, load), at once, without
the engine, and closes.

The wedge's signature. In TorchServe 0.12.0 under continuous batching, `Model.pollInferJob` queues the
describe job again after taking it, so the same job (same request id) comes back after it was answered,
for ever, and no other request reaches the worker. `scripts/serve.sh` starts the frontend with that
corrected (gpt2ops/frontend_patch.py); a frontend started another way is not. A describe job seen again
is therefore recognised: one ERROR naming the cause and the fix, and the counter `DescribeJobRepeated`
on the metrics endpoint (republished at most every REPUBLISH_S while it lasts), on which the Kubernetes
liveness probe fails (deploy/kubernetes/base/torchserve/probe.sh), so the pod restarts instead of staying
wedged but Ready. The handler cannot cure it: the frontend queues the copy before the worker sees it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

from handler.serving.body import header

logger = logging.getLogger(__name__)

DESCRIBE_HEADER = "describe"
METRIC = "DescribeJobRepeated"
REPUBLISH_S = 10.0
REMEMBERED = 256  # describe jobs answered, by request id (they are rare: a few per operator session)


def is_describe_job(headers: Mapping[str, Any], entry: Any) -> bool:
    """The frontend's describe job: `describe: True` and no body (a prediction always has one)."""
    if header(headers, DESCRIBE_HEADER) != "True":
        return False
    return not isinstance(entry, Mapping) or not (entry.get("data") or entry.get("body"))


class DescribeJobs:
    """Answers describe jobs with the report and watches for one that comes back (the 0.12.0 wedge)."""

    def __init__(self, report: Callable[[], str]):
        self.report = report
        self.answered: OrderedDict[str, None] = OrderedDict()
        self.repeats = 0
        self.published_at = float("-inf")

    def answer(self, request_id: str, context) -> str:
        """The report for this describe job; a job answered before is the wedge: logged and published."""
        if request_id in self.answered:
            self._wedged(request_id, context)
        else:
            self.answered[request_id] = None
            while len(self.answered) > REMEMBERED:
                self.answered.popitem(last=False)
        return self.report()

    def _wedged(self, request_id: str, context, now: float | None = None) -> None:
        self.repeats += 1
        if self.repeats == 1:
            logger.error(
                "describe job %s came back after it was answered: TorchServe 0.12.0's frontend re-queues a "
                "customized describe under continuous batching (Model.pollInferJob), and this model answers no "
                "other request until TorchServe restarts. Cause: the frontend was not started by "
                "scripts/serve.sh, whose corrected Model.class (gpt2ops/frontend_patch.py) sends it once. "
                "Fix: restart TorchServe with scripts/serve.sh; read the report with GET "
                "/predictions/<model>/<version>/describe instead of GET /models/<model>?customized=true",
                request_id)
        now = time.monotonic() if now is None else now
        if now - self.published_at >= REPUBLISH_S:
            self.published_at = now
            _publish(context, self.repeats)


def _publish(context, repeats: int) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        from ts.metrics.metric_type_enum import MetricTypes

        metrics.add_metric(METRIC, repeats, "count", metric_type=MetricTypes.GAUGE, dimensions=[])
    except Exception:  # noqa: BLE001 - the signal is also in the log; never fail the answer for it
        logger.exception("publishing %s failed", METRIC)

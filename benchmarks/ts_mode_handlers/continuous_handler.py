"""A handler with no model, for measuring TorchServe's continuous batching itself (benchmarks/ts_modes.py).

Every call answers each open job with an empty chunk (`ts_stream_next: true`) until the job has had the
number of iterations its body asks for, then with its final answer. What a call costs is then the
frontend's round trip: the per-iteration overhead a continuous-batching engine pays.
"""

from ts.torch_handler.base_handler import BaseHandler


class IterationsHandler(BaseHandler):
    def initialize(self, context):
        self.left = {}  # request id -> iterations still to answer
        self.initialized = True

    def handle(self, data, context):
        out, done = [], []
        for i, entry in enumerate(data):
            rid = context.request_ids[i]
            if rid not in self.left:
                body = entry.get("body") or entry.get("data") or {}
                self.left[rid] = int(body.get("iterations", 10)) if isinstance(body, dict) else 10
            self.left[rid] -= 1
            finished = self.left[rid] <= 0
            if finished:
                del self.left[rid]
            done.append(finished)
            out.append('{"done": true}' if finished else " ")
        context.stopping_criteria = [lambda _, f=f: f for f in done]
        return out

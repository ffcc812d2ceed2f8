"""A handler with no model, for measuring TorchServe's asyncCommunication itself (benchmarks/ts_modes.py).

Each request (the async worker hands them over one by one) gets as many intermediate responses as its body
asks for, then its final answer: what each chunk costs is the per-iteration overhead of an engine that
runs on its own and streams through `send_intermediate_predict_response`.
"""

import asyncio

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler


class AsyncIterationsHandler(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    async def handle(self, data, context):
        body = data[0].get("body") or data[0].get("data") or {}
        iterations = int(body.get("iterations", 10)) if isinstance(body, dict) else 10
        for _ in range(iterations - 1):
            send_intermediate_predict_response([" "], context.request_ids, "Intermediate response", 200, context)
            await asyncio.sleep(0)
        return ['{"done": true}']

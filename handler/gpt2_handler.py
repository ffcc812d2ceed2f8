"""TorchServe handler: a Hugging Face GPT-2 in fp16 on the worker's GPU, with contrastive decoding.

An adapter, nothing more (after TorchServe's `vllm_handler.py`): it adapts
TorchServe's hooks to the engine in `handler.engine` and the serving pieces in
`handler.serving`:

- `initialize`: settings, device, model and tokenizer (`serving.loading`), the
  slot pool sized to the worker's memory, the fast decode step (compiled, CUDA
  graphs; self-checked against eager, which serves when it fails:
  `handler.engine.compiled`), a warm-up that times the slowest step, the memory
  breakdown (`handler.memory`) and its gauges;
- `preprocess`: each request routed to its API (`serving.native`, `serving.openai`),
  which reads, checks, admits and submits it, or answers it with its own error
  (`serving.loop`);
- `inference`: the engine decodes (continuous batching: one iteration);
- `postprocess`: one answer per request, in order, each with its own status;
- the routes under `/predictions/<model>/<version>/`: `describe`, and the
  OpenAI-compatible API under `v1/` (`serving.openai`);
- `describe_handle`: the memory breakdown, the decode step that serves, the pool and the engine's load.

`handle` is this handler's own: every request of a call gets its own answer.
TorchServe's base handler would answer the whole call with `describe_handle`
(or an explanation) when the *first request* carries the header
`describe: True` (or `explain: True`), which any client can send: one answer
for a batch of several is a 503 for all of them. Here a failure is one
request's (see `serving.loop`), and if a call fails as a whole each of its
requests gets its own error (`ServingLoop.fail_all`) rather than TorchServe's
message-level error, which under continuous batching fails every open job.
(The base handler's profiler hook, ENABLE_TORCH_PROFILER, is not offered.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from ts.torch_handler.base_handler import BaseHandler

from handler.engine.fast_path import enable_fast_path
from handler.engine.precision import own_matmul_precision
from handler.engine.core import Engine
from handler.memory.ledger import MemoryLedger
from handler.memory.plan import ModelShape
from handler.serving.admission import Admission
from handler.serving.describe_jobs import DescribeJobs
from handler.serving.preparation import EngineRequests
from handler.serving.loading import load_model, worker_device
from handler.serving.loop import ServingLoop
from handler.serving.metrics import ServingMetrics, TorchServeSink, publish_decode_step, publish_memory
from handler.serving.native import NativeApi
from handler.serving.openai.protocol import PREFIX as OPENAI_PREFIX
from handler.serving.openai.routes import OpenAIApi
from handler.serving.orphans import OpenJobs
from handler.serving.pool_sizing import plan_pool
from handler.serving.routes import ApiStart, Routes
from handler.serving.settings import HandlerSettings
from handler.engine.text import detokenizer

logger = logging.getLogger(__name__)

EXIT_UNHEALTHY = 70  # the worker exits after a sticky device fault; TorchServe starts a fresh one
EXIT_DELAY_S = 1.0  # time for the call's answers to reach the frontend first


def exit_after_answers(reason: str) -> None:
    """Exit the worker process once this call's answers are out (TorchServe restarts a worker that died)."""
    logger.critical("exiting with status %d so that TorchServe restarts this worker: %s", EXIT_UNHEALTHY, reason)
    threading.Timer(EXIT_DELAY_S, os._exit, args=(EXIT_UNHEALTHY,)).start()


class ContrastiveGPT2Handler(BaseHandler):
    """Serves GPT-2 text generation: contrastive search and sampling, greedy, sampling."""

    def initialize(self, context):
        self.precision = own_matmul_precision()  # after TorchServe's import, which may have turned TF32 on
        self.settings = settings = HandlerSettings.from_model_config(context.model_yaml_config)
        if settings.continuous_batching and int(context.model_yaml_config.get("maxWorkers", 1) or 1) > 1:
            logger.warning("maxWorkers %s: the supported shape is one worker per model per GPU (TorchServe "
                           "0.12.0's continuous batching can stall a busy worker while another waits for work; "
                           "docs/engine.md, Traps)", context.model_yaml_config.get("maxWorkers"))
        self.device = worker_device(context.system_properties)
        self.ledger = MemoryLedger.for_device(self.device)
        self.ledger.mark("start")
        self.ledger.touch_context()
        self.ledger.mark("context")
        self.loaded = load_model(context.system_properties.get("model_dir"), self.device,
                                 settings.torch_dtype(self.device))
        self.ledger.mark("weights")
        model = self.loaded.model
        shape = ModelShape.from_config(self.loaded.hf_model.config)
        pool = plan_pool(settings, shape, model.dtype.itemsize, self.device)
        self.engine = Engine(model, pool, detokenize=detokenizer(self.loaded.tokenizer),
                             sync_every=settings.stop_check_interval,
                             fixed_shapes=settings.pool.decode_shapes == "fixed")
        self.ledger.mark("pool")
        self.fast_path = enable_fast_path(self.engine, settings.compile)
        self.metrics_sink = TorchServeSink(context.model_name)
        self.fast_path_outcome = publish_decode_step(self.metrics_sink, self.fast_path)  # WARNING when it fell back
        self.fast_path.on_unhealthy = lambda reason: self.exit_for_restart(reason)
        self.ledger.mark("graphs", graph_pool=self.fast_path.graph_pool)
        self.admission = Admission(settings.limits, model.n_positions, pool,
                                   self.engine.pool.nbytes() // (pool.max_slots * pool.max_len),
                                   settings.request_budget_s)
        if settings.warmup:
            step_ms = self.engine.warm_up(prompt_len=settings.limits.max_prompt_tokens)
            self.admission.set_step_time(step_ms)
            logger.info("warm-up: %.2f ms per step at the full pool (%d slots, %d candidates)", step_ms,
                        pool.max_slots, pool.candidates)
        self.ledger.mark("warmup")
        self.memory_report = self.ledger.breakdown(weights_bytes=self.loaded.weights_bytes,
                                                   pool_bytes=self.engine.pool.nbytes())
        publish_memory(self.metrics_sink, self.device, self.memory_report)
        self.metrics = ServingMetrics(self.engine, self.metrics_sink)  # published by its own thread, off the loop
        engine_requests = EngineRequests(settings, self.loaded.tokenizer, model.vocab_size, self.loaded.eos_ids,
                                         self.admission)
        self.native = NativeApi(settings, engine_requests, self.engine)
        openai = OpenAIApi(context.model_name, settings, engine_requests, self.engine, model.n_positions)
        routes = Routes(describe=self.describe_handle, generate=ApiStart(self.native.start),
                        mounts={OPENAI_PREFIX: openai})
        self.loop = ServingLoop(self.engine, routes, continuous=settings.continuous_batching,
                                iteration_s=settings.iteration_ms / 1000,
                                describe_jobs=DescribeJobs(self.describe_handle),
                                open_jobs=OpenJobs(context.system_properties["model_dir"])
                                if settings.continuous_batching else None, metrics=self.metrics)
        self.metrics.start()
        self.initialized = True

    health_probe = None  # how the device is probed after a fault (None: handler.engine.fast_path.device_healthy)
    exit_for_restart = staticmethod(exit_after_answers)

    def handle(self, data, context):
        """One call of TorchServe: a list of answers as long as `data`, whatever happens (module docstring)."""
        start = time.time()
        self.context = context
        try:
            if not self.fast_path.healthy:
                raise RuntimeError("this worker's device failed and the worker is restarting; retry")
            out = self.postprocess(self.inference(self.preprocess(data)))
        except Exception as err:  # noqa: BLE001 - the last resort: each request gets its own error
            logger.exception("a call of %d requests failed as a whole", len(data))
            out = self.loop.fail_all(len(data), context, err)
        try:
            context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        except Exception:  # noqa: BLE001 - metrics must never cost a request its answer
            logger.exception("recording HandlerTime failed")
        return out

    def preprocess(self, data):
        return self.loop.receive(data, self.context)

    def inference(self, jobs):
        self.loop.run(jobs, self.context)
        self.fast_path.after_fault(self.engine, self.health_probe)  # a dropped fast step: eager, or restart
        return jobs

    def postprocess(self, jobs):
        return self.loop.respond(jobs, self.context)

    def describe_handle(self):
        """The memory breakdown, the decode step that serves, the pool, the engine's load, the limits.

        `GET /predictions/<name>/<version>/describe` (inference key) answers it in every mode, and so does
        TorchServe's `GET /models/<name>?customized=true` on a server started by scripts/serve.sh (whose
        frontend sends the describe job once: gpt2ops/frontend_patch.py; handler.serving.describe_jobs).
        """
        pool, stats = self.engine.shape, self.engine.stats()
        return json.dumps({
            "memory": self.memory_report,
            "device": str(self.device),
            "dtype": str(self.loaded.model.dtype).replace("torch.", ""),
            "precision": self.precision,
            "scheduling": "continuous" if self.settings.continuous_batching else "run to completion",
            "decode_step": {"live": self.engine.step_path, "dropped_while_serving": self.engine.step_error,
                            **self.fast_path.as_dict(), **self.fast_path_outcome},
            "pool": {"max_slots": pool.max_slots, "max_len": pool.max_len, "max_top_k": pool.max_top_k,
                     "candidate_positions": pool.candidates,
                     "decode_shapes": self.settings.pool.decode_shapes},
            "load": {"slots_in_use": stats.slots_in_use, "requests_waiting": stats.waiting,
                     "generated_tokens": stats.generated_tokens, "steps": stats.steps,
                     # what the worker still holds for requests: engine records, jobs TorchServe keeps open
                     "requests_tracked": self.engine.tracked, "jobs_open": len(self.loop.jobs)},
            "step_ms_at_full_pool": None if self.admission.step_ms is None else round(self.admission.step_ms, 2),
            "max_new_tokens_within_timeout": self.admission.max_new_tokens_in_time or self.settings.limits.max_new_tokens,
            "limits": self.settings.limits.__dict__,
            "max_batch_size": self.settings.max_batch_size,
        })

"""TorchServe handler: a Hugging Face GPT-2 in fp16 on the worker's GPU, with contrastive decoding.

Thin by design: `initialize` loads the model and measures memory, `preprocess`
turns each request into a validated row (or its 4xx), `inference` runs the
rows through `handler.engine.decoding` in sub-batches that fit in memory, streaming
where asked, and `postprocess` writes one JSON answer per request, in order.
Settings come from the archive's model-config.yaml (`handler.serving.settings`).

Bad input never becomes a 5xx and never fails its neighbours in the batch:
each request gets its own status through `context.set_response_status`
(TorchServe's `PredictionException` would fail the whole batch with one status).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time

import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from handler.serving.batch import Row, pack
from handler.engine.decoding import RowRequest, generate
from handler.serving.errors import RequestError
from handler.engine.model import load_gpt2
from handler.memory.ledger import MIB, MemoryLedger
from handler.memory.plan import ModelShape, generation_bytes
from handler.engine.params import GenerationParams
from handler.serving.request import header, read_request
from handler.serving.settings import HandlerSettings
from handler.engine.text import RowText

logger = logging.getLogger(__name__)

STREAM_CONTENT_TYPE = "application/jsonl"


class ContrastiveGPT2Handler(BaseHandler):
    """Serves GPT-2 text generation: contrastive search and sampling, greedy, sampling."""

    def initialize(self, context):
        properties = context.system_properties
        self.settings = HandlerSettings.from_model_config(context.model_yaml_config)
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        self.map_location = self.device.type
        model_dir = properties.get("model_dir")

        self.ledger = MemoryLedger.for_device(self.device)
        self.ledger.mark("start")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.zeros(1, device=self.device)  # creates the CUDA context, nothing else
        self.ledger.mark("context")

        from transformers import AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        dtype = self.settings.torch_dtype(self.device)
        self.hf_model, self.model = load_gpt2(model_dir, self.device, dtype)
        self.ledger.mark("weights")
        self.shape = ModelShape.from_config(self.hf_model.config)
        self.eos_ids = _eos_ids(GenerationConfig, model_dir, self.tokenizer, self.hf_model.config)

        self.max_new_tokens_in_time = self.settings.limits.max_new_tokens
        self.step_ms = None
        if self.settings.warmup:
            self._warm_up()
        self.ledger.mark("warmup")
        self.memory_report = self.ledger.breakdown(
            weights_bytes=sum(p.numel() * p.element_size() for p in self.hf_model.parameters()),
            decode_buffers_bytes=self._generation_bytes(*self._warmup_shape()),
        )
        self._publish_memory(context)
        self.initialized = True

    # ---- start-up ----

    def _warmup_shape(self) -> tuple[int, int, int, int]:
        """(batch, prompt, new tokens, k) of the largest generation the limits allow."""
        limits = self.settings.limits
        new = min(limits.max_new_tokens, self.model.n_positions - 1)
        prompt_len = max(1, min(limits.max_prompt_tokens, self.model.n_positions - new))
        return self.settings.max_batch_size, prompt_len, new, limits.max_top_k

    def _generation_bytes(self, batch: int, prompt_len: int, max_new: int, k: int, sampling: bool = False) -> int:
        return generation_bytes(self.shape, batch=batch, prompt_len=prompt_len, max_new=max_new, k=k,
                                dtype_bytes=self.model.dtype.itemsize, sampling=sampling)["total"]

    def _warm_up(self) -> None:
        """One generation at the largest batch, k and length: sizes the peak and times a step."""
        limits = self.settings.limits
        batch, prompt_len, new, k = self._warmup_shape()
        params = GenerationParams(max_new_tokens=new, top_k=k, penalty_alpha=0.6)
        rows = [RowRequest([1 + i % (self.model.vocab_size - 1)] * prompt_len, params, ()) for i in range(batch)]
        timed_steps = min(new, 16)
        stop_all = {i: timed_steps for i in range(len(rows))}
        start = time.perf_counter()
        generate(self.model, rows, on_sync=lambda new_tokens: stop_all, sync_every=timed_steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_ms = 1000 * (time.perf_counter() - start) / timed_steps  # prefill included: conservative
        budget_s = self.settings.timeout_fraction * self.settings.response_timeout_s
        self.max_new_tokens_in_time = max(1, min(limits.max_new_tokens, int(budget_s * 1000 / self.step_ms)))
        if self.max_new_tokens_in_time < limits.max_new_tokens:
            logger.warning("a step takes %.1f ms at batch %d: max_new_tokens is capped at %d to finish within %.0f s",
                           self.step_ms, len(rows), self.max_new_tokens_in_time, budget_s)

    def _publish_memory(self, context) -> None:
        """One log line and one `WorkerMemoryMiB` gauge per part (dimensions: Device, Part)."""
        report = self.memory_report
        if report["gpu"]:
            parts = report["parts_mib"]
            logger.info(
                "GPU memory of this worker on %s (%s): %.0f MiB = %s (driver figure: %s)",
                self.device, report["gpu_name"], report["total_mib"],
                " + ".join(f"{k} {v:.0f}" for k, v in parts.items()), report["driver_figure"],
            )
            parts = {**parts, "total": report["total_mib"]}
        else:
            logger.info("memory: %s (weights %.1f MiB)", report["note"], report["weights_mib"])
            parts = {"weights": report["weights_mib"],
                     "decode_buffers_at_max_batch": report["decode_buffers_at_max_batch_mib"]}
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        for part, value in parts.items():
            if value is not None:
                metrics.add_metric("WorkerMemoryMiB", value, "MB", metric_type=MetricTypes.GAUGE,
                                   dimensions=[Dimension("Device", str(self.device)), Dimension("Part", part)])

    def describe_handle(self):
        """`GET /models/<name>?customized=true`: the memory breakdown and the serving limits."""
        return json.dumps({
            "memory": self.memory_report,
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "step_ms_at_max_batch": None if self.step_ms is None else round(self.step_ms, 2),
            "max_new_tokens_within_timeout": self.max_new_tokens_in_time,
            "limits": self.settings.limits.__dict__,
            "max_batch_size": self.settings.max_batch_size,
        })

    # ---- requests ----

    def preprocess(self, data):
        """Each entry -> a `Row`, or the `RequestError` it gets."""
        return [self._prepare(i, entry) for i, entry in enumerate(data)]

    def _prepare(self, index: int, entry) -> Row | RequestError:
        try:
            headers = self.context.get_all_request_header(index) if self.context is not None else {}
        except (TypeError, IndexError, AttributeError):
            headers = {}
        try:
            raw = read_request(entry or {}, headers or {}, self.settings.limits.max_body_bytes)
            params = GenerationParams.from_request(raw.fields, defaults=self.settings.defaults,
                                                   limits=self.settings.limits, vocab_size=self.model.vocab_size)
            prompt_ids = self.tokenizer.encode(raw.prompt)
            self._check_lengths(len(prompt_ids), params)
        except RequestError as err:
            return err
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        eos = params.eos_token_id if params.eos_token_id is not None else self.eos_ids
        row = Row(index, raw.prompt, RowRequest(prompt_ids, params, eos, seed), RowText(self.tokenizer, params.stop))
        if self.settings.fault_injection:
            row.fault = header(headers or {}, "X-Fault-Injection") or None
        return row

    def _check_lengths(self, prompt_tokens: int, params: GenerationParams) -> None:
        limits, n_pos = self.settings.limits, self.model.n_positions
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestError("prompt", f"prompt is {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}")
        if prompt_tokens + params.max_new_tokens > n_pos:
            raise RequestError(
                "max_new_tokens",
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                f"{n_pos} positions; ask for at most {max(0, n_pos - prompt_tokens)} new tokens",
            )
        if params.max_new_tokens > self.max_new_tokens_in_time:
            raise RequestError(
                "max_new_tokens",
                f"max_new_tokens={params.max_new_tokens} cannot finish within the response timeout "
                f"({self.settings.response_timeout_s:.0f} s at about {self.step_ms:.1f} ms per step); "
                f"ask for at most {self.max_new_tokens_in_time}",
            )

    def inference(self, prepared):
        """Generate for every valid row, in sub-batches that fit the decode-buffer budget."""
        rows = [r for r in prepared if isinstance(r, Row)]
        logger.info("batch of %d requests (%d valid)", len(prepared), len(rows))
        deadline = time.monotonic() + self.settings.timeout_fraction * self.settings.response_timeout_s
        for batch in pack(rows, self._need_bytes, self._budget_bytes()):
            self._run(batch, deadline)
        return prepared

    def _budget_bytes(self) -> float:
        if self.settings.kv_budget_mib is not None:
            return self.settings.kv_budget_mib * MIB
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return float("inf")

    def _need_bytes(self, rows: list[Row]) -> int:
        params = [r.request.params for r in rows]
        return self._generation_bytes(
            len(rows), max(len(r.request.prompt_ids) for r in rows), max(p.max_new_tokens for p in params),
            max(p.num_candidates for p in params), sampling=any(p.decoding == "sample" for p in params),
        )

    def _run(self, rows: list[Row], deadline: float) -> None:
        streaming = [r for r in rows if r.request.params.stream]
        for r in streaming:
            self.context.set_response_content_type(r.index, STREAM_CONTENT_TYPE)

        def on_sync(new_tokens):
            if any(r.fault == "oom" for r in rows):
                raise torch.OutOfMemoryError("simulated out of memory (X-Fault-Injection: oom)")
            stops = {}
            for i, (row, toks) in enumerate(zip(rows, new_tokens)):
                keep = row.text.add(toks)
                if keep is not None:
                    stops[i] = keep
            self._stream(streaming)
            return stops

        try:
            results = generate(self.model, [r.request for r in rows], on_sync=on_sync,
                               sync_every=self.settings.stop_check_interval, deadline=deadline)
        except Exception as err:  # noqa: BLE001 - every request of the sub-batch gets an answer
            if not is_out_of_memory(err):
                logger.exception("generation failed for a batch of %d", len(rows))
                for row in rows:
                    row.error = RequestError("body", f"internal error during generation ({type(err).__name__}); "
                                             "see the worker log", status=500)
                return
            logger.error("out of memory for a batch of %d: %s", len(rows), err)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1:  # the batch did not fit: give each request its own chance
                for row in rows:  # a row's tokens do not depend on its batch: what was streamed stays valid
                    streamed = row.text.sent
                    row.text = RowText(self.tokenizer, row.request.params.stop)
                    row.text.sent = streamed
                    self._run([row], deadline)
                return
            rows[0].error = RequestError("body", "the worker ran out of memory for this request; retry later, or ask "
                                         "for fewer tokens or a smaller top_k", status=507)
            return
        for row, result in zip(rows, results):
            row.result = result

    def _stream(self, rows: list[Row]) -> None:
        """Send each streaming row's new text as one JSON line."""
        chunks, ids = {}, {}
        for row in rows:
            delta = row.text.increment()
            if delta:
                chunks[row.index] = json.dumps({"text": delta}, ensure_ascii=False) + "\n"
                ids[row.index] = self.context.request_ids[row.index]
        if chunks:
            send_intermediate_predict_response(chunks, ids, "Intermediate response", 200, self.context)

    def postprocess(self, prepared):
        """One JSON answer per request, in order; errors get their own status."""
        out = []
        for i, item in enumerate(prepared):
            error = item if isinstance(item, RequestError) else item.error
            if error is not None:
                self._set_status(i, error.status, error.reason)
                out.append(error.to_json())
                continue
            answer = self._answer(item)
            if item.request.params.stream:
                answer = {"text": item.text.increment(final=True), **answer}
                out.append(json.dumps(answer, ensure_ascii=False) + "\n")
            else:
                out.append(json.dumps(answer, ensure_ascii=False))
        return out

    def _answer(self, row: Row) -> dict:
        params, result = row.request.params, row.result
        tokens = row.text.tokens  # what RowText kept: cut at a stop string
        generated = row.text.text()
        answer = {
            "generated_text": generated,
            "full_text": row.prompt + generated,
            "prompt_tokens": len(row.request.prompt_ids),
            "completion_tokens": len(tokens),
            "finish_reason": result.finish_reason,
        }
        if params.samples:
            answer["seed"] = row.request.seed
        if params.return_token_ids:
            answer["token_ids"] = tokens
        return answer

    def _set_status(self, index: int, code: int, phrase: str) -> None:
        if self.context is not None and getattr(self.context, "request_processor", None):
            self.context.set_response_status(code, phrase, index)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or PyTorch's CPU allocator failing."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _eos_ids(generation_config_cls, model_dir, tokenizer, config) -> tuple[int, ...]:
    """The model's end-of-text ids: generation config first, then tokenizer, then model config."""
    candidates = None
    if os.path.exists(os.path.join(model_dir, "generation_config.json")):
        candidates = generation_config_cls.from_pretrained(model_dir, local_files_only=True).eos_token_id
    if candidates is None:
        candidates = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if candidates is None:
        logger.warning("the model names no end-of-text token: generation stops only at max_new_tokens or a stop string")
        return ()
    return tuple(candidates) if isinstance(candidates, (list, tuple)) else (int(candidates),)

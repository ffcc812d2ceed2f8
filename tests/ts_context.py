"""A TorchServe `Context` as the worker builds it, for driving the handler in-process.

`model_service_worker` gives the handler a `ts.context.Context` with the model
folder, `gpu_id`, batch size, the parsed model-config.yaml and a metrics cache;
per batch it sets `request_ids`, `request_processor` (one per request, with its
headers) and `cl_socket` (where intermediate, streamed responses are written).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


class RecordingSocket:
    """Stands in for the worker's socket to the frontend: keeps what streaming sends."""

    def __init__(self):
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def chunks(self) -> list[dict]:
        """The JSON lines of every intermediate message, in order."""
        text = b"".join(self.sent).decode("utf-8", errors="replace")
        return [json.loads(m) for m in re.findall(r'(\{"text": .*?\})\n', text)]


def make_context(model_dir: Path, model_yaml_config: dict, gpu: int | None = None) -> Context:
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": "tiny-gpt2", "handler": "gpt2_handler.py"}}
    return Context("tiny-gpt2", str(model_dir), manifest, model_yaml_config.get("batchSize", 1), gpu,
                   ts.__version__, metrics=metrics, model_yaml_config=model_yaml_config)


def start_batch(context: Context, headers: list[dict]) -> RecordingSocket:
    """Prepare `context` for one batch of len(headers) requests, as the worker does."""
    context.request_ids = {i: f"request-{i}" for i in range(len(headers))}
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.metrics.request_ids = context.request_ids
    context.cl_socket = RecordingSocket()
    return context.cl_socket


def statuses(context: Context) -> list[int]:
    return [context.get_response_status(i)[0] for i in range(len(context.request_processor))]

"""A TorchServe `Context` as the worker builds it, for starting the handler in-process (the GPU report's
workers, the tests).

`model_service_worker` gives the handler a `ts.context.Context` with the model
folder, `gpu_id`, batch size, the parsed model-config.yaml and a metrics cache.
Needs TorchServe's Python package `ts`.
"""

from __future__ import annotations

from pathlib import Path

import ts
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


def make_context(model_dir: Path, model_yaml_config: dict, gpu: int | None = None,
                 model_name: str = "tiny-gpt2") -> Context:
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    manifest = {"model": {"modelName": model_name, "handler": "gpt2_handler.py"}}
    return Context(model_name, str(model_dir), manifest, model_yaml_config.get("batchSize", 1), gpu,
                   ts.__version__, metrics=metrics, model_yaml_config=model_yaml_config)

"""The serving image, run as users and the pod run it (issue 24's faults, each checked on the real container).

One container with the image's own command (token auth on, the archive built in) serves the first checks and
is stopped with streams in flight at the end; a second one serves an archive whose model-config.yaml says
`compile: on` unquoted, as the docs write it; a third has a compile cache it cannot write to.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field

import openai
import pytest
import requests
import yaml

from gpt2ops.client import parse_metric
from tests.drain_streams import long_stream, lost, start_streams, summary
from tests.image.harness import FIGURES, MODEL, REPO, Container, wait_for

pytestmark = pytest.mark.image

START_TIMEOUT_S = 240
HEALTH_INTERVAL_S = 5  # the Dockerfile's HEALTHCHECK --interval
STOP_TIMEOUT_S = 10  # docker stop's default grace period
STREAMS = 12
COMPILED_START_TIMEOUT_S = 900  # compiling on 2 busy cores: 38 s to several minutes


def predict(container: Container, key: str | None, payload: dict, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{container.inference}/predictions/{MODEL}", json=payload, headers=headers,
                         timeout=kw.pop("timeout", 60), **kw)


@dataclass
class Timeline:
    first_answer_s: float  # after `docker run`
    healthy_s: float
    health_before_answer: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def served(run_container):
    """The image's own command, run as the pod runs it; the start watched: first answer and `healthy`."""
    container = run_container()
    first_answer = healthy = None
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    key = None
    while (first_answer is None or healthy is None) and time.monotonic() < deadline:
        assert container.running(), f"the container exited:\n{container.logs()[-4000:]}"
        status = container.health()
        now = time.monotonic() - container.started_at
        if healthy is None and status == "healthy":
            healthy = now
        if first_answer is None:
            seen.append(status)
            key = key or container.key()
            if key:
                try:
                    r = predict(container, key, {"prompt": "你是谁?", "max_new_tokens": 4}, timeout=10)
                    if r.status_code == 200:
                        first_answer = time.monotonic() - container.started_at
                except requests.RequestException:
                    pass
        time.sleep(0.2)
    assert first_answer is not None, f"no answer within {START_TIMEOUT_S} s:\n{container.logs()[-4000:]}"
    assert healthy is not None, f"never healthy within {START_TIMEOUT_S} s (answered at {first_answer:.1f} s)"
    FIGURES["cold start to first answer"] = f"{first_answer:.1f} s (docker run -> 200); healthy at {healthy:.1f} s"
    container.timeline = Timeline(first_answer, healthy, seen)
    container.inference_key = key
    return container


# ---- healthy means ready (fault 1) ----


def test_healthy_only_once_a_prediction_answers_and_within_seconds_of_it(served):
    t = served.timeline
    # polling granularity: an answer is seen at most ~1 s after the worker could give it
    assert t.healthy_s >= t.first_answer_s - 1.0, \
        f"healthy at {t.healthy_s:.1f} s, before the model answered ({t.first_answer_s:.1f} s)"
    assert "healthy" not in t.health_before_answer[:-2], t.health_before_answer
    assert t.healthy_s - t.first_answer_s <= HEALTH_INTERVAL_S + 3, \
        f"healthy only {t.healthy_s - t.first_answer_s:.1f} s after the first answer"


# ---- what users run ----


def test_the_readme_curl_answers(served, curl):
    cmd = [curl, "-sS", "-X", "POST", f"{served.inference}/predictions/{MODEL}",
           "-H", f"Authorization: Bearer {served.inference_key}", "-H", "Content-Type: application/json",
           "--data", '{"prompt": "你是谁?"}', "-w", "\n%{http_code}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200", out.stdout + out.stderr
    answer = json.loads(body)
    assert answer["full_text"].startswith("你是谁?") and answer["completion_tokens"] > 0, answer


@pytest.fixture(scope="module")
def oa(served):
    return openai.OpenAI(base_url=f"{served.inference}/predictions/{MODEL}/1.0/v1", api_key=served.inference_key,
                         max_retries=0, timeout=60)


def test_openai_client_plain(oa):
    done = oa.completions.create(model=MODEL, prompt="你是谁?", max_tokens=8)
    assert done.choices[0].text and done.usage.completion_tokens > 0, done


def test_openai_client_streamed(oa):
    chunks = list(oa.completions.create(model=MODEL, prompt="你是谁?", max_tokens=8, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks if c.choices), chunks
    assert any(c.choices and c.choices[0].finish_reason for c in chunks), chunks


@pytest.mark.parametrize("key", [None, "not-the-key"])
def test_a_request_without_the_key_is_refused(served, key):
    r = predict(served, key, {"prompt": "你是谁?", "max_new_tokens": 4})
    assert r.status_code in (400, 401), (r.status_code, r.text)
    assert "generated_text" not in r.text


# ---- what the image is (faults 6, 7) ----


def test_shipped_torch_is_the_tested_torch(served):
    out = served.engine.docker("exec", served.name, "python", "-c",
                               "import torch; print(torch.__version__.split('+')[0], torch.version.cuda)")
    version, cuda = out.stdout.split()
    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert version == pinned, f"the image ships torch {version}, the tests run {pinned}"
    labels = json.loads(served.engine.docker("image", "inspect", "--format", "{{json .Config.Labels}}",
                                             served.inspect("{{.Config.Image}}")).stdout)
    assert labels.get("org.pytorch.version") == pinned, labels
    assert labels.get("com.nvidia.cuda.version") == cuda, (labels, cuda)
    assert "R580" in labels.get("com.nvidia.driver.min", ""), labels
    FIGURES["torch in the image"] = f"{version} for CUDA {cuda} (driver floor: {labels['com.nvidia.driver.min']})"


def test_no_hsperfdata_left_in_the_image(served):
    out = served.engine.docker("run", "--rm", "--network=host", "--entrypoint", "/bin/ls",
                               served.inspect("{{.Config.Image}}"), "-A", "/tmp")
    assert out.stdout.strip() == "", f"/tmp of the image holds: {out.stdout.split()}"


def test_logs_are_info_without_debug_or_metrics_lines(served):
    for _ in range(5):
        predict(served, served.inference_key, {"prompt": "你是谁?", "max_new_tokens": 8}).raise_for_status()
    logs = served.logs()
    assert "[INFO" in logs, logs[-2000:]
    assert "[DEBUG" not in logs, [ln for ln in logs.splitlines() if "[DEBUG" in ln][:5]
    metric_lines = [ln for ln in logs.splitlines() if "[METRICS]" in ln or "Backend response time" in ln]
    assert not metric_lines, metric_lines[:5]
    rolled = served.engine.docker("exec", served.name, "sh", "-c", "ls /home/ts/app/run/logs").stdout.split()
    assert {"ts_log.log", "model_log.log", "model_metrics.log"} <= set(rolled), rolled


def test_grpc_ports_come_from_the_config(served):
    """Two servers on one network (--network=host) only start when the gRPC ports are the config's too."""
    listening = served.engine.docker("exec", served.name, "sh", "-c", "cat /proc/net/tcp /proc/net/tcp6").stdout
    ports = {int(m, 16) for m in re.findall(r"^\s*\d+: [0-9A-F]+:([0-9A-F]{4}) [0-9A-F]+:0000 0A", listening, re.M)}
    for key in ("grpc_inference_port", "grpc_management_port"):
        assert served.ports[key] in ports, f"{key} {served.ports[key]} is not listening: {sorted(ports)}"


# ---- docker stop with streams in flight (fault 5): runs last on this container ----


def test_docker_stop_with_streams_in_flight_loses_nothing(served):
    report = requests.get(f"{served.inference}/predictions/{MODEL}/1.0/describe",
                          headers={"Authorization": f"Bearer {served.inference_key}"}, timeout=30).json()
    outcomes, events, threads = start_streams(f"{served.inference}/predictions/{MODEL}", served.inference_key,
                                              STREAMS, long_stream(report))
    assert events[0].wait(30), "no stream started"
    time.sleep(0.3)
    start = time.monotonic()
    served.engine.docker("stop", "-t", str(STOP_TIMEOUT_S), served.name, timeout=STOP_TIMEOUT_S + 30)
    stop_s = time.monotonic() - start
    for thread in threads:
        thread.join(30)
    exit_code = served.inspect("{{.State.ExitCode}}")
    got = summary(outcomes)
    drained = [ln for ln in served.logs().splitlines() if ln.startswith(("drained", "drain:"))]
    FIGURES["docker stop with 12 streams"] = (f"{stop_s:.1f} s (grace {STOP_TIMEOUT_S} s; exit {exit_code}; "
                                              f"{'; '.join(drained)}); {got}")
    assert not lost(outcomes), f"streams lost: {lost(outcomes)}"
    assert got.get("finished", 0) + got.get("ended with an error chunk", 0) >= 8, got
    assert exit_code != "137", f"killed at the end of the grace period ({stop_s:.1f} s): the drain overran it"
    assert stop_s < STOP_TIMEOUT_S, f"stop took {stop_s:.1f} s"


# ---- the compiled step under the read-only root, set as the docs write it (faults 2, 3, 4) ----


def _archive_with(tmp_path, line: str) -> tuple[str, str]:
    """A model store holding the tiny model archived with `line` in place of model-config.yaml's compile line."""
    text = (REPO / "model-config.yaml").read_text()
    shipped = next(ln for ln in text.splitlines() if ln.strip().startswith("compile:"))
    config = tmp_path / "model-config.yaml"
    # one slot: one compiled shape (handler.engine.compiled.fast_shapes), not three, and no warm-up, on the test's
    # 2 cores; the start may take minutes on a busy machine (startupTimeout)
    assert "# max_slots: 8" in text and "warmup: true" in text and "startupTimeout: 300" in text
    config.write_text(text.replace(shipped, "  " + line).replace("# max_slots: 8", "max_slots: 1 ")
                      .replace("warmup: true", "warmup: false").replace("startupTimeout: 300", "startupTimeout: 900"))
    assert yaml.safe_load(config.read_text())["handler"]["pool"]["max_slots"] == 1
    assert yaml.safe_load(config.read_text())["handler"]["compile"] is True, "the docs' form is a YAML boolean"
    store = tmp_path / "store"
    name = f"{MODEL}-compiled"
    subprocess.run([str(REPO / "scripts" / "archive.sh"), str(REPO / "artifacts/models/tiny-gpt2"), name, str(store)],
                   env={**__import__("os").environ, "MODEL_CONFIG": str(config)}, check=True, capture_output=True)
    store.chmod(0o755)
    (store / f"{name}.mar").chmod(0o644)
    return str(store), name


def _report_when_ready(container: Container, model: str) -> dict:
    def ready():
        assert container.running(), f"the container exited:\n{container.logs()[-4000:]}"
        key = container.key()
        if not key:
            return None
        try:
            r = requests.get(f"{container.inference}/predictions/{model}/1.0/describe",
                             headers={"Authorization": f"Bearer {key}"}, timeout=10)
        except requests.RequestException:
            return None
        return (r.json(), key) if r.status_code == 200 else None
    return wait_for(ready, COMPILED_START_TIMEOUT_S, every=2.0, what=f"{model}'s report")


def test_compiled_step_forced_on_works_under_the_read_only_root(run_container, tmp_path):
    store, name = _archive_with(tmp_path, "compile: on   # unquoted, as the README writes it")
    container = run_container(env={"MODEL_STORE": "/home/ts/models", "MODEL_NAME": name},
                              volumes=(f"{store}:/home/ts/models:ro",), pod_start=name)
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    (report, key), started = _report_when_ready(container, name), container.started_at
    FIGURES["compiled container: first report"] = f"{time.monotonic() - started:.1f} s after docker run"
    step = report["decode_step"]
    assert (step["setting"], step["path"], step["fell_back"]) == ("on", "compiled", False), step
    r = requests.post(f"{container.inference}/predictions/{name}", json={"prompt": "你是谁?", "max_new_tokens": 8},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200 and r.json()["completion_tokens"] > 0, r.text
    metrics = requests.get(f"{container.metrics}/metrics", timeout=30).text
    samples = [labels for labels, _ in parse_metric(metrics, "gpt2_decode_step_info")]
    assert any(s.get("path") == "compiled" and s.get("fell_back") == "false" for s in samples), samples


def test_a_compile_cache_it_cannot_write_falls_back_loudly(run_container, tmp_path):
    store, name = _archive_with(tmp_path, "compile: on")
    readonly_cache = tmp_path / "cache"  # the image's folders, read-only: the pod's root without the volume
    for sub in ("inductor", "triton"):
        (readonly_cache / sub).mkdir(mode=0o755, parents=True)
    readonly_cache.chmod(0o755)
    container = run_container(env={"MODEL_STORE": "/home/ts/models", "MODEL_NAME": name},
                              volumes=(f"{store}:/home/ts/models:ro",), compile_cache=str(readonly_cache),
                              pod_start=name)
    report, _ = _report_when_ready(container, name)
    step = report["decode_step"]
    assert (step["path"], step["fell_back"]) == ("eager", True), step
    assert "Read-only file system" in step["reason"] or "Permission denied" in step["reason"], step["reason"]
    warnings = [ln for ln in container.logs().splitlines() if "serving EAGER although compile: on" in ln]
    assert warnings, "no WARNING line about the fallback in docker logs"
    metrics = requests.get(f"{container.metrics}/metrics", timeout=30).text
    samples = [labels for labels, _ in parse_metric(metrics, "gpt2_decode_step_info")]
    assert any(s.get("path") == "eager" and s.get("fell_back") == "true" for s in samples), samples

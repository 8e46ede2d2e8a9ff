"""deploy/kubernetes/base: `kubectl kustomize` renders it, every object validates against Kubernetes 1.33's schemas
in strict mode (an unknown field is an error), and the objects agree with each other, with `mili serve` and with the
router: what a schema cannot see (selectors that select the right pods, ports that exist, probes on the right
paths, a grace period that outlasts MILI's drain, flags the router really has).

Needs kubectl (kustomize is built in), kubernetes-validate and sglang-router (both in the test extras). Without one
the tests that need it skip, naming the install; with the environment variable CI set they fail instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES_DIR / "base"
ADAPTER_RULES = KUBERNETES_DIR / "prometheus-adapter-rules.yaml"
KUBERNETES_VERSION = "1.33.0"
MIN_STARTUP_ALLOWANCE_S = 300  # a cold start compiles the model graph: minutes on CPU
HPA_METRIC = "mili_requests_waiting"
# MILI_* variables that are not `mili serve` flags, and who reads them.
MILI_VARIABLES_NOT_FLAGS = {"MILI_CACHE_DIR": "mili/checkpoints.py (the cache folder)"}

Obj = dict[str, Any]


# --- the tools ---------------------------------------------------------------------------------------------------

def unavailable(what: str) -> NoReturn:
    """Skip on a developer's machine without the tool; fail under CI, where a skipped check would be a silent hole."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (the environment variable CI is set: failing instead of skipping)")
    pytest.skip(what)


def require_module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"Python module {name} is missing: {install}")


def kustomize(directory: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        unavailable("kubectl is not on PATH (it ships on our machines; see https://kubernetes.io/docs/tasks/tools/)")
    yaml = require_module("yaml", "pip install kubernetes-validate (it brings PyYAML)")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return kustomize(BASE)


@pytest.fixture(scope="module")
def index(objects: list[Obj]) -> dict[tuple[str, str], Obj]:
    """(kind, name) -> object; the generated ConfigMap under its base name (mili-config-<hash> -> mili-config)."""
    found: dict[tuple[str, str], Obj] = {}
    for obj in objects:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        assert (obj["kind"], name) not in found, f"two objects {obj['kind']}/{name}"
        found[obj["kind"], name] = obj
    return found


# --- reading the objects -----------------------------------------------------------------------------------------

def pod_spec(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def only_container(deployment: Obj) -> Obj:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: expected one container"
    return containers[0]


def port_numbers(container: Obj) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector (non-empty: an empty one selects everything) matches these labels."""
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def flag_values(args: list[str], flag: str) -> list[str]:
    """The values after `flag` up to the next --option, as argparse's nargs='+' takes them."""
    start = args.index(flag) + 1
    values = []
    for arg in args[start:]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def effective_env(container: Obj, config_map: Obj) -> dict[str, str]:
    """The container's variables with literal values: the ConfigMap (envFrom), then `env`, which wins."""
    env = dict(config_map["data"])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


def quantity_bytes(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert match, f"unexpected memory quantity {text!r}"
    units = {None: 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12}
    return float(match.group(1)) * units[match.group(2)]


def router_args(index: dict[tuple[str, str], Obj]) -> Any:
    """The router container's arguments as sglang-router itself parses them (an unknown flag fails here)."""
    launch_router = require_module("sglang_router.launch_router", "pip install 'sglang-router==0.3.2' (test extras)")
    container = only_container(index["Deployment", "mili-router"])
    try:
        return launch_router.parse_router_args(container["args"])
    except SystemExit:
        pytest.fail(f"sglang-router rejects the router's args {container['args']} (see its error above)")


# --- kustomize and the schemas -----------------------------------------------------------------------------------

def test_renders_every_manifest_once(index: dict[tuple[str, str], Obj]) -> None:
    assert set(index) == {
        ("Deployment", "mili"), ("Service", "mili"), ("ConfigMap", "mili-config"),
        ("PersistentVolumeClaim", "mili-models"), ("PersistentVolumeClaim", "mili-cache"),
        ("PodDisruptionBudget", "mili"), ("HorizontalPodAutoscaler", "mili"),
        ("ServiceMonitor", "mili"), ("ServiceMonitor", "mili-router"),
        ("Deployment", "mili-router"), ("Service", "mili-router"),
        ("ServiceAccount", "mili-router"), ("Role", "mili-router"), ("RoleBinding", "mili-router")}
    for obj in index.values():  # namespace-agnostic: `-n` or an overlay places them
        assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']} names a namespace"
    yaml = require_module("yaml", "pip install kubernetes-validate (it brings PyYAML)")
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest in base/ is a resource of kustomization.yaml, and only those"


def servicemonitor_problems(obj: Obj) -> list[str]:
    """kubernetes-validate has no schema for the Prometheus Operator's CRD: the fields this base uses, strictly."""
    problems: list[str] = []

    def only(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        if set(value) - allowed:
            problems.append(f"{where}: unexpected fields {sorted(set(value) - allowed)}")
        return value

    top = only("(top)", obj, {"apiVersion", "kind", "metadata", "spec"})
    if (top.get("apiVersion"), top.get("kind")) != ("monitoring.coreos.com/v1", "ServiceMonitor"):
        problems.append(f"apiVersion/kind: {top.get('apiVersion')} {top.get('kind')}")
    metadata = only("metadata", top.get("metadata"), {"name", "labels", "annotations", "namespace"})
    if not isinstance(metadata.get("name"), str):
        problems.append("metadata.name: missing")
    spec = only("spec", top.get("spec"), {"selector", "endpoints"})
    selector = only("spec.selector", spec.get("selector"), {"matchLabels"})
    labels = selector.get("matchLabels")
    if not labels or not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        problems.append(f"spec.selector.matchLabels: expected a non-empty map of strings, got {labels!r}")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append(f"spec.endpoints: expected a non-empty list, got {endpoints!r}")
        endpoints = []
    for i, raw in enumerate(endpoints):
        endpoint = only(f"spec.endpoints[{i}]", raw, {"port", "path", "interval"})
        if not isinstance(endpoint.get("port"), str) or not endpoint.get("port"):
            problems.append(f"spec.endpoints[{i}].port: expected a port name, got {endpoint.get('port')!r}")
        if not str(endpoint.get("path", "")).startswith("/"):
            problems.append(f"spec.endpoints[{i}].path: expected an absolute path, got {endpoint.get('path')!r}")
        if not re.fullmatch(r"([0-9]+(ms|s|m|h))+", str(endpoint.get("interval", ""))):
            problems.append(f"spec.endpoints[{i}].interval: expected a duration such as 15s, got "
                            f"{endpoint.get('interval')!r}")
    return problems


# Objects kubernetes-validate has no schema for, and the check that stands in for it. Any other unknown kind fails.
OWN_SCHEMAS: dict[tuple[str, str], Callable[[Obj], list[str]]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): servicemonitor_problems,
}


def test_every_object_validates_strictly(objects: list[Obj]) -> None:
    validate = require_module("kubernetes_validate", "pip install kubernetes-validate (test extras)")
    problems: list[str] = []
    checked_here: list[str] = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            version = validate.validate(obj, KUBERNETES_VERSION, strict=True)
            assert version == "1.33", f"{name}: validated against {version}"
        except validate.SchemaNotFoundError:
            own = OWN_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
            if own is None:
                problems.append(f"{name}: no schema for {obj['apiVersion']} {obj['kind']} in kubernetes-validate, "
                                f"and none in this test's OWN_SCHEMAS")
                continue
            problems += [f"{name}: {problem}" for problem in own(obj)]
            checked_here.append(name)
        except validate.ValidationError as error:
            problems.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not problems, "\n".join(problems)
    assert sorted(checked_here) == ["ServiceMonitor/mili", "ServiceMonitor/mili-router"]


def test_the_validation_is_strict() -> None:
    """The checks above mean something: a misspelt field fails, and so does a broken ServiceMonitor."""
    validate = require_module("kubernetes_validate", "pip install kubernetes-validate (test extras)")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"ports": [{"port": 80, "targetport": "http"}]}}
    with pytest.raises(validate.ValidationError, match="targetport"):
        validate.validate(service, KUBERNETES_VERSION, strict=True)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
               "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": [{"port": "http", "intervall": "15s"}]}}
    assert any("intervall" in problem for problem in servicemonitor_problems(monitor))


def test_an_overlay_places_everything_in_its_namespace(tmp_path: Path) -> None:
    relative = os.path.relpath(BASE, tmp_path)  # kustomize takes no absolute paths to other kustomizations
    (tmp_path / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: llm-test\n"
        f"resources:\n  - {relative}\n")
    for obj in kustomize(tmp_path):
        assert obj["metadata"]["namespace"] == "llm-test", f"{obj['kind']}/{obj['metadata']['name']}"
        for subject in obj.get("subjects", []):
            assert subject.get("namespace") == "llm-test"


# --- the objects agree with each other ---------------------------------------------------------------------------

def test_selectors_pick_milis_pods_and_never_the_routers(index: dict[tuple[str, str], Obj]) -> None:
    mili, router = index["Deployment", "mili"], index["Deployment", "mili-router"]
    anti_affinity = pod_spec(mili)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    mili_selectors = {
        "Deployment mili": mili["spec"]["selector"]["matchLabels"],
        "Service mili": index["Service", "mili"]["spec"]["selector"],
        "PodDisruptionBudget mili": index["PodDisruptionBudget", "mili"]["spec"]["selector"]["matchLabels"],
        "anti-affinity of mili": anti_affinity[0]["podAffinityTerm"]["labelSelector"]["matchLabels"],
        "the router's --selector": router_args(index).selector,
    }
    for name, selector in mili_selectors.items():
        assert selects(selector, pod_labels(mili)), f"{name} {selector} misses MILI's pods {pod_labels(mili)}"
        assert not selects(selector, pod_labels(router)), f"{name} {selector} selects the router's pods too"
    router_selectors = {
        "Deployment mili-router": router["spec"]["selector"]["matchLabels"],
        "Service mili-router": index["Service", "mili-router"]["spec"]["selector"],
    }
    for name, selector in router_selectors.items():
        assert selects(selector, pod_labels(router)), f"{name} {selector} misses the router's pods"
        assert not selects(selector, pod_labels(mili)), f"{name} {selector} selects MILI's pods too"
    for deployment in (mili, router):  # common labels stay out of (immutable) selectors
        assert "app.kubernetes.io/part-of" not in deployment["spec"]["selector"]["matchLabels"]


def test_services_and_monitors_name_ports_that_exist(index: dict[tuple[str, str], Obj]) -> None:
    deployments = [obj for (kind, _), obj in index.items() if kind == "Deployment"]
    services = [obj for (kind, _), obj in index.items() if kind == "Service"]
    for service in services:
        backends = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(backends) == 1, f"Service {service['metadata']['name']} selects {len(backends)} Deployments"
        names = port_numbers(only_container(backends[0]))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {service['metadata']['name']}: no container port " \
                                                f"{port['targetPort']!r} (has {sorted(names)})"
    for (kind, name), monitor in index.items():
        if kind != "ServiceMonitor":
            continue
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"],
                                                  s["metadata"].get("labels", {}))]
        assert len(matched) == 1, f"ServiceMonitor {name} selects {len(matched)} Services"
        port_names = {port["name"] for port in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names, f"ServiceMonitor {name}: Service has no port {endpoint['port']!r}"
            assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"


def test_the_router_discovers_mili_on_its_port_in_its_namespace(index: dict[tuple[str, str], Obj]) -> None:
    args = router_args(index)
    router = only_container(index["Deployment", "mili-router"])
    mili = only_container(index["Deployment", "mili"])
    assert router["command"] == ["python3", "-m", "sglang_router.launch_router"]  # whose main() is parse_router_args
    assert args.policy == "cache_aware" and args.service_discovery
    # sglang-router drops a --selector item without '=' silently, which would widen the selection
    assert all("=" in item for item in flag_values(router["args"], "--selector"))
    assert args.service_discovery_port == port_numbers(mili)["http"]
    assert args.service_discovery_namespace == "$(POD_NAMESPACE)"
    namespace_var = next(var for var in router["env"] if var["name"] == "POD_NAMESPACE")
    assert namespace_var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert args.health_check_endpoint == "/health"
    ports = port_numbers(router)
    assert (args.host, args.port) == ("0.0.0.0", ports["http"])
    assert (args.prometheus_host, args.prometheus_port) == ("0.0.0.0", ports["metrics"])


def test_probes_use_the_paths_each_server_answers(index: dict[tuple[str, str], Obj]) -> None:
    mili = only_container(index["Deployment", "mili"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mili[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = mili["startupProbe"]
    allowance = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert allowance >= MIN_STARTUP_ALLOWANCE_S, f"the startupProbe allows {allowance} s for a cold compile"
    router = only_container(index["Deployment", "mili-router"])
    # the router's /health answers for the router process; /readiness waits for a healthy MILI replica
    assert router["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "http"}
    assert router["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}


def test_termination_grace_outlasts_the_drains(index: dict[tuple[str, str], Obj]) -> None:
    from mili.server.serve import SHUTDOWN_FLUSH_S  # after the drain, MILI waits up to this + 5 s for HTTP to stop

    mili = index["Deployment", "mili"]
    container = only_container(mili)
    grace = float(index["ConfigMap", "mili-config"]["data"]["MILI_SHUTDOWN_GRACE"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + grace + SHUTDOWN_FLUSH_S + 5
    assert pod_spec(mili)["terminationGracePeriodSeconds"] > needed, f"SIGKILL before MILI's drain ends ({needed} s)"
    router = index["Deployment", "mili-router"]
    pre_stop = only_container(router)["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + router_args(index).shutdown_grace_period_secs
    assert pod_spec(router)["terminationGracePeriodSeconds"] > needed


def test_the_hpa_scales_mili_on_a_metric_mili_exports(index: dict[tuple[str, str], Obj]) -> None:
    hpa = index["HorizontalPodAutoscaler", "mili"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert ("Deployment", target["name"]) in index
    # an HPA owns the count: a `replicas` in the manifest would be re-applied by every `kubectl apply`
    assert "replicas" not in index["Deployment", target["name"]]["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert index["PodDisruptionBudget", "mili"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == HPA_METRIC
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300

    from prometheus_client import generate_latest

    from mili.server.metrics import ServerMetrics

    engine = SimpleNamespace(num_running=1, num_waiting=3, pool=SimpleNamespace(num_used=1, num_blocks=4),
                             scheduler=SimpleNamespace(num_preemptions=0), proposer=None)
    metrics = ServerMetrics()
    metrics.watch(engine)  # type: ignore[arg-type]
    assert f"\n{HPA_METRIC} 3.0\n" in generate_latest(metrics.registry).decode()


def test_the_adapter_rule_serves_the_hpas_metric_per_pod() -> None:
    yaml = require_module("yaml", "pip install kubernetes-validate (it brings PyYAML)")
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == HPA_METRIC]
    assert rule["seriesQuery"].startswith(HPA_METRIC + "{")
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_mounts_volumes_and_writable_paths(index: dict[tuple[str, str], Obj]) -> None:
    for name in ("mili", "mili-router"):
        spec = pod_spec(index["Deployment", name])
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        container = only_container(index["Deployment", name])
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        for mount in mounts.values():
            assert mount["name"] in volumes, f"{name}: mount of a volume {mount['name']!r} that does not exist"
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                assert ("PersistentVolumeClaim", claim) in index, f"{name}: no PVC {claim}"
                # several replicas on several nodes mount it at once
                assert set(index["PersistentVolumeClaim", claim]["spec"]["accessModes"]) <= {
                    "ReadWriteMany", "ReadOnlyMany"}, f"PVC {claim} cannot be shared by replicas on other nodes"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")

    container = only_container(index["Deployment", "mili"])
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    env = effective_env(container, index["ConfigMap", "mili-config"])
    for var in ("MODULAR_CACHE_DIR", "HF_HOME", "MILI_CACHE_DIR", "HOME"):
        assert any(env[var] == path or env[var].startswith(path + "/") for path in writable), \
            f"{var}={env[var]} is on the read-only root filesystem"
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in container["volumeMounts"]


def test_milis_environment_is_flags_mili_serve_accepts(index: dict[tuple[str, str], Obj],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mili.cli import build_parser
    from mili.cli_environment import variable_name
    from mili.memory_size import parse_memory_size

    deployment = index["Deployment", "mili"]
    container = only_container(deployment)
    config_map = index["ConfigMap", "mili-config"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    env = effective_env(container, config_map)
    assert env["MILI_HOST"] == "0.0.0.0" and int(env["MILI_PORT"]) == port_numbers(container)["http"]

    [secret_var] = [var for var in container["env"] if "valueFrom" in var and "secretKeyRef" in var["valueFrom"]]
    assert secret_var["name"] == "MILI_API_KEY" and secret_var["valueFrom"]["secretKeyRef"]["optional"] is True
    assert not any(kind == "Secret" for kind, _ in index), "the base ships no Secret"

    serve = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    flags = {variable_name(option) for action in serve.choices["serve"]._actions for option in action.option_strings
             if option.startswith("--")}
    for var in [name for name in env if name.startswith("MILI_")] + [secret_var["name"]]:
        assert var in flags or var in MILI_VARIABLES_NOT_FLAGS, f"{var} is no `mili serve` flag (a typo?)"
    for var in list(os.environ):
        if var.startswith("MILI_"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    try:
        args = build_parser().parse_args(["serve"])  # each MILI_* value goes through the flag's own type and choices
    except SystemExit:
        pytest.fail("`mili serve` rejects a value in mili-config.env (see its error above)")
    assert args.port == port_numbers(container)["http"] and args.model == env["MILI_MODEL"]

    kv_cache = parse_memory_size(env["MILI_KV_CACHE_MEMORY"])
    memory = container["resources"]
    assert quantity_bytes(memory["requests"]["memory"]) <= quantity_bytes(memory["limits"]["memory"])
    if kv_cache > 1:  # bytes, not a fraction of free memory
        assert kv_cache < quantity_bytes(memory["limits"]["memory"]) / 2, "the KV cache leaves no room for weights"


def test_pods_run_unprivileged(index: dict[tuple[str, str], Obj]) -> None:
    for name in ("mili", "mili-router"):
        spec = pod_spec(index["Deployment", name])
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] == pod["runAsUser"], name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert "cpu" not in container["resources"].get("limits", {}), f"{name}: a CPU limit throttles"
    assert pod_spec(index["Deployment", "mili"])["automountServiceAccountToken"] is False


def dockerfile(name: str) -> tuple[int, list[str]]:
    """(uid of the final USER, ENTRYPOINT) of deploy/docker/<name>."""
    path = DOCKER_DIR / name
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not in this checkout")
    text = path.read_text().replace("\\\n", " ")
    uid = int(re.findall(r"^USER\s+(\d+)", text, re.MULTILINE)[-1])
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)[-1])
    return uid, entrypoint


def test_pods_run_their_images_as_built(index: dict[tuple[str, str], Obj]) -> None:
    uid, entrypoint = dockerfile("Dockerfile")
    mili = index["Deployment", "mili"]
    assert pod_spec(mili)["securityContext"]["runAsUser"] == uid, "MILI's image user owns /cache"
    assert pod_spec(mili)["securityContext"]["fsGroup"] == uid
    container = only_container(mili)
    assert entrypoint == ["mili", "serve"] and "command" not in container and "args" not in container
    uid, entrypoint = dockerfile("router.Dockerfile")
    router = index["Deployment", "mili-router"]
    assert pod_spec(router)["securityContext"]["runAsUser"] == uid
    assert only_container(router)["command"] == entrypoint[:3], "the image's program, its flags all in args"


def test_the_routers_account_may_watch_pods(index: dict[tuple[str, str], Obj]) -> None:
    account = pod_spec(index["Deployment", "mili-router"])["serviceAccountName"]
    assert ("ServiceAccount", account) in index
    roles = []
    for (kind, _), binding in index.items():
        if kind == "RoleBinding" and {"kind": "ServiceAccount", "name": account} in binding["subjects"]:
            assert binding["roleRef"]["kind"] == "Role"
            roles.append(index["Role", binding["roleRef"]["name"]])
    assert roles, f"no RoleBinding binds ServiceAccount {account}"
    assert any("" in rule["apiGroups"] and "pods" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
               for role in roles for rule in role["rules"]), "the router may not list and watch pods"


def test_images_match_the_versions_tested_here(index: dict[tuple[str, str], Obj]) -> None:
    assert only_container(index["Deployment", "mili"])["image"] == f"mili:{importlib.metadata.version('mili')}"
    try:
        router_version = importlib.metadata.version("sglang-router")
    except importlib.metadata.PackageNotFoundError:
        unavailable("sglang-router is not installed: pip install 'sglang-router==0.3.2' (test extras)")
    assert only_container(index["Deployment", "mili-router"])["image"] == f"mili-router:{router_version}"

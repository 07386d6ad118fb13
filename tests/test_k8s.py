"""deploy/k8s without a cluster: every manifest validates, strictly (unknown fields rejected), against the
Kubernetes schemas that kubernetes-validate bundles (no network), for the oldest supported release and the
newest the validator knows; and the manifests agree with each other, with docker-compose.yml and with the
serving code (production flags, admin-key variable, repository path, liveness module, ensemble name)."""

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, major_minor

from ctr_ensemble.export.repository import ENSEMBLE_NAME
from ctr_ensemble.serving.server import ADMIN_KEY_ENV, PRODUCTION_REPOSITORY, SERVER_FLAGS, production_command

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OLDEST = "1.30"  # the oldest Kubernetes release the manifests are written for (docs/kubernetes.md)
VERSIONS = (OLDEST, major_minor(latest_version()))
KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
NOT_OBJECTS = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}  # in deploy/k8s, but not applied as objects
ENTRYPOINT = ["python3", "-m", "ctr_ensemble.serving.entrypoint"]
LIVENESS = ["python3", "-m", "ctr_ensemble.serving.liveness"]
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def validate_file(path: Path, version: str) -> list[dict]:
    """Every object in ``path``, each validated strictly; raises on the first that fails. A kind or apiVersion
    without a schema in that release (e.g. one that was removed) raises too, instead of the CLI's warning."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path}: no objects"
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{path.name} ({d.get('kind')}) against {version}: {where}: {e.message}") from None
    return docs


def resource_files() -> list[Path]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [K8S / r for r in kust["resources"]]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for f in resource_files():
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                out[(d["kind"], d["metadata"]["name"])] = d
    return out


def one(objects, kind: str) -> dict:
    found = [d for (k, _), d in objects.items() if k == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def container(objects) -> dict:
    cs = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in cs] == ["triton"]
    return cs[0]


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def quantity(q) -> float:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``2``) as a number (bytes or cores)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(q))
    assert m, q
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


# ------------------------------------------------------------------------------------------------ schemas
def test_the_kustomization_lists_every_manifest():
    listed = {p.name for p in resource_files()}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_OBJECTS
    assert listed == on_disk and len(listed) == len(resource_files())
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["kind"] == "Kustomization"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version):
    kinds = {d["kind"] for f in resource_files() for d in validate_file(f, version)}
    assert kinds == KINDS


def test_api_versions_are_the_stable_ones(objects):
    api = {k: d["apiVersion"] for (k, _), d in objects.items()}
    assert api == {"Deployment": "apps/v1", "Service": "v1", "PodDisruptionBudget": "policy/v1",
                   "HorizontalPodAutoscaler": "autoscaling/v2", "PersistentVolumeClaim": "v1"}


def _mutate(doc: dict, how: str) -> dict:
    d = copy.deepcopy(doc)
    if d["kind"] == "Deployment":
        c = d["spec"]["template"]["spec"]["containers"][0]
        if how == "unknown field":
            c["livenessProbe"]["periodSecond"] = 30  # a typo: periodSeconds
        elif how == "wrong type":
            c["ports"][0]["containerPort"] = "eight thousand"
        elif how == "missing required":
            del c["name"]
        elif how == "removed api":
            d["apiVersion"] = "extensions/v1beta1"
    elif d["kind"] == "HorizontalPodAutoscaler":
        if how == "unknown field":
            d["spec"]["metrics"][0]["pods"]["target"]["averageValu"] = "1"
        elif how == "wrong type":
            d["spec"]["minReplicas"] = "two"
        elif how == "missing required":
            del d["spec"]["scaleTargetRef"]["name"]
        elif how == "removed api":
            d["apiVersion"] = "autoscaling/v2beta2"  # removed in 1.26
    elif d["kind"] == "PodDisruptionBudget" and how == "removed api":
        d["apiVersion"] = "policy/v1beta1"  # removed in 1.25
    return d


@pytest.mark.parametrize("how", ["unknown field", "wrong type", "missing required", "removed api"])
@pytest.mark.parametrize("name", ["deployment.yaml", "hpa.yaml"])
def test_the_validator_rejects_a_broken_copy(tmp_path, name, how):
    src = K8S / name
    validate_file(src, OLDEST)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump_all([_mutate(d, how) for d in yaml.safe_load_all(src.read_text()) if d]))
    with pytest.raises((AssertionError, kubernetes_validate.SchemaNotFoundError)):
        validate_file(broken, OLDEST)


def test_the_validator_rejects_a_removed_pdb_api(tmp_path):
    broken = tmp_path / "pdb.yaml"
    broken.write_text(yaml.safe_dump(_mutate(yaml.safe_load((K8S / "pdb.yaml").read_text()), "removed api")))
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_file(broken, OLDEST)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kubectl_kustomize_builds_the_same_objects(objects):
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d}
    assert built == set(objects)


# ------------------------------------------------------------------------------------------------ the container
def test_the_container_runs_the_entrypoint_with_the_production_flags(objects):
    """The entrypoint builds tritonserver's command from ctr_ensemble.serving.server: the manifest passes the
    repository only, and any flag it does pass is exactly production_command()'s (one source of truth)."""
    c = container(objects)
    assert c["command"] == ENTRYPOINT
    args = c.get("args", [])
    assert f"--model-repository={PRODUCTION_REPOSITORY}" in args
    production = {flag_name(a): a for a in production_command()[1:]}
    for a in args:
        assert not flag_name(a).endswith(("-restricted-api", "-restricted-protocol")), \
            f"{a}: the admin restriction (and its key) comes from the entrypoint and ${ADMIN_KEY_ENV}"
        if flag_name(a) in production:
            assert a == production[flag_name(a)], f"{a} disagrees with production_command(): {production[flag_name(a)]}"
    assert len({flag_name(a) for a in args}) == len(args), args


def test_the_admin_key_comes_from_a_secret_and_none_is_shipped(objects):
    env = {e["name"]: e for e in container(objects)["env"]}
    key = env[ADMIN_KEY_ENV]
    assert "value" not in key and set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert "Secret" not in {k for k, _ in objects}
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    ref = key["valueFrom"]["secretKeyRef"]
    # the documented command creates exactly the name and key the pod reads
    assert re.search(rf"kubectl (-n \S+ )?create secret generic {ref['name']} --from-literal={ref['key']}=", docs)


def test_same_image_and_ports_as_compose(objects):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]
    c = container(objects)
    assert c["image"] == compose["image"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == PORTS
    assert {int(p.split(":")[-1]) for p in compose["ports"]} == set(PORTS.values())


def test_probes(objects):
    c = container(objects)
    http = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    for name in ("startupProbe", "readinessProbe"):
        get = c[name]["httpGet"]
        assert get["path"] == "/v2/health/ready" and get["port"] in ("http", http), name
    live = c["livenessProbe"]
    cmd = live["exec"]["command"]
    assert cmd[:3] == LIVENESS
    opts = dict(zip(cmd[3::2], cmd[4::2]))
    assert len(cmd[3:]) == 2 * len(opts) and set(opts) <= {"--url", "--model", "--timeout"}, cmd
    assert opts.get("--url", f"http://127.0.0.1:{http}").endswith(f":{http}")
    assert opts.get("--model", ENSEMBLE_NAME) == ENSEMBLE_NAME
    # the check's own deadline ends before the kubelet's, so a slow server fails the check, not the exec
    assert float(opts["--timeout"]) < live["timeoutSeconds"] <= live["periodSeconds"]
    assert live["failureThreshold"] >= 2  # one slow answer under load never restarts a replica
    # liveness starts only after the startup probe passed: loading may take its whole budget (>= 5 minutes,
    # compose allows 120 s before counting failures)
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert c["readinessProbe"]["periodSeconds"] <= 10


def test_the_liveness_options_exist_in_the_module(objects):
    """Where ctr_ensemble.serving.liveness is in the tree, every option the probe passes is in its --help."""
    import importlib.util

    if importlib.util.find_spec("ctr_ensemble.serving.liveness") is None:
        pytest.skip("ctr_ensemble.serving.liveness is not in this tree")
    cmd = container(objects)["livenessProbe"]["exec"]["command"]
    out = subprocess.run([sys.executable, *cmd[1:3], "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for opt in cmd[3::2]:
        assert opt in out.stdout, opt


def test_graceful_shutdown_outlasts_tritons_drain(objects):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    exit_timeout = int(next(f for f in SERVER_FLAGS if f.startswith("--exit-timeout-secs=")).split("=")[1])
    pre_stop = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + exit_timeout


def test_non_root_and_locked_down(objects):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["runAsGroup"] == 1000  # NGC triton-server
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    csc = container(objects)["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"] and not csc.get("privileged")
    assert csc["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in pod["volumes"])
    # with a read-only root, the places that are written are emptyDirs
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    for path in ("/tmp", env["HOME"]):
        assert "emptyDir" in vols[mounts[path]["name"]], path


def test_one_gpu_per_replica_and_sized_resources(objects):
    c = container(objects)
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert int(lim["nvidia.com/gpu"]) == 1
    for r in ("cpu", "memory"):
        assert quantity(req[r]) > 0 and quantity(lim[r]) >= quantity(req[r]), r
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    shm = vols[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    compose_shm = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]["shm_size"]
    assert quantity(shm["sizeLimit"]) >= quantity(compose_shm.upper().replace("B", "i"))  # 2gb -> 2Gi
    # a memory-backed emptyDir counts against the container's memory: the limit leaves room beyond it
    assert quantity(lim["memory"]) >= quantity(shm["sizeLimit"]) + 4 * 2**30


def test_the_repository_volume_is_read_only(objects):
    c = container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == PRODUCTION_REPOSITORY)
    assert mount["readOnly"] is True
    claim = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = objects[("PersistentVolumeClaim", claim["claimName"])]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


# ------------------------------------------------------------------------------------------------ the others
def test_service_pdb_and_hpa_select_the_deployment(objects):
    dep = one(objects, "Deployment")
    selector = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    ports = {p["name"] for p in container(objects)["ports"]}
    services = [d for (k, _), d in objects.items() if k == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"] == selector
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"  # inside the cluster; a gateway exposes it
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports - {"metrics"}, "clients never get metrics"
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": PORTS["http"], "grpc": PORTS["grpc"]}
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": dep["metadata"]["name"]}


def test_replicas_budget_and_scaling(objects):
    dep, pdb = one(objects, "Deployment"), one(objects, "PodDisruptionBudget")
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert "replicas" not in dep["spec"], "the HPA owns the count; `kubectl apply -k` would reset it"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert hpa["minReplicas"] > pdb["spec"]["maxUnavailable"]  # a drain never leaves zero replicas
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_hpa_metric_is_the_adapter_rule_on_tritons_queue_time(objects):
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert quantity(metric["pods"]["target"]["averageValue"]) > 0
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]
    [rule] = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    q = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>" in q and "nv_inference_request_success{<<.LabelMatchers>>" in q
    # queue time of the composing models (the ensemble's own stays ~0), per ensemble request
    assert f'model!="{ENSEMBLE_NAME}"' in q and f'model="{ENSEMBLE_NAME}"' in q and "by (<<.GroupBy>>)" in q
    assert f'model="{ENSEMBLE_NAME}"' in rule["seriesQuery"] and re.search(r"\[\d+m\]", q)
    # the pods are scraped one by one, on the metrics port
    ann = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == PORTS["metrics"]


def test_the_docs_say_what_was_not_run():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "kubectl apply -k deploy/k8s" in text and "no cluster" in text.lower()
    for f in [p.name for p in resource_files()] + ["prometheus-adapter-rules.yaml"]:
        assert f in text, f

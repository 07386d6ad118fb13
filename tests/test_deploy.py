"""The production deployment without a Docker engine: docker-compose.yml parses, names paths and ports
that exist and agree with the repository, the locustfile and the local server's flags; production
configs parse with Triton's model_config protobuf and put members and fusion on the GPU."""

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from ctr_ensemble.cli import app
from ctr_ensemble.export.repository import CUDA_ACCELERATOR
from ctr_ensemble.loadtest import sweep
from ctr_ensemble.serving.server import (ADMIN_KEY_ENV, ENTRYPOINT, PRODUCTION_REPOSITORY, RESTRICTED_APIS, SERVER_FLAGS,
                                         TritonServer, production_command)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _pins(path: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_wheels import requirement_pins  # stdlib only; `make gpu-wheels` reads the same pins

    return requirement_pins(path)


def test_compose_has_the_services_and_triton_runs_the_tested_flags(compose):
    services = compose["services"]
    assert set(services) == {"triton", "locust-master", "locust-worker", "prometheus"}
    t = services["triton"]
    assert t["command"] == production_command()
    assert t["command"][:3] == list(ENTRYPOINT) == ["python3", "-m", "ctr_ensemble.serving.entrypoint"]  # supervised
    for flag in SERVER_FLAGS:
        assert flag in t["command"]
    assert "--model-control-mode=explicit" in t["command"] and "--strict-readiness=true" in t["command"]
    restricted = [c for c in t["command"] if c.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2 and all(f"${{{ADMIN_KEY_ENV}:?" in c and ",".join(RESTRICTED_APIS) in c for c in restricted)
    assert "inference" not in RESTRICTED_APIS and "health" not in RESTRICTED_APIS
    gpu = t["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["count"] >= 1
    assert re.fullmatch(r"\d+[gm]b", t["shm_size"]) and int(t["shm_size"][:-2]) >= (1 if t["shm_size"].endswith("gb") else 256)
    hc = t["healthcheck"]  # liveness (one row through the ensemble), not readiness: a dead stub stays "ready"
    assert hc["test"][:4] == ["CMD", "python3", "-m", "ctr_ensemble.serving.liveness"] and hc["start_period"]
    assert t["restart"] == "unless-stopped" and t["init"] is True  # the outer net when the entrypoint gives up
    assert t["user"] not in ("root", "0")
    src, dst, mode = t["volumes"][0].rsplit(":", 2)
    assert dst == PRODUCTION_REPOSITORY and mode == "ro"
    assert {p.split(":")[1] for p in t["ports"]} == {"8000", "8001", "8002"}
    # every published port listens on the loopback only; a gateway in front decides what is exposed
    published = [p for svc in compose["services"].values() for p in svc.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published


def test_local_server_runs_the_same_flags(tmp_path):
    members_only = TritonServer(tmp_path, admin_key="abc").command(tmp_path)
    assert "--load-model=*" in members_only  # no ensemble to load: every model of the repository
    (tmp_path / "ctr_ensemble").mkdir()
    cmd = TritonServer(tmp_path, admin_key="abc").command(tmp_path)
    assert all(f in cmd for f in SERVER_FLAGS)
    prod = [c.split(":admin-key=")[0] for c in production_command() if "restricted" in c]
    local = [c.split(":admin-key=")[0] for c in cmd if "restricted" in c]
    assert prod == local


def _dockerfile(build) -> Path:
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def test_dockerfiles_and_mounted_paths_exist(compose):
    services = compose["services"]
    for name in ("triton", "locust-master", "locust-worker"):
        assert _dockerfile(services[name]["build"]).is_file(), name
    triton_df = _dockerfile(services["triton"]["build"]).read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\S+-py3$", triton_df, re.M)
    assert re.search(r"^USER (?!root)\S+", triton_df, re.M)
    copied = re.findall(r"^COPY (\S+) ", triton_df, re.M)  # paths inside the root build context
    assert copied and all((ROOT / c).exists() for c in copied), copied
    assert "deploy/triton/requirements.txt" in copied and "ctr_ensemble" in copied
    for name in ("locust-master", "locust-worker", "prometheus"):
        for vol in services[name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./") and "artifacts" not in src:  # artifacts/ is written by --prepare-only
                assert (ROOT / src).exists(), (name, src)
    assert re.search(r"^USER (?!root)\S+", (ROOT / services["locust-master"]["build"] / "Dockerfile").read_text(), re.M)


def test_the_triton_image_runs_the_entrypoint_on_a_small_build_context(compose):
    """The image's command is the supervising entrypoint, the package is importable there (PYTHONPATH), and the
    root build context sends only what the Dockerfile copies (no .venv, artifacts, repositories or .env)."""
    build = compose["services"]["triton"]["build"]
    assert build["context"] == "." and build["dockerfile"] == "deploy/triton/Dockerfile"
    df = _dockerfile(build).read_text()
    cmd = re.search(r"^CMD (.+)$", df, re.M).group(1)
    assert ast.literal_eval(cmd) == list(ENTRYPOINT)
    assert re.search(r"^ENV PYTHONPATH=/opt/ctr-ensemble\b", df, re.M) and "/opt/ctr-ensemble/ctr_ensemble" in df
    assert "ENTRYPOINT" not in df  # the NGC entrypoint (CUDA environment) stays and execs the command
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ignore[0] == "*" and {"!ctr_ensemble/", "!deploy/triton/requirements.txt"} <= set(ignore)


def test_deploy_pins_agree_with_the_project_pins():
    root = _pins(ROOT / "requirements.txt")
    for f in ("deploy/triton/requirements.txt", "deploy/locust/requirements.txt"):
        pins = _pins(ROOT / f)
        assert pins and all(root[k] == v for k, v in pins.items()), f


def test_locust_services_agree_with_the_locustfile(compose):
    tree = ast.parse((ROOT / "loadtest" / "locustfile.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
              for t in n.targets if isinstance(t, ast.Name)}
    assert set(sweep.USER_CLASS.values()) <= classes
    assert consts["CONFIG_ENV"] == sweep.CONFIG_ENV
    for name in ("locust-master", "locust-worker"):
        s = compose["services"][name]
        assert "/loadtest/locustfile.py" in s["command"]
        user_class = next(c for c in s["command"] if "USER_CLASS" in c)
        assert re.search(r":-(\w+)\}", user_class).group(1) in classes
        cfg = s["environment"][sweep.CONFIG_ENV]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}
        assert cfg.startswith(sweep.COMPOSE_RUN_DIR) and sweep.COMPOSE_RUN_DIR in mounts
        assert mounts["/loadtest/locustfile.py"] == "./loadtest/locustfile.py"
    assert "--master-host" in compose["services"]["locust-worker"]["command"]
    workers = compose["services"]["locust-worker"]["deploy"]["replicas"]
    master = compose["services"]["locust-master"]["command"]
    assert int(master[master.index("--expect-workers") + 1]) == workers


def test_prometheus_scrapes_triton_metrics_port(compose):
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "triton:8002" in targets
    assert any(p.endswith(":8002") for p in compose["services"]["triton"]["ports"])


def _cfg(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_production_configs_put_members_and_fusion_on_the_gpu(tmp_path, tiny_repo, tiny_data):
    prod = tmp_path / "model_repository_prod"
    res = CliRunner().invoke(app, ["export", "--from-repository", str(tiny_repo), "--repository", str(prod), "--production",
                                   "--max-batch-size", "256"])
    assert res.exit_code == 0, res.output
    for member in ("deepfm", "dcnv2"):
        cfg = _cfg(prod / member / "config.pbtxt")
        assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.onnx"
        assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in acc] == [CUDA_ACCELERATOR["name"]] == ["cuda"]
        assert cfg.HasField("dynamic_batching") and (prod / member / "1" / "model.onnx").is_file()
        assert [i.name for i in cfg.input] == [i.name for i in _cfg(tiny_repo / member / "config.pbtxt").input]
    fusion = _cfg(prod / "fusion" / "config.pbtxt")
    assert fusion.backend == "python" and [g.kind for g in fusion.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    ens = _cfg(prod / "ctr_ensemble" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 256
    # The local (CPU) repository keeps CPU instances.
    assert [g.kind for g in _cfg(tiny_repo / "deepfm" / "config.pbtxt").instance_group] == [mc.ModelInstanceGroup.KIND_CPU]


def test_prepare_only_writes_rows_and_config_for_compose(tmp_path, tiny_repo, tiny_data):
    import json

    import numpy as np

    dest = tmp_path / "compose"
    res = CliRunner().invoke(app, ["loadtest", "--repository", str(tiny_repo), "--data", str(tiny_data / "test.tsv"),
                                   "--prepare-only", str(dest), "--max-rows", "500"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["grpc_url"] == "triton:8001" and cfg["http_url"] == "triton:8000"
    assert cfg["rows_file"] == f"{sweep.COMPOSE_RUN_DIR}/rows.npz"
    with np.load(dest / "rows.npz") as rows:
        assert set(rows.files) == {i["name"] for i in cfg["inputs"]} | {"label"} and len(rows["label"]) == 500


def test_the_compose_env_file_is_never_committed():
    """`.env` holds TRITON_ADMIN_KEY for docker compose: git ignores it, and none is tracked."""
    import subprocess

    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
    tracked = subprocess.run(["git", "ls-files", "--", ".env", "*/.env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""

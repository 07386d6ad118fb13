"""Search the members' server configuration with Triton Model Analyzer, and feed its best into the load-test sweep.

Model Analyzer (PyPI ``triton-model-analyzer``, its own venv: it pins packages of its own) runs here in
``triton_launch_mode: local`` against the bundled ``tritonserver`` 2.51, CPU only:

- ``tritonserver`` through a wrapper that sets ``serving.server.local_env`` and adds the project's backend
  directory (``make_backend_dir``: the Python backend and the Python-based ``onnxruntime`` shim). It must
  ``exec``: Model Analyzer stops the server by signalling the process it started.
- ``perf_analyzer`` 2.51 (``make perf-venv``) through a wrapper that puts ``libb64``/``libcudart`` from the
  nvidia-pytriton wheel on ``LD_LIBRARY_PATH`` (``loadtest.perf.environment``).
- No GPU: the GPU list is empty and no DCGM monitor starts (``dcgm_disable`` is refused in local mode);
  ``perf_analyzer_cpu_util`` is raised (its 80 % default kills perf_analyzer on 2 busy cores); the server binds
  127.0.0.1 on ports of its own.
- Each member is copied alone into a work repository (Model Analyzer loads it with every candidate config) and
  measured with real held-out rows (``perf.input_data``), over instance counts, dynamic-batching delays and
  preferred batch sizes (``SEARCH``), at batch 1 and 64, concurrency 1, 2 and 4.

``best`` reads ``results/metrics-model-inference.csv`` back: per member the config with the highest throughput
at the largest batch (Model Analyzer's own objective), and the one with the lowest batch-1, concurrency-1 p99.
``sweep_variants`` turns those settings into ``loadtest.sweep`` variants of the ensemble, which the sweep serves
and scores for served AUC, the figure Model Analyzer does not have.
"""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.errors import CtrError
from ctr_ensemble.loadtest import perf
from ctr_ensemble.serving.server import free_ports, local_binary, local_env, make_backend_dir

# The search: the members' RepoOptions that Model Analyzer varies (brute force over the product).
SEARCH = {"instances": [1, 2], "max_queue_delay_us": [0, 200], "preferred_batch_sizes": [[], [64]]}
BATCHES = [1, 64]
CONCURRENCY = [1, 2, 4]


def _wrapper(path: Path, env: dict[str, str], command: list[str]) -> Path:
    lines = ["#!/bin/bash", "# written by ctr_ensemble.loadtest.model_analyzer: Model Analyzer runs this instead of the binary"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    lines.append("exec " + " ".join(shlex.quote(str(c)) for c in command) + ' "$@"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def _search_config() -> dict:
    """Model Analyzer's ``model_config_parameters`` for ``SEARCH`` (its brute search takes the product of the
    lists; an empty preferred size is none)."""
    return {"max_batch_size": [1024], "instance_group": [{"kind": "KIND_CPU", "count": list(SEARCH["instances"])}],
            "dynamic_batching": {"max_queue_delay_microseconds": list(SEARCH["max_queue_delay_us"]),
                                 "preferred_batch_size": [list(p) for p in SEARCH["preferred_batch_sizes"]]},
            "parameters": {"intra_op_thread_count": {"string_value": ["1"]}}}


def prepare(repo: Path, member: str, input_json: Path, work: Path, perf_binary: Path, model_config: dict) -> Path:
    """Work folder for one Model Analyzer run on ``member`` of ``repo``: its repository, wrappers and config.yaml."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "repo").mkdir(parents=True)
    shutil.copytree(Path(repo) / member, work / "repo" / member, symlinks=False)
    backends = make_backend_dir(work / "backends")
    base = dict(os.environ)
    server_env = {k: v for k, v in local_env(base).items() if base.get(k) != v}
    server = _wrapper(work / "tritonserver.sh", server_env,
                      [str(local_binary()), f"--backend-directory={backends}", "--allow-gpu-metrics=false"])
    pa_env = {k: v for k, v in perf.environment(perf_binary, work / "shim").items() if base.get(k) != v}
    analyzer = _wrapper(work / "perf_analyzer.sh", pa_env, [str(perf_binary)])
    http, grpc, metrics = free_ports(3)
    (work / "results").mkdir()
    cfg = {
        "model_repository": str(work / "repo"), "output_model_repository_path": str(work / "output_repo"),
        "override_output_model_repository": True, "export_path": str(work / "results"),
        "checkpoint_directory": str(work / "results" / "checkpoints"),
        "triton_launch_mode": "local", "triton_server_path": str(server), "triton_output_path": str(work / "tritonserver.log"),
        "triton_http_endpoint": f"127.0.0.1:{http}", "triton_grpc_endpoint": f"127.0.0.1:{grpc}",
        "triton_metrics_url": f"http://127.0.0.1:{metrics}/metrics", "client_protocol": "grpc",
        "triton_server_flags": {"http-address": "127.0.0.1", "grpc-address": "127.0.0.1", "metrics-address": "127.0.0.1"},
        "perf_analyzer_path": str(analyzer), "perf_output": True, "perf_output_path": str(work / "perf_analyzer.log"),
        "perf_analyzer_cpu_util": 400, "perf_analyzer_timeout": 120, "collect_cpu_metrics": True, "monitoring_interval": 1,
        "run_config_search_mode": "brute",
        "perf_analyzer_flags": {"input-data": str(input_json), "measurement-request-count": 100,
                                "stability-percentage": 25, "max-trials": 10},
        "profile_models": {member: {"cpu_only": True, "parameters": {"batch_sizes": BATCHES, "concurrency": CONCURRENCY},
                                    "model_config_parameters": model_config}},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work / "config.yaml"


def run(analyzer: Path, config: Path, log: Path, timeout_s: float, on_line=None) -> None:
    """``model-analyzer profile -f config``, its output appended to ``log`` (and each line to ``on_line``)."""
    with open(log, "a") as f:
        p = subprocess.Popen([str(analyzer), "profile", "-f", str(config)], cwd=config.parent, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for line in p.stdout:
                f.write(line)
                if on_line is not None:
                    on_line(line.rstrip())
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            raise CtrError(f"model-analyzer ran past {timeout_s:.0f}s; its log: {log}") from None
    if p.returncode != 0:
        raise CtrError(f"model-analyzer profile failed (exit {p.returncode}); its log: {log}")


@dataclass
class Measured:
    member: str
    config: str  # Model Analyzer's name: <member>_config_<n> | <member>_config_default
    instances: int
    max_queue_delay_us: int
    preferred_batch_sizes: list[int]
    batch: int
    concurrency: int
    rows_per_s: float
    p99_ms: float

    def settings(self) -> dict:
        return {"instances": self.instances, "max_queue_delay_us": self.max_queue_delay_us,
                "preferred_batch_sizes": list(self.preferred_batch_sizes)}


def read_results(work: Path, member: str) -> list[Measured]:
    """Every measurement of a finished run, with the settings of the config it measured."""
    path = work / "results" / "results" / "metrics-model-inference.csv"
    if not path.is_file():
        raise CtrError(f"{path}: not found (did model-analyzer profile finish?)")
    settings = {}
    for cfg_path in (work / "output_repo").glob("*/config.pbtxt"):
        cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
        settings[cfg_path.parent.name] = (sum(g.count for g in cfg.instance_group) or 1,
                                          cfg.dynamic_batching.max_queue_delay_microseconds,
                                          list(cfg.dynamic_batching.preferred_batch_size))
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name = row["Model Config Path"] if "Model Config Path" in row else row.get("Model", "")
            inst, delay, pref = settings.get(name, (0, 0, []))
            out.append(Measured(member, name, inst, delay, pref, int(row["Batch"]), int(row["Concurrency"]),
                                float(row["Throughput (infer/sec)"]), float(row["p99 Latency (ms)"])))
    return out


def best(rows: list[Measured]) -> dict[str, Measured]:
    """``throughput``: the highest rows/s at the largest batch; ``latency``: the lowest batch-1 concurrency-1 p99."""
    top = max(r.batch for r in rows)
    out = {"throughput": max((r for r in rows if r.batch == top), key=lambda r: r.rows_per_s)}
    b1 = [r for r in rows if r.batch == 1 and r.concurrency == 1]
    if b1:
        out["latency"] = min(b1, key=lambda r: r.p99_ms)
    return out


def sweep_variants(choices: dict[str, dict[str, Measured]], base: dict) -> list[dict]:
    """Sweep variants (``load_sweep``'s YAML entries) of the ensemble with each distinct best member setting."""
    seen, out = set(), []
    for member, picks in choices.items():
        for goal, m in picks.items():
            key = tuple(sorted((k, str(v)) for k, v in m.settings().items()))
            if key in seen:
                continue
            seen.add(key)
            pref = "-".join(map(str, m.preferred_batch_sizes)) or "none"
            out.append({"name": f"ma_{goal}_{m.instances}inst_{m.max_queue_delay_us}us_pref{pref}",
                        "model": "ctr_ensemble", "options": {**base, **m.settings()}})
    return out

"""Load-test deployment variants on the real Triton server with Locust (and perf_analyzer).

A variant is a model to call plus deployment options (``RepoOptions`` fields: fusion rule,
dynamic batching, instances, ...). Variants with the same options share one repository,
derived from the base one by rewriting configs only (``reconfigure_repository``), and one
server; options that change nothing of the base repository's share the base's server. The
fitted fusion (``fusion_mode: fitted``) is the one the base repository was fitted with
(``export --fit-fusion``); a base without one skips that variant. For each variant × protocol ×
user count: scrape Triton's metrics, run Locust headless in a subprocess (gevent never touches this
process), scrape again, summarise what the users recorded against the offline reference, then
perf_analyzer at the same concurrency.

A variant whose model the repository lacks (the collaborative ensemble before it is exported)
is skipped with the reason; one that fails to load is reported with Triton's error and the
sweep goes on; a server that dies mid-run leaves the failed requests in the row and the rest
of its variants are reported as not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.repository import ENSEMBLE_NAME, RepoOptions, fitted_rule, read_manifest, reconfigure_repository
from ctr_ensemble.export.served import VARIANT_MODELS
from ctr_ensemble.layers.fusion import FITTED
from ctr_ensemble.loadtest import perf, stats
from ctr_ensemble.loadtest.rows import (InputSpec, NoReference, OfflineReference, inputs_from_config, inputs_from_metadata,
                                        load_rows, model_spec)
from ctr_ensemble.serving import metrics
from ctr_ensemble.serving.server import Endpoints, TritonServer, admin_headers

PROTOCOLS = ("grpc", "http")
USER_CLASS = {"grpc": "TritonGrpcUser", "http": "TritonHttpUser"}
CONFIG_ENV = "CTR_LOADTEST_CONFIG"  # the locustfile reads its settings from this file
LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
COMPOSE_RUN_DIR = "/loadtest/run"  # where docker-compose.yml mounts the prepared rows and config
OPTION_FIELDS = {f.name for f in dataclasses.fields(RepoOptions)} - {"production", "fusion_kind"}


@dataclass
class Variant:
    name: str
    model: str = ENSEMBLE_NAME
    options: dict = field(default_factory=dict)  # RepoOptions overrides; {} = the repository as it is

    def __post_init__(self):
        bad = set(self.options) - OPTION_FIELDS
        if bad:
            raise CtrError(f"variant {self.name!r}: unknown options {sorted(bad)}; allowed: {sorted(OPTION_FIELDS)}")

    def key(self) -> str:
        return json.dumps(self.options, sort_keys=True)


@dataclass
class SweepConfig:
    variants: list[Variant]
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    users: list[int] = field(default_factory=lambda: [1, 4])
    spawn_rate: float = 0.0  # users started per second; 0 = all at once
    duration_s: float = 6.0
    warmup_s: float = 1.5
    rows_per_request: int = 64
    max_rows: int = 4096  # small enough that every run covers all rows: AUCs compare on the same rows
    timeout_s: float = 10.0  # per request
    max_requests: int = 200_000  # per Locust process and run
    perf_analyzer: bool = True
    perf_interval_ms: int = 1000

    def validate(self) -> None:
        if not self.variants:
            raise CtrError("the sweep has no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise CtrError(f"variant names must be unique, got {names}")
        bad = set(self.protocols) - set(PROTOCOLS)
        if bad or not self.protocols:
            raise CtrError(f"protocols must be among {PROTOCOLS}, got {self.protocols}")
        if not self.users or min(self.users) < 1:
            raise CtrError(f"users must be a list of counts >= 1, got {self.users}")
        if self.rows_per_request < 1 or self.duration_s <= 0 or self.warmup_s < 0 or self.warmup_s >= self.duration_s:
            raise CtrError("need rows_per_request >= 1, duration_s > 0 and 0 <= warmup_s < duration_s")


# The default sweep of `make loadtest`: each member alone, the fusion rules (τ = 1, fitted, mean), batching off,
# two member instances, two fusion instances, the single-hop and all-ONNX variants (the last five with τ = 1,
# whatever the base was exported with).
NE_TAU1 = {"fusion_mode": "negation_entropy", "tau": 1.0}
DEFAULT_VARIANTS = [
    Variant("deepfm", "deepfm"),
    Variant("dcnv2", "dcnv2"),
    Variant("ensemble_ne", ENSEMBLE_NAME, NE_TAU1),
    Variant("ensemble_fitted", ENSEMBLE_NAME, {"fusion_mode": FITTED}),
    Variant("ensemble_mean", ENSEMBLE_NAME, {"fusion_mode": "mean"}),
    Variant("ensemble_ne_no_batching", ENSEMBLE_NAME, {**NE_TAU1, "dynamic_batching": False}),
    Variant("ensemble_ne_2_instances", ENSEMBLE_NAME, {**NE_TAU1, "instances": 2}),
    # Two fusion instances: under concurrent load the single Python fusion instance is where requests queue.
    Variant("ensemble_ne_2_fusion", ENSEMBLE_NAME, {**NE_TAU1, "fusion_instances": 2}),
    # The same members and rule along fewer hops (export.variants), both on one server: one Python model, one ONNX graph.
    Variant("single_hop", VARIANT_MODELS["single_hop"], {**NE_TAU1, "variants": list(VARIANT_MODELS)}),
    Variant("all_onnx", VARIANT_MODELS["all_onnx"], {**NE_TAU1, "variants": list(VARIANT_MODELS)}),
    # Hook for the collaborative ensemble (issue 4): skipped with the reason while the repository has none.
    Variant("collaborative", "ctr_collaborative"),
]


def default_sweep() -> SweepConfig:
    return SweepConfig(variants=[dataclasses.replace(v, options=dict(v.options)) for v in DEFAULT_VARIANTS])


def load_sweep(path: Path) -> SweepConfig:
    """A YAML sweep: the SweepConfig fields, ``variants`` a list of {name, model, options}."""
    if not Path(path).is_file():
        raise CtrError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise CtrError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise CtrError(f"{path}: expected a mapping with 'variants' and settings")
    allowed = {f.name for f in dataclasses.fields(SweepConfig)}
    bad = set(raw) - allowed
    if bad:
        raise CtrError(f"{path}: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
    variants = []
    for i, v in enumerate(raw.pop("variants", None) or []):
        if not isinstance(v, dict) or "name" not in v or set(v) - {"name", "model", "options"}:
            raise CtrError(f"{path}: variants[{i}] must be a mapping with name, model, options")
        variants.append(Variant(**v))
    cfg = SweepConfig(variants=variants, **raw)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------


@dataclass
class Target(Endpoints):
    """A server to load: started here (``server``) or running elsewhere."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path  # what it serves (for the offline reference)
    admin_key: str | None = None
    server: TritonServer | None = None

    def alive(self) -> bool:
        return self.server is None or self.server.is_running()

    def perf_headers(self, protocol: str) -> dict[str, str]:
        return admin_headers(self.admin_key, protocol) if self.admin_key else {}


def started(repo: Path, log_path: Path | None = None) -> Target:
    key = secrets.token_hex(12)  # the production restriction flags, with a throwaway key
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(repo, admin_key=key, log_path=log_path).start()
    return Target("127.0.0.1", server.http_port, server.grpc_port, server.metrics_port, Path(repo), key, server)


def model_inputs(target: Target, model: str) -> list[InputSpec]:
    import tritonclient.http as thttp

    client = thttp.InferenceServerClient(target.http_url, connection_timeout=10, network_timeout=10)
    try:
        if not client.is_model_ready(model):
            raise CtrError(f"model {model!r} is not ready on Triton at {target.http_url}")
        return inputs_from_metadata(client.get_model_metadata(model))
    except CtrError:
        raise
    except Exception as e:  # tritonclient raises its own exception and transport errors
        raise CtrError(f"Triton at {target.http_url}: cannot read the metadata of {model!r}: {e}") from e
    finally:
        client.close()


def write_run_config(path: Path, *, http_url: str, grpc_url: str, model: str, rows_file: str, inputs: list[InputSpec],
                     rows_per_request: int, timeout_s: float, max_requests: int, results_dir: str,
                     stop_file: str | None = None) -> Path:
    """The JSON the locustfile reads (see loadtest/locustfile.py for the keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "http_url": http_url, "grpc_url": grpc_url, "model": model, "output": "prob", "rows_file": rows_file,
        "inputs": [i.as_dict() for i in inputs], "rows_per_request": rows_per_request, "timeout_s": timeout_s,
        "max_requests": max_requests, "results_dir": results_dir, **({"stop_file": stop_file} if stop_file else {}),
    }, indent=2))
    return path


def save_rows(rows: dict[str, np.ndarray], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **rows)
    return path


def run_locust(config: Path, protocol: str, users: int, spawn_rate: float, duration_s: float,
               locustfile: Path = LOCUSTFILE, grace_s: float = 60.0) -> tuple[int, str]:
    """Locust headless in its own process group; killed if it outlives ``duration_s + grace_s``."""
    if not locustfile.is_file():
        raise CtrError(f"{locustfile}: locustfile not found (pass --locustfile)")
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), USER_CLASS[protocol], "--headless",
           "-u", str(users), "-r", str(spawn_rate or users), "-t", f"{duration_s:g}s", "--stop-timeout", "5",
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "1"]
    env = dict(os.environ, **{CONFIG_ENV: str(config)})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=duration_s + grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, (out or "")[-2000:] + f"\n(locust killed after {duration_s + grace_s:.0f}s)"
    return proc.returncode, (out or "")[-2000:]


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)  # one per variant × protocol × users (or a skip)
    server_rows: list[dict] = field(default_factory=list)  # per model, per run: queue vs compute

    @property
    def failed(self) -> bool:
        return any(r["status"] not in ("ok", "skipped") or r.get("errors") for r in self.rows)


def _note_row(variant: Variant, status: str, note: str) -> dict:
    return {"variant": variant.name, "protocol": "", "users": "", "status": status, "model": variant.model, "note": note}


def run_sweep(cfg: SweepConfig, base_repo: Path, data: Path, out: Path, *, target: Target | None = None,
              perf_binary: Path | None = None, locustfile: Path = LOCUSTFILE, fmt: str = "auto",
              console: Console | None = None) -> SweepResult:
    """Run every variant; ``target`` = a running server (then every variant must have no options)."""
    cfg.validate()
    console = console or Console()
    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    result = SweepResult()
    reference = OfflineReference()
    rows_cache: dict[tuple, tuple[dict, Path, Path | None, float | None]] = {}
    perf_reason = None if not cfg.perf_analyzer else perf.why_not_runnable(perf_binary)
    if cfg.perf_analyzer and perf_reason:
        console.print(f"[yellow]perf_analyzer skipped: {perf_reason}[/]")
    groups: dict[str, list[Variant]] = {}
    base = base_options(base_repo) if (Path(base_repo) / "repository.json").is_file() else None
    for v in cfg.variants:
        groups.setdefault(deployment_key(v.options, base), []).append(v)
    for gi, (key, variants) in enumerate(groups.items()):
        opts = {} if key == "{}" else variants[0].options
        if target is not None and opts:
            for v in variants:
                result.rows.append(_note_row(v, "skipped", "deployment options need a server started by the sweep (not --url)"))
            continue
        if opts.get("fusion_mode") == FITTED and (base is None or fitted_rule(read_manifest(base_repo)) is None):
            for v in variants:
                result.rows.append(_note_row(v, "skipped", f"repository {base_repo} has no fitted fusion (export --fit-fusion VAL_FILE)"))
            console.print(f"[yellow]{', '.join(v.name for v in variants)}: skipped (no fitted fusion in {base_repo})[/]")
            continue
        repo = Path(base_repo)
        # Skip before building anything when no variant of the group can run on this repository.
        runnable = []
        added = {VARIANT_MODELS[n] for n in opts.get("variants", []) if n in VARIANT_MODELS}  # written by the reconfigure
        for v in variants:
            if not (repo / v.model / "config.pbtxt").is_file() and v.model not in added:
                result.rows.append(_note_row(v, "skipped", f"repository {repo} has no model {v.model!r}"))
                console.print(f"[yellow]{v.name}: skipped (repository has no model {v.model!r})[/]")
            else:
                runnable.append(v)
        if not runnable:
            continue
        tgt = target
        try:
            if opts:
                base_opts = RepoOptions(**base_options(repo))
                repo = work / f"repo-{gi}"
                reconfigure_repository(base_repo, repo, dataclasses.replace(base_opts, **opts))
            if tgt is None:
                console.print(f"[bold]server[/] for {', '.join(v.name for v in runnable)} ({key if opts else 'as exported'})")
                tgt = started(repo, work / f"tritonserver-{gi}.log")
        except CtrError as e:
            for v in runnable:
                result.rows.append(_note_row(v, "load_failed", str(e).replace("\n", " | ")[:2000]))
            console.print(f"[red]{', '.join(v.name for v in runnable)}: failed to load: {str(e).splitlines()[0]}[/]")
            continue
        try:
            for v in runnable:
                _run_variant(v, cfg, tgt, repo, data, work, reference, rows_cache, perf_binary if not perf_reason else None,
                             perf_reason, locustfile, fmt, result, console)
        finally:
            if tgt.server is not None:
                tgt.server.stop()
    return result


def changes_nothing(options: dict, base: dict | None) -> bool:
    """Whether a variant's options leave the base repository's deployment as it is (then it shares the base's server)."""
    if not options:
        return True
    if base is None:
        return False
    return RepoOptions(**{**base, **options}) == RepoOptions(**base)


def deployment_key(options: dict, base: dict | None) -> str:
    """One key per deployment: variants whose options give the same RepoOptions (written differently, or one of
    them spelling out a base value) share a server; ``"{}"`` is the base repository as exported."""
    if changes_nothing(options, base):
        return "{}"
    if base is None:
        return json.dumps(options, sort_keys=True)
    return json.dumps(dataclasses.asdict(RepoOptions(**{**base, **options})), sort_keys=True, default=str)


def base_options(repo: Path) -> dict:
    """The options the base repository was exported with (manifest), to change only what a variant says."""
    manifest = json.loads((Path(repo) / "repository.json").read_text())
    known = {f.name for f in dataclasses.fields(RepoOptions)}
    return {k: v for k, v in manifest.get("options", {}).items() if k in known}


def _run_variant(v: Variant, cfg: SweepConfig, tgt: Target, repo: Path, data: Path, work: Path,
                 reference: OfflineReference, rows_cache: dict, perf_binary: Path | None, perf_reason: str | None,
                 locustfile: Path, fmt: str, result: SweepResult, console: Console) -> None:
    if not tgt.alive():
        result.rows.append(_note_row(v, "not_run", f"server died earlier; log: {tgt.server.log_tail(5)}"))
        return
    try:
        inputs = model_inputs(tgt, v.model)
        ikey = tuple(inputs)
        if ikey not in rows_cache:
            rows = load_rows(data, repo, v.model, inputs, cfg.max_rows, fmt)
            rfile = save_rows(rows, work / f"rows-{len(rows_cache)}.npz")
            pa_json = perf.write_input_data(rows, inputs, work / f"pa-input-{len(rows_cache)}.json") if perf_binary else None
            base_rate = model_spec(repo, v.model).fitted_on.get("label_mean")  # training CTR, for NE
            rows_cache[ikey] = (rows, rfile, pa_json, base_rate)
        rows, rfile, pa_json, base_rate = rows_cache[ikey]
        offline = reference.predict(repo, v.model, rows)
    except NoReference as e:
        result.rows.append(_note_row(v, "skipped", str(e)))
        console.print(f"[yellow]{v.name}: skipped ({e})[/]")
        return
    except CtrError as e:
        result.rows.append(_note_row(v, "failed", str(e)))
        console.print(f"[red]{v.name}: {e}[/]")
        return
    for protocol in cfg.protocols:
        for users in cfg.users:
            run_dir = work / "runs" / f"{v.name}-{protocol}-u{users}"
            conf = write_run_config(run_dir / "config.json", http_url=tgt.http_url, grpc_url=tgt.grpc_url, model=v.model,
                                    rows_file=str(rfile), inputs=inputs, rows_per_request=cfg.rows_per_request,
                                    timeout_s=cfg.timeout_s, max_requests=cfg.max_requests, results_dir=str(run_dir / "results"))
            row = {"variant": v.name, "protocol": protocol, "users": users, "model": v.model, "status": "ok",
                   "rows_per_request": cfg.rows_per_request, "options": json.dumps(v.options, sort_keys=True)}
            if not tgt.alive():
                row.update(status="not_run", note=f"server died earlier; log: {tgt.server.log_tail(5)}")
                result.rows.append(row)
                continue
            before = scrape_or_none(tgt)
            t0 = time.perf_counter()
            code, tail = run_locust(conf, protocol, users, cfg.spawn_rate, cfg.duration_s, locustfile)
            after = scrape_or_none(tgt)
            res = stats.load_results(run_dir / "results")
            summary = stats.summarize(res, rows["label"], offline, cfg.warmup_s, train_base_rate=base_rate)
            row.update({k: summary[k] for k in ("rps", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "errors",
                                                 "served_auc", "offline_auc", "max_ms", "served_logloss", "offline_logloss",
                                                 "served_ne", "offline_ne", "ne_base", "served_calibration",
                                                 "offline_calibration", "served_ece", "offline_ece",
                                                 "max_abs_diff", "mismatched_rows", "coverage", "requests", "steady_requests", "window_s")})
            row["errors_by_kind"] = json.dumps(summary["errors_by_kind"])
            row["locust_exit"] = code
            if summary["requests"] == 0:
                row.update(status="failed", note=f"locust sent nothing (exit {code}): {tail.strip().splitlines()[-1] if tail.strip() else ''}")
            elif not tgt.alive():
                row.update(status="server_died", note=f"server exited during the run; log: {tgt.server.log_tail(5)}")
            elif summary["failed"] and tgt.server is not None:  # Triton's side of the failures
                row["note"] = f"server log: {tgt.server.log_tail(3)}".replace("\n", " | ")[:1500]
            if before is not None and after is not None:
                costs = metrics.diff(before, after)
                for c in costs:
                    result.server_rows.append({"variant": v.name, "protocol": protocol, "users": users, **c.as_dict()})
                own = next((c for c in costs if c.model == v.model), None)
                if own is not None:
                    row["server_ms"] = round(own.request_ms, 4)
                    steps = [c for c in costs if c.model != v.model] or [own]
                    row["server_queue_ms"] = round(sum(c.queue_ms for c in steps), 4)
                    row["server_compute_ms"] = round(sum(c.compute_ms for c in steps), 4)
            if perf_binary is not None and tgt.alive():
                url = tgt.http_url if protocol == "http" else tgt.grpc_url
                try:
                    pr = perf.run(perf_binary, v.model, url, protocol, cfg.rows_per_request, users, pa_json, run_dir,
                                  tgt.perf_headers(protocol), cfg.perf_interval_ms)
                    row.update(pr.as_dict())
                except CtrError as e:
                    row["pa_note"] = str(e)[:500]
            elif perf_reason:
                row["pa_note"] = perf_reason
            result.rows.append(row)
            console.print(
                f"{v.name:26s} {protocol:4s} users={users:<3d} {row.get('rps', 0):8.1f} req/s  p50 {row.get('p50_ms', float('nan')):7.2f}  "
                f"p99 {row.get('p99_ms', float('nan')):7.2f} ms  errors {row.get('errors')}  "
                f"AUC {_f(row.get('served_auc'))} (offline {_f(row.get('offline_auc'))})  NE {_f(row.get('served_ne'))}"
                + (f"  perf_analyzer p50 {row['pa_p50_ms']:.2f} p99 {row['pa_p99_ms']:.2f} ms" if "pa_p50_ms" in row else "")
                + f"  [{time.perf_counter() - t0:.0f}s]")


def scrape_or_none(tgt: Target) -> dict | None:
    try:
        return metrics.scrape(tgt.metrics_url)
    except CtrError:
        return None  # a dead server has no metrics; the run's row says why


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "n/a"

"""What does serving cost, and where do the milliseconds go? Members in-process vs the three served paths.

For every batch size (default 1, 64, 1024) this measures, one client, sequential requests
(concurrency 1), after a short warm-up:

  (a) each member in ONNX Runtime in-process: one request = one ``sess.run`` on
      ``<repo>/<member>/1/model.onnx`` (CPU provider, same intra-op thread count as the
      member's Triton config unless ``--ort-threads`` says otherwise), and the all-ONNX graph
      (members + fusion, ``export.onnx_fusion``) in-process, ``ctr_all_onnx/onnx_inprocess``;
  (b) each member through Triton, over gRPC and HTTP;
  (c) the three served paths of one export (``export.variants``), over gRPC and HTTP:
      ``ctr_ensemble`` (Triton ensemble: members -> fusion Python model, two hops),
      ``ctr_single_hop`` (one Python model runs the members' sessions and the fusion) and
      ``ctr_all_onnx`` (one ONNX graph on the onnxruntime backend); a repository exported without
      the variants is served from a config-only copy that adds them (``--variants`` says which);
  (d) the ensemble with each other fusion rule of ``--fusion-variants`` (default: the rule fitted on
      validation data at export, ``fitted``, and negation entropy with τ = 1, ``tau1``): the same
      repository with only the fusion config rewritten, on a server of its own, target
      ``ctr_ensemble[<variant>]``.

Every served path also scores all data rows once for its served AUC, logloss and calibration, and its
largest difference from the reference fusion computed offline (``export.reference``: the members' ONNX
outputs through the rule), which must stay within ``metrics.PARITY_TOL``.

Where the time goes: Triton's per-model metrics are scraped before and after every Triton cell, and
their difference split per request into queue, compute input, compute infer and compute output for
every model the request ran through (``serve_stages.csv``); ``server_ms`` is the target's own
end-to-end time inside the server, ``client_ms`` = the client's mean latency minus ``server_ms``
(request building, transport, the client library, response decoding).

Rows are real: the demo's test split, encoded with the repository's own feature spec.
Per-request latencies are wall-clock on the client; p50/p95/p99 come from the raw per-request
latencies, rows/s = rows sent / wall time of the measured loop.

The ratios compare each served path with the floor: the sum of the members' in-process ONNX p50 at the
same batch size (running them back to back with no server and no fusion step), and for throughput
in-process rows/s of the members back to back = 1 / sum(1 / rows_per_s_member). Near 1 means the
server adds little; far above 1 at batch 1 with the gap closing at 1024 means a fixed per-request
overhead that batching amortises.

The trace pass (``--trace-requests``, default 100) then sends batch-1 requests to every served path over both
protocols on a second server that traces each one (Triton's trace API, level TIMESTAMPS), and reports the
median timeline per stage: the frontend reading the request, per model queue / input / infer / output, the
ensemble's gaps between its steps, the response write (``serving.trace``; ``serve_trace.csv``).

Writes ``<out>/serve_targets.csv`` (the issue's targets checked on every path and client), ``serve.csv``, ``serve_ratios.csv``, ``serve_stages.csv``, ``serve_fusion.csv``, ``serve_trace.csv``
and ``serve.md``.
Run ``make demo`` first (or pass ``--repository``); ``--http-url/--grpc-url`` (and ``--metrics-url``) use a
running server instead of starting one.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble import metrics
from ctr_ensemble.data.spec import feed_rows, slice_feeds
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import (ENSEMBLE_NAME, RepoOptions, fitted_rule, manifest_rule, read_manifest,
                                            reconfigure_repository, repository_spec)
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.served import VARIANT_MODELS
from ctr_ensemble.loadtest import perf
from ctr_ensemble.loadtest.rows import OfflineReference, inputs_from_config
from ctr_ensemble.loadtest.sweep import NE_TAU1, base_options, changes_nothing
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.serving import metrics as triton_metrics
from ctr_ensemble.serving import trace as triton_trace
from ctr_ensemble.serving.client import CALLS, TritonScorer
from ctr_ensemble.serving.server import TritonServer, admin_headers

COLUMNS = ["target", "path", "batch", "requests", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "server_ms", "client_ms"]
STAGE_COLUMNS = ["target", "path", "batch", "model", "requests", "avg_batch", "request_ms", "queue_ms", "compute_input_ms",
                 "compute_infer_ms", "compute_output_ms"]
TARGET_COLUMNS = ["target", "client", "batch1_p50_ms", "batch64_rows_per_s_ratio", "p50_vs_http_ratio", "meets"]
TRACE_COLUMNS = ["target", "protocol", "stage", "requests", "median_us", "p90_us"]
PATHS = (ENSEMBLE_NAME, *VARIANT_MODELS.values())  # the served paths of one export
console = Console(width=None if sys.stdout.isatty() else 140)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--data", type=Path, default=Path("artifacts/demo/data/test.tsv"), help="Criteo-layout TSV of rows to send")
    p.add_argument("--batch-sizes", default="1,64,1024")
    p.add_argument("--requests", type=int, default=None, help="measured requests per cell (default 200, 50 for batch >= 512)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests per cell")
    p.add_argument("--seconds", type=float, default=8.0, help="stop a cell early after this many seconds (at least 10 requests)")
    p.add_argument("--ort-threads", type=int, default=None, help="in-process intra-op threads (default: the member's Triton config)")
    p.add_argument("--http-url", help="use a running Triton (host:port) instead of starting one")
    p.add_argument("--grpc-url", help="use a running Triton (host:port) instead of starting one")
    p.add_argument("--metrics-url", help="with --http-url/--grpc-url: its Prometheus metrics (http://host:8002/metrics) for the stages")
    p.add_argument("--grpc-calls", default=",".join(CALLS),
                   help="gRPC client calls to compare on the served paths: sync (tritonclient infer), async (async_infer "
                        "+ callback), stream (one bidirectional stream); '' = sync only")
    p.add_argument("--perf-analyzer", default="auto",
                   help="perf_analyzer binary for a C++-client cell per served path, protocol and batch (concurrency 1): "
                        "auto = make perf-venv's if it runs here, '' = none")
    p.add_argument("--trace-requests", type=int, default=100,
                   help="batch-1 requests per served path and protocol on a second, traced server (Triton trace API, "
                        "level TIMESTAMPS) for the stage timeline; 0 = no trace pass")
    p.add_argument("--variants", default=",".join(VARIANT_MODELS),
                   help="deployment variants to serve beside the ensemble (export.variants; '' = the ensemble only)")
    p.add_argument("--fusion-variants", default="fitted,tau1",
                   help="other fusion rules to serve and measure: fitted (the export's --fit-fusion rule), tau1, mean ('' = none)")
    p.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    return p.parse_args()


FUSION_VARIANTS = {"fitted": {"fusion_mode": "fitted"}, "tau1": NE_TAU1, "mean": {"fusion_mode": "mean"}}
FUSION_COLUMNS = ["target", "fusion", "rule", "rows", "auc", "logloss", "calibration", "max_abs_diff"]


def fusion_variants(repo: Path, names: list[str]) -> tuple[str, list[str], list[str]]:
    """(label of the repository's own rule, the other rules asked for that can be served, notes on skips).
    A rule equal to the repository's own is measured on it; the others on a copy with only the configs rewritten."""
    manifest, base = read_manifest(repo), base_options(repo)
    label = next((n for n, o in FUSION_VARIANTS.items() if changes_nothing(o, base)), manifest_rule(manifest).mode)
    others, notes = [], []
    for name in names:
        if name not in FUSION_VARIANTS:
            sys.exit(f"--fusion-variants: unknown {name!r}; choose from {', '.join(FUSION_VARIANTS)}")
        if name == label:
            continue
        if name == "fitted" and fitted_rule(manifest) is None:
            notes.append(f"fusion variant fitted skipped: {repo} has no fitted fusion (export --fit-fusion VAL_FILE)")
            continue
        others.append(name)
    return label, others, notes


def variant_repository(repo: Path, name: str, dst: Path) -> Path:
    """``repo`` with only its configs rewritten to the fusion rule ``name`` (model files hard-linked)."""
    reconfigure_repository(repo, dst, RepoOptions(**{**base_options(repo), **FUSION_VARIANTS[name], "variants": []}))
    return dst


def with_variants(repo: Path, names: list[str], dst: Path) -> tuple[Path, str | None]:
    """``repo`` if it serves the deployment variants ``names``, else a config-only copy at ``dst`` that adds them."""
    have = list(read_manifest(repo).get("variants", {}))
    if set(names) <= set(have):
        return repo, None
    reconfigure_repository(repo, dst, RepoOptions(**{**base_options(repo), "variants": sorted({*have, *names})}))
    return dst, f"variants {', '.join(names)} served from a config-only copy of {repo} that adds them"


def served_quality(scorer: TritonScorer, target: str, feeds: dict[str, np.ndarray], labels: np.ndarray, label: str,
                   repo: Path, offline: OfflineReference) -> dict:
    """AUC, logloss and calibration of what ``target`` serves for the data rows (each once), and its largest
    difference from the offline reference fusion (``PARITY_TOL`` at most, else the benchmark stops)."""
    n = len(labels)
    rows = slice_feeds(feeds, 0, n)
    p = scorer.score(target, rows, 1024)
    diff = float(np.max(np.abs(p.astype(np.float64) - offline.predict(repo, target, rows))))
    if not diff <= PARITY_TOL:
        sys.exit(f"{target} on {repo}: served predictions differ from the reference fusion by {diff:.3g} (> {PARITY_TOL})")
    return dict(target=target, fusion=label, rule=manifest_rule(read_manifest(repo)).describe(), rows=n,
                auc=metrics.auc(labels, p), logloss=metrics.logloss(labels, p), calibration=metrics.calibration(labels, p),
                max_abs_diff=diff)


def config_threads(model_dir: Path) -> int:
    """intra_op_thread_count of a member's config.pbtxt (0 = ONNX Runtime's default)."""
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    return int(cfg.parameters["intra_op_thread_count"].string_value or 0) if "intra_op_thread_count" in cfg.parameters else 0


def measure(call, feeds: dict[str, np.ndarray], batch: int, n_requests: int, warmup: int, budget_s: float, on_start=None):
    """Sequential requests of ``batch`` rows (cycling through the data); (requests, rows/s, latencies ms).
    ``on_start`` is called between the warm-up and the measured requests."""
    n = feed_rows(feeds) - batch  # data is tiled so that every slice is full

    def rows(i):
        s = (i * batch) % max(n, 1)
        return slice_feeds(feeds, s, s + batch)

    for i in range(warmup):
        call(rows(i))
    if on_start is not None:
        on_start()
    lat = []
    t_start = time.perf_counter()
    for i in range(n_requests):
        x = rows(warmup + i)
        t0 = time.perf_counter()
        call(x)
        lat.append((time.perf_counter() - t0) * 1e3)
        if i >= 9 and time.perf_counter() - t_start > budget_s:
            break
    wall = time.perf_counter() - t_start
    return len(lat), batch * len(lat) / wall, np.asarray(lat, dtype=np.float64)


def load_rows(args, spec, max_batch: int) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    if args.data.is_file():
        arr, source = encode_file(args.data, spec), str(args.data)
    else:  # no demo data: rows from the project's synthetic generator, encoded the same way
        import tempfile

        from ctr_ensemble.data.synth import SynthConfig, generate

        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, open(os.devnull, "w") as devnull:
            with contextlib.redirect_stderr(devnull):  # the generator's progress bar
                generate(tmp, SynthConfig(splits={"test": 4096}))
            arr, source = encode_file(Path(tmp) / "test.tsv", spec), f"synthetic ({args.data} not found)"
    reps = -(-(len(arr) + max_batch) // len(arr))  # enough rows for any full slice
    feeds = {k: np.ascontiguousarray(np.concatenate([v] * reps)) for k, v in arr.feeds().items()}
    return feeds, arr.label.astype(np.int64), f"{source}, {len(arr)} rows"


def row_of(results, target, path, batch):
    return next((r for r in results if (r["target"], r["path"], r["batch"]) == (target, path, batch)), None)


def main() -> None:
    args = parse_args()
    if not (args.repository / "repository.json").is_file():
        sys.exit(f"no model repository at {args.repository}/ - run `make demo` first (or pass --repository PATH)")
    members = list(read_manifest(args.repository)["members"])
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    feeds, labels, data_desc = load_rows(args, repository_spec(args.repository), max(batches))
    own_label, other_rules, notes = fusion_variants(args.repository, [v.strip() for v in args.fusion_variants.split(",") if v.strip()])
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    calls = [c.strip() for c in args.grpc_calls.split(",") if c.strip() and c.strip() != "sync"]
    if set(calls) - set(CALLS):
        sys.exit(f"--grpc-calls: unknown {sorted(set(calls) - set(CALLS))}; choose from {', '.join(CALLS)}")
    external = bool(args.http_url or args.grpc_url)
    offline = OfflineReference()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo, note = (args.repository, None) if external else with_variants(args.repository, wanted, Path(tmp) / "model_repository")
        notes += [note] if note else []
        paths = [m for m in PATHS if (repo / m / "config.pbtxt").is_file()
                 and (m == ENSEMBLE_NAME or m in {VARIANT_MODELS[v] for v in wanted})]
        sessions = {}
        for m in members:
            threads = args.ort_threads if args.ort_threads is not None else config_threads(repo / m)
            sessions[m] = (onnx_export.session(repo / m / "1" / "model.onnx", threads=threads), threads)
        fused_onnx = repo / VARIANT_MODELS["all_onnx"] / "1" / "model.onnx"
        fused_sess = onnx_export.session(fused_onnx, threads=config_threads(fused_onnx.parents[1])) if fused_onnx.is_file() else None

        local = None if external else TritonServer(repo)
        with local or contextlib.nullcontext() as server:
            urls = {"http": args.http_url, "grpc": args.grpc_url} if external else {"http": server.http_url, "grpc": server.grpc_url}
            metrics_url = args.metrics_url if external else server.metrics_url
            scorers = {proto: TritonScorer(url, proto) for proto, url in urls.items() if url}
            for s in scorers.values():
                for model in [*members, *paths]:
                    s.check_ready(model)

            cells = []  # (target, path, call)
            for m in members:
                sess = sessions[m][0]
                cells.append((m, "onnx_inprocess", lambda x, sess=sess: sess.run(["prob"], x)))
            if fused_sess is not None:
                cells.append((VARIANT_MODELS["all_onnx"], "onnx_inprocess", lambda x: fused_sess.run(["prob"], x)))
            for proto, s in scorers.items():
                for model in [*members, *paths]:
                    cells.append((model, f"triton_{proto}", lambda x, s=s, model=model: s.infer(model, x)))
            if "grpc" in scorers:  # the other gRPC client calls, each on a client of its own
                for call in calls:
                    s = scorers[f"grpc_{call}"] = TritonScorer(urls["grpc"], "grpc")
                    for model in paths:
                        cells.append((model, f"triton_grpc_{call}", lambda x, s=s, model=model, call=call: s.infer_with(call, model, x)))

            results, stages = run_cells(cells, feeds, batches, args, metrics_url)
            keys = {} if external or not server.admin_key else {p: admin_headers(server.admin_key, p) for p in urls}
            results += perf_cells(args, repo, paths, feeds, batches, urls, Path(tmp) / "perf", notes, keys)
            scorer = next(iter(scorers.values()))
            quality = [served_quality(scorer, m, feeds, labels, own_label, repo, offline) for m in paths]
            for s in scorers.values():
                s.close()
        traced = [] if external or not args.trace_requests else trace_pass(repo, paths, feeds, args, Path(tmp) / "trace.json")
        if external and other_rules:
            notes.append(f"fusion variants {', '.join(other_rules)} not measured: they need a server started here")
            other_rules = []
        for name in other_rules:  # one server per other fusion rule, after the main one: never two at once
            with TritonServer(variant_repository(repo, name, Path(tmp) / f"model_repository-{name}")) as server:
                vrepo = server.repository
                vscorers = {proto: TritonScorer(url, proto) for proto, url in (("http", server.http_url), ("grpc", server.grpc_url))}
                for s in vscorers.values():
                    s.check_ready(ENSEMBLE_NAME)
                cells = [(f"{ENSEMBLE_NAME}[{name}]", f"triton_{proto}", lambda x, s=s: s.infer(ENSEMBLE_NAME, x))
                         for proto, s in vscorers.items()]
                r, st = run_cells(cells, feeds, batches, args, server.metrics_url)
                results, stages = results + r, stages + st
                quality.append(served_quality(vscorers["grpc"], ENSEMBLE_NAME, feeds, labels, name, vrepo, offline))
                for s in vscorers.values():
                    s.close()

    ratios = []  # each served path against the members in-process, per protocol and batch size
    for batch in batches:
        inproc = [row_of(results, m, "onnx_inprocess", batch) for m in members]
        floor_p50 = sum(r["p50_ms"] for r in inproc)
        floor_rps = 1.0 / sum(1.0 / r["rows_per_s"] for r in inproc)
        for target in paths:
            for proto in [*(f"triton_{p}" for p in scorers), "perf_analyzer_http", "perf_analyzer_grpc"]:
                r = row_of(results, target, proto, batch)
                if r is None:
                    continue
                ratios.append(dict(target=target, client=proto, batch=batch, p50_ms=r["p50_ms"], onnx_sum_p50_ms=floor_p50,
                                   p50_ratio=r["p50_ms"] / floor_p50, rows_per_s=r["rows_per_s"], onnx_rows_per_s=floor_rps,
                                   rows_per_s_ratio=r["rows_per_s"] / floor_rps))
    targets = target_checks(ratios, paths)
    report(args, results, ratios, targets, stages, traced, quality, sessions, data_desc,
           "external server" if external else "local tritonserver (started for this run)", own_label, notes)


# Issue targets for the default ensemble (docs/serving-speed.md), checked on every path and client of this run.
P50_TARGET_MS, ROWS_TARGET = 1.5, 0.8


def target_checks(ratios: list[dict], paths: list[str]) -> list[dict]:
    """Per served path and client: batch-1 p50 against ``P50_TARGET_MS``, batch-64 rows/s share of in-process
    against ``ROWS_TARGET``, and the batch-1 p50 against HTTP's (gRPC no slower than HTTP)."""
    out = []
    for target in paths:
        cells = {(r["client"], r["batch"]): r for r in ratios if r["target"] == target}
        for client in dict.fromkeys(c for c, _ in cells):
            b1, b64, http = cells.get((client, 1)), cells.get((client, 64)), cells.get(("triton_http", 1))
            row = dict(target=target, client=client, batch1_p50_ms=b1["p50_ms"] if b1 else float("nan"),
                       batch64_rows_per_s_ratio=b64["rows_per_s_ratio"] if b64 else float("nan"),
                       p50_vs_http_ratio=b1["p50_ms"] / http["p50_ms"] if b1 and http else float("nan"))
            row["meets"] = ", ".join(name for name, ok in (
                (f"p50<={P50_TARGET_MS:g}ms", row["batch1_p50_ms"] <= P50_TARGET_MS),
                (f"rows>={ROWS_TARGET:g}x", row["batch64_rows_per_s_ratio"] >= ROWS_TARGET),
                ("<=http", client != "triton_http" and row["p50_vs_http_ratio"] <= 1.0)) if ok) or "-"
            out.append(row)
    return out


def perf_cells(args, repo: Path, paths: list[str], feeds: dict[str, np.ndarray], batches: list[int], urls: dict,
               work: Path, notes: list[str], headers: dict[str, dict]) -> list[dict]:
    """perf_analyzer (Triton's C++ client) at concurrency 1 on every served path, protocol and batch size: the
    same server without the Python client's share. ``headers`` per protocol: the admin key (perf_analyzer reads
    the model config, an admin API). Skipped, with the reason in the notes, where it cannot run."""
    if not args.perf_analyzer:
        return []
    binary = perf.find_binary(None if args.perf_analyzer == "auto" else args.perf_analyzer)
    reason = perf.why_not_runnable(binary)
    if reason:
        notes.append(f"perf_analyzer cells skipped: {reason}")
        return []
    inputs = inputs_from_config(repo, ENSEMBLE_NAME)
    data = perf.write_input_data({i.name: feeds[i.name][:512] for i in inputs}, inputs, work / "input.json")
    out = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("perf_analyzer", total=len(paths) * len(batches) * len(urls))
        for batch in batches:
            for model in paths:
                for proto, url in urls.items():
                    progress.update(task, description=f"perf_analyzer {model} {proto} batch {batch}")
                    try:
                        r = perf.run(binary, model, url, proto, batch, 1, data, work, headers.get(proto), interval_ms=1000)
                    except CtrError as e:
                        notes.append(f"perf_analyzer {model} {proto} batch {batch}: {e}")
                        continue
                    finally:
                        progress.advance(task)
                    out.append(dict(target=model, path=f"perf_analyzer_{proto}", batch=batch, requests=float("nan"),
                                    rows_per_s=r.rows_per_s, p50_ms=r.p50_ms, p95_ms=r.p95_ms, p99_ms=r.p99_ms,
                                    mean_ms=float("nan"), server_ms=r.server_queue_ms + r.server_compute_ms,
                                    client_ms=float("nan")))
    return out


def trace_pass(repo: Path, paths: list[str], feeds: dict[str, np.ndarray], args, trace_file: Path) -> list[dict]:
    """``--trace-requests`` batch-1 requests per path and protocol on a server that traces every request; the
    median stage timeline per (path, protocol) (``serving.trace``). The warm-up requests are left out."""
    with TritonServer(repo, extra_args=triton_trace.trace_flags(trace_file)) as server:
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            s = TritonScorer(url, proto)
            for model in paths:
                s.check_ready(model)
                measure(lambda x: s.infer(model, x), feeds, 1, args.trace_requests, args.warmup, args.seconds)
            s.close()
    traces = triton_trace.load(trace_file)
    seen: dict[tuple, int] = {}
    kept = []
    for t in traces:  # in time order: each group's first ``warmup`` requests are its warm-up
        key = (t.model, t.protocol)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > args.warmup:
            kept.append(t)
    return triton_trace.summarize(kept)


def run_cells(cells, feeds, batches, args, metrics_url: str | None) -> tuple[list[dict], list[dict]]:
    """Every (target, path, call) cell at every batch size: requests, rows/s, p50/p95/p99, and for a Triton cell
    the server's per-model stages over the measured requests (metrics scraped before and after)."""
    results, stages = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=len(cells) * len(batches))
        for batch in batches:
            n_req = args.requests or (200 if batch < 512 else 50)
            for target, path, call in cells:
                progress.update(task, description=f"{target} {path} batch {batch}")
                served = bool(path.startswith("triton_") and metrics_url)
                before = {}
                n, rps, lat = measure(call, feeds, batch, n_req, args.warmup, args.seconds,
                                      on_start=(lambda: before.update(triton_metrics.scrape(metrics_url))) if served else None)
                q = np.percentile(lat, [50, 95, 99])
                row = dict(target=target, path=path, batch=batch, requests=n, rows_per_s=rps, p50_ms=q[0], p95_ms=q[1],
                           p99_ms=q[2], mean_ms=float(lat.mean()), server_ms=float("nan"), client_ms=float("nan"))
                if served:
                    base = target.split("[")[0]  # ctr_ensemble[tau1] is the model ctr_ensemble
                    costs = triton_metrics.diff(before, triton_metrics.scrape(metrics_url))
                    own = next((c for c in costs if c.model == base), None)
                    if own is not None:
                        row.update(server_ms=own.request_ms, client_ms=row["mean_ms"] - own.request_ms)
                    stages += [{"target": target, "path": path, "batch": batch, **c.as_dict()} for c in costs]
                results.append(row)
                progress.advance(task)
    return results, stages


def fmt(col: str, v) -> str:
    if not isinstance(v, float):
        return str(v)
    if col in ("auc", "logloss", "calibration"):
        return f"{v:.4f}"
    if col.endswith("_us"):
        return f"{v:,.0f}"
    if col == "max_abs_diff":
        return f"{v:.1e}"
    if v != v:  # NaN: not measured (in-process cells have no server side)
        return ""
    return f"{v:,.0f}" if col.endswith("rows_per_s") else f"{v:.2f}" if col.endswith("ratio") else f"{v:.3f}"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(args, results, ratios, targets, stages, traced, quality, sessions, data_desc, server_desc, own_label, notes) -> None:
    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"onnxruntime {ort.__version__}, {platform.system()} {platform.release()}")
    threads = ", ".join(f"{m}={t or 'default'}" for m, (_, t) in sessions.items())
    notes = [f"machine: {machine}", f"data: {data_desc}", f"server: {server_desc}",
             f"in-process ONNX Runtime intra-op threads: {threads}",
             "one client, sequential requests (concurrency 1); latencies in ms measured on the client; server_ms: the "
             "target's mean time inside Triton (its metrics), client_ms = mean_ms - server_ms",
             f"fusion of {ENSEMBLE_NAME}: the repository's own ({own_label}); {ENSEMBLE_NAME}[<variant>]: the same "
             "members with another fusion rule, served from a config-only copy", *notes]
    ratio_cols = list(ratios[0]) if ratios else []
    tables = [("Targets: batch-1 p50 <= 1.5 ms, batch-64 rows/s >= 0.8x in-process, gRPC no slower than HTTP "
               "(batch-1 p50 vs HTTP's), per served path and client", TARGET_COLUMNS, targets),
              ("Serving latency and throughput", COLUMNS, results),
              ("Serving cost: each served path over Triton vs the sum of the members in-process (ONNX Runtime)", ratio_cols, ratios),
              ("Where the time goes: per model the request ran through, ms per request (Triton metrics)", STAGE_COLUMNS, stages),
              ("Served quality over the data rows (calibration = mean predicted / observed CTR; max_abs_diff: against the "
               "reference fusion computed offline)", FUSION_COLUMNS, quality),
              ("Timeline of one batch-1 request, median µs per stage (Triton trace API, every request traced)",
               TRACE_COLUMNS, traced)]
    files = ("serve_targets.csv", "serve.csv", "serve_ratios.csv", "serve_stages.csv", "serve_fusion.csv", "serve_trace.csv")

    for line in notes:
        console.print(f"[dim]{escape(line)}[/dim]")
    for title, cols, rows in tables:
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="left" if c in ("target", "path", "client", "protocol", "stage", "model") else "right")
        for r in rows:
            t.add_row(*(escape(fmt(c, r[c])) for c in cols))  # ctr_ensemble[tau1] is not rich markup
        console.print(t)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, (_, cols, rows) in zip(files, tables):
        with open(args.out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({c: (round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in cols} for r in rows)
    md = ["# Serving benchmark", "", *[f"- {line}" for line in notes], ""]
    for title, cols, rows in tables:
        md += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        md += ["| " + " | ".join(fmt(c, r[c]) for c in cols) + " |" for r in rows] + [""]
    (args.out / "serve.md").write_text("\n".join(md))
    console.print(f"wrote {', '.join(str(args.out / n) for n in files)} and {args.out / 'serve.md'}")


if __name__ == "__main__":
    main()

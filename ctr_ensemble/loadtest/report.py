"""``latency_vs_auc.{csv,md,png}`` and ``server_metrics.csv`` from a sweep."""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path

from ctr_ensemble.loadtest.stats import pareto_front

# The columns, in this order; the rest follow.
COLUMNS = ["variant", "protocol", "users", "rps", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "served_auc", "offline_auc"]
EXTRA = ["max_ms", "served_logloss", "offline_logloss", "served_ne", "offline_ne", "ne_base", "served_calibration",
         "offline_calibration", "served_ece", "offline_ece", "max_abs_diff", "mismatched_rows", "coverage", "errors_by_kind", "requests",
         "steady_requests", "window_s", "rows_per_request", "model", "options", "server_ms", "server_queue_ms",
         "server_compute_ms", "pa_rps", "pa_rows_per_s", "pa_p50_ms", "pa_p90_ms", "pa_p95_ms", "pa_p99_ms",
         "pa_server_queue_ms", "pa_server_compute_ms", "pareto", "status", "locust_exit", "note", "pa_note"]
SERVER_COLUMNS = ["variant", "protocol", "users", "model", "requests", "failures", "avg_batch", "request_ms", "queue_ms", "compute_ms"]


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def mark_pareto(rows: list[dict]) -> None:
    measured = [r for r in rows if r.get("status") == "ok" and not r.get("errors")]
    front = pareto_front([r["p99_ms"] for r in measured], [r.get("served_auc") for r in measured])
    for r in rows:
        r["pareto"] = False
    for r, f in zip(measured, front):
        r["pareto"] = f


def write_csv(rows: list[dict], path: Path, cols: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


def write_report(rows: list[dict], server_rows: list[dict], out: Path, context: dict) -> dict[str, Path]:
    """Write the CSVs, the Markdown and the PNG; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    mark_pareto(rows)
    paths = {"csv": out / "latency_vs_auc.csv", "md": out / "latency_vs_auc.md", "png": out / "latency_vs_auc.png",
             "server_csv": out / "server_metrics.csv"}
    write_csv(rows, paths["csv"], COLUMNS + EXTRA)
    write_csv(server_rows, paths["server_csv"], SERVER_COLUMNS)
    paths["md"].write_text(render_markdown(rows, server_rows, context))
    plot(rows, paths["png"])
    return paths


def render_markdown(rows: list[dict], server_rows: list[dict], context: dict) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    other = [r for r in rows if r.get("status") != "ok"]
    parts = ["# Load test: latency vs AUC", ""]
    parts += [f"- {k}: {v}" for k, v in {"machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
                                          **context}.items()]
    parts += ["", "Latency percentiles over the steady-state window (warm-up dropped), raw float ms measured by the "
              "Locust users around each `infer`; AUC over every row served, against the offline reference of the same rows, "
              "likewise `served_ne` (normalised entropy: logloss / entropy of the base rate, the training CTR when the "
              "feature spec records it, `ne_base` in the CSV) and `served_calibration` (mean predicted / observed CTR); "
              "`errors` = failed requests + requests whose predictions differ from offline by more than 1e-5. "
              "`pareto`: no other run is both faster at p99 and better in served AUC.", "",
              "## Locust", "", markdown_table(ok, COLUMNS + ["served_ne", "served_calibration", "max_ms", "max_abs_diff", "coverage", "pareto"])]
    if other:
        parts += ["", "## Not measured", "", markdown_table(other, ["variant", "model", "status", "note"])]
    pa = [r for r in ok if "pa_p50_ms" in r]
    if pa:
        for r in pa:
            r["p50_gap"] = r["p50_ms"] / r["pa_p50_ms"] if r["pa_p50_ms"] else float("nan")
            r["rps_gap"] = r["rps"] / r["pa_rps"] if r.get("pa_rps") else float("nan")
        parts += ["", "## Locust vs perf_analyzer (same rows, rows per request and concurrency)", "",
                  markdown_table(pa, ["variant", "protocol", "users", "rps", "pa_rps", "rps_gap", "p50_ms", "pa_p50_ms",
                                      "p50_gap", "p99_ms", "pa_p99_ms", "server_ms"]),
                  "", "`rps_gap` = Locust / perf_analyzer requests per second, `p50_gap` = Locust / perf_analyzer p50; "
                  "`server_ms` = Triton's mean in-server time per request during the Locust run "
                  "(`nv_inference_request_duration_us`), so p50 − server_ms is roughly the client and transport share."]
    elif any(r.get("pa_note") for r in ok):
        parts += ["", f"perf_analyzer: {next(r['pa_note'] for r in ok if r.get('pa_note'))}"]
    if server_rows:
        parts += ["", "## Where time goes inside Triton (Prometheus metrics, after − before each run; ms per request)", "",
                  "`queue_ms`: waiting in the model's scheduler (dynamic batcher, busy instances); `compute_ms`: input + "
                  "infer + output; `avg_batch`: rows per execution, what dynamic batching formed from "
                  "concurrent requests. An ensemble's own row is its end-to-end time; its steps run members in parallel.", "",
                  markdown_table(server_rows, SERVER_COLUMNS)]
    return "\n".join(parts) + "\n"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("status") == "ok" and r.get("served_auc") is not None and not r.get("errors")]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    variants = sorted({r["variant"] for r in pts})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    markers = {"grpc": "o", "http": "s"}
    for r in pts:
        ax.scatter(r["p99_ms"], r["served_auc"], color=colors[r["variant"]], marker=markers.get(r["protocol"], "^"),
                   s=30 + 12 * int(r["users"]), alpha=0.8, edgecolors="none")
        ax.annotate(f"{r['users']}u", (r["p99_ms"], r["served_auc"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["p99_ms"])
    if front:
        xs = [r["p99_ms"] for r in front]
        ys = [r["served_auc"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1, ls="--", label="Pareto front")
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=160, lw=1.2)
    for v in variants:
        ax.scatter([], [], color=colors[v], label=v)
    for p, m in markers.items():
        ax.scatter([], [], color="grey", marker=m, label=p)
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency (ms, client side, log scale)")
    ax.set_ylabel("served AUC")
    ax.set_title("Latency vs AUC under load (marker size = concurrent users)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

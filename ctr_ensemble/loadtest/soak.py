"""Soak: hold a Locust load on the ensemble for a long time and check that nothing degrades.

One Locust process per protocol (gRPC and HTTP by default) runs concurrently against one server
for ``duration_s`` or until the request bound is reached, whichever comes first. Every answer is
checked against the offline reference (a prediction further than 1e-5 is a ``mismatch`` error).
Meanwhile a sampler reads the resident memory (VmRSS) of ``tritonserver`` and of each backend
stub it started (the Python fusion model and, with the Python-based onnxruntime backend, every
member), every ``sample_s`` seconds.

Reported (``soak.json``, ``soak.md``, ``soak_windows.csv``, ``rss.csv``, ``soak.png``):

- requests served and errors by kind (the soak fails when there is any);
- p50/p99 per window (default one minute) per protocol, and the **p99 drift**: p99 of the last
  window minus p99 of the first, in ms and as a ratio;
- RSS at start (server ready, before load), after the first window (allocators and caches warm),
  and at the end; the growth after the first window, also per hour, is the leak check.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.repository import ENSEMBLE_NAME
from ctr_ensemble.loadtest import stats
from ctr_ensemble.loadtest.report import markdown_table
from ctr_ensemble.loadtest.rows import OfflineReference, load_rows
from ctr_ensemble.loadtest.sweep import (LOCUSTFILE, PROTOCOLS, Target, model_inputs, run_locust, save_rows,
                                         scrape_or_none, started, write_run_config)
from ctr_ensemble.serving import metrics
from ctr_ensemble.serving.supervisor import stub_pids

WINDOW_COLUMNS = ["protocol", "window", "t_from_s", "requests", "errors", "rps", "p50_ms", "p99_ms", "host_load1", "server_cpu"]
RSS_COLUMNS = ["t_s", "server_mb", "stubs_mb", "n_stubs", "total_mb", "cpu_s", "host_load1"]


@dataclass
class SoakConfig:
    model: str = ENSEMBLE_NAME
    duration_s: float = 600.0
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    users: int = 2  # per protocol; each protocol gets its own Locust process
    rows_per_request: int = 64
    max_rows: int = 8192  # held-out rows cycled through
    max_requests: int = 2_000_000  # bound over all protocols; the run stops when it is reached
    window_s: float = 60.0  # p99 drift compares the first and last window of this length
    sample_s: float = 5.0  # RSS sampling period
    timeout_s: float = 10.0  # per-request client timeout
    rss_warn_mb: float = 100.0  # growth after the first window above this is flagged as a suspected leak

    def validate(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise CtrError(f"soak protocols must be among {', '.join(PROTOCOLS)}, got {', '.join(self.protocols) or 'none'}")
        for name in ("duration_s", "window_s", "sample_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise CtrError(f"soak {name} must be > 0, got {getattr(self, name)}")
        for name in ("users", "rows_per_request", "max_rows"):
            if getattr(self, name) < 1:
                raise CtrError(f"soak {name} must be >= 1, got {getattr(self, name)}")
        if self.max_requests < len(self.protocols):
            raise CtrError(f"soak max_requests must allow at least one request per protocol, got {self.max_requests}")
        if self.window_s * 2 > self.duration_s:
            raise CtrError(f"soak duration ({self.duration_s:g}s) must hold two windows of {self.window_s:g}s "
                           "to compare the first with the last")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_sample(server_pid: int) -> dict:
    """RSS in MB of the server process and of each backend stub it started right now, their CPU seconds so
    far, and the host's 1-minute load average (on a shared machine, other jobs explain latency drift)."""
    stubs_pids = list(stub_pids(server_pid))
    server = _rss_mb(server_pid)
    stubs = [r for r in (_rss_mb(p) for p in stubs_pids) if r is not None]
    return {"t": time.time(), "server_mb": server, "stubs_mb": sum(stubs), "n_stubs": len(stubs),
            "total_mb": (server or 0.0) + sum(stubs) if server is not None else None,
            "cpu_s": _cpu_s(server_pid) + sum(_cpu_s(p) for p in stubs_pids), "host_load1": os.getloadavg()[0]}


class _Sampler(threading.Thread):
    def __init__(self, pid: int, period: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.samples.append(memory_sample(self.pid))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def window_rows(res: dict[str, np.ndarray], protocol: str, t0: float, window_s: float) -> list[dict]:
    """One row per window of ``window_s`` from ``t0`` (by send time): requests, errors, rps, p50/p99 ms."""
    t, ok, lat = res["t_start"], res["ok"].astype(bool), res["latency_ms"]
    if not len(t):
        return []
    k = np.floor((t - t0) / window_s).astype(int)
    out = []
    for w in range(int(k.max()) + 1):
        sel = k == w
        good = lat[sel & ok]
        out.append({"protocol": protocol, "window": w + 1, "t_from_s": round(w * window_s, 3), "requests": int(sel.sum()),
                    "errors": int((sel & ~ok).sum()), "rps": round(float((sel & ok).sum()) / window_s, 3),
                    "p50_ms": float(np.percentile(good, 50)) if len(good) else float("nan"),
                    "p99_ms": float(np.percentile(good, 99)) if len(good) else float("nan")})
    return out


def add_host_context(windows: list[dict], samples: list[dict], t0: float, window_s: float) -> None:
    """Per window: the mean host load average and the server's CPU use (cores busy, server + stubs) from the
    samples in it, so a latency change can be told apart from other jobs on the machine."""
    for w in windows:
        lo = t0 + w["t_from_s"]
        inside = [x for x in samples if lo <= x["t"] < lo + window_s]
        w["host_load1"] = round(float(np.mean([x["host_load1"] for x in inside])), 2) if inside else None
        w["server_cpu"] = (round((inside[-1]["cpu_s"] - inside[0]["cpu_s"]) / (inside[-1]["t"] - inside[0]["t"]), 2)
                           if len(inside) > 1 else None)


def p99_drift(res: dict[str, np.ndarray], window_s: float) -> dict:
    """p99 of successful requests sent in the first ``window_s`` vs the last ``window_s`` of the run."""
    t, ok, lat = res["t_start"], res["ok"].astype(bool), res["latency_ms"]
    if not ok.any():
        return {"first_p99_ms": None, "last_p99_ms": None, "p99_drift_ms": None, "p99_drift_ratio": None}
    first = lat[ok & (t < t[ok].min() + window_s)]
    last = lat[ok & (t >= t[ok].max() - window_s)]
    a, b = float(np.percentile(first, 99)), float(np.percentile(last, 99))
    return {"first_p99_ms": a, "last_p99_ms": b, "p99_drift_ms": b - a, "p99_drift_ratio": b / a if a > 0 else None,
            "first_requests": int(len(first)), "last_requests": int(len(last))}


def _rss_summary(start: dict | None, samples: list[dict], end: dict | None, t_load: float, window_s: float,
                 warn_mb: float) -> dict:
    if start is None or start["total_mb"] is None:
        return {"rss": "not measured (server process unknown: pass --server-pid for a server started elsewhere)"}
    warm = next((s for s in samples if s["t"] >= t_load + window_s and s["total_mb"] is not None), None)
    out = {"rss_start_mb": start["total_mb"], "rss_server_start_mb": start["server_mb"], "rss_stubs_start_mb": start["stubs_mb"],
           "n_stubs": start["n_stubs"]}
    if end is not None and end["total_mb"] is not None:
        out.update(rss_end_mb=end["total_mb"], rss_server_end_mb=end["server_mb"], rss_stubs_end_mb=end["stubs_mb"],
                   rss_growth_mb=end["total_mb"] - start["total_mb"])
        if warm is not None:
            hours = max(end["t"] - warm["t"], 1e-9) / 3600
            growth = end["total_mb"] - warm["total_mb"]
            out.update(rss_after_first_window_mb=warm["total_mb"], rss_growth_after_first_window_mb=growth,
                       rss_growth_mb_per_hour=growth / hours, leak_suspected=growth > warn_mb)
    return out


def run_soak(cfg: SoakConfig, repo: Path, data: Path, out: Path, *, target: Target | None = None, server_pid: int | None = None,
             locustfile: Path = LOCUSTFILE, fmt: str = "auto", console: Console | None = None) -> dict:
    """Run the soak and write its report into ``out``; returns the summary (also ``out/soak.json``)."""
    cfg.validate()
    console = console or Console()
    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # results of an earlier soak must not be counted again
    work.mkdir(parents=True)
    own = target is None
    tgt = started(Path(repo), work / "tritonserver.log") if own else target
    try:
        pid = server_pid or (tgt.server.pid if tgt.server is not None else None)
        inputs = model_inputs(tgt, cfg.model)
        rows = load_rows(Path(data), Path(repo), cfg.model, inputs, cfg.max_rows, fmt)
        rfile = save_rows(rows, work / "rows.npz")
        offline = OfflineReference().predict(Path(repo), cfg.model, rows)
        per_process = cfg.max_requests // len(cfg.protocols)
        confs = {p: write_run_config(work / p / "config.json", http_url=tgt.http_url, grpc_url=tgt.grpc_url, model=cfg.model,
                                     rows_file=str(rfile), inputs=inputs, rows_per_request=cfg.rows_per_request,
                                     timeout_s=cfg.timeout_s, max_requests=per_process, results_dir=str(work / p / "results"))
                 for p in cfg.protocols}
        rss_start = memory_sample(pid) if pid else None
        before = scrape_or_none(tgt)
        sampler = _Sampler(pid, cfg.sample_s) if pid else None
        if sampler:
            sampler.start()
        console.print(f"[bold]soak[/] {cfg.model}: {', '.join(cfg.protocols)} × {cfg.users} users for {cfg.duration_s:g}s "
                      f"(bound {cfg.max_requests:,} requests), {cfg.rows_per_request} rows/request"
                      + (f", server RSS {rss_start['total_mb']:.0f} MB" if rss_start and rss_start["total_mb"] else ""))
        t_load = time.time()
        codes: dict[str, tuple[int, str]] = {}
        threads = [threading.Thread(target=lambda p=p: codes.__setitem__(
            p, run_locust(confs[p], p, cfg.users, 0, cfg.duration_s, locustfile, grace_s=max(60.0, cfg.timeout_s * 3))))
            for p in cfg.protocols]
        for th in threads:
            th.start()
        _progress(threads, cfg.duration_s, t_load, console)
        elapsed = time.time() - t_load
        alive = tgt.alive()
        if sampler:
            sampler.stop()
        rss_end = memory_sample(pid) if pid and alive else None
        after = scrape_or_none(tgt)
    finally:
        if own:
            tgt.server.stop()

    per_proto = {p: stats.load_results(work / p / "results") for p in cfg.protocols}
    summary = {"model": cfg.model, "config": asdict(cfg), "seconds": round(elapsed, 1), "server_alive": alive,
               "locust_exit": {p: c[0] for p, c in codes.items()}}
    windows: list[dict] = []
    t0 = min((float(r["t_start"].min()) for r in per_proto.values() if len(r["t_start"])), default=t_load)
    proto_rows = []
    for p, res in per_proto.items():
        if not len(res["t_start"]):
            proto_rows.append({"protocol": p, "requests": 0, "errors": 0, "rows_served": 0})
            continue
        s = stats.summarize(res, rows["label"], offline, warmup_s=0.0)
        proto_rows.append({"protocol": p, **{k: s[k] for k in ("requests", "errors", "rows_served", "errors_by_kind", "rps",
                                                               "p50_ms", "p99_ms")},
                           **p99_drift(res, cfg.window_s),
                           **{k: s[k] for k in ("served_auc", "offline_auc", "max_abs_diff")}})
        windows += window_rows(res, p, t0, cfg.window_s)
    summary["protocols"] = proto_rows
    for key in ("requests", "errors", "rows_served"):
        summary[key] = sum(r[key] for r in proto_rows)
    summary["stopped_by"] = "request bound" if summary["requests"] >= per_process * len(cfg.protocols) else "time"
    if before is not None and after is not None:
        own_cost = next((c for c in metrics.diff(before, after) if c.model == cfg.model), None)
        summary["server_requests_success"] = own_cost.requests if own_cost else 0
        summary["server_requests_failure"] = own_cost.failures if own_cost else 0
    samples = sampler.samples if sampler else []
    add_host_context(windows, samples, t0, cfg.window_s)
    summary.update(_rss_summary(rss_start, samples, rss_end, t_load, cfg.window_s, cfg.rss_warn_mb))
    summary["passed"] = bool(alive and summary["requests"] > 0 and summary["errors"] == 0)
    _write(out, summary, windows, ([rss_start] if rss_start else []) + samples + ([rss_end] if rss_end else []), t_load)
    return summary


def _progress(threads: list[threading.Thread], duration_s: float, t_load: float, console: Console) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=int(duration_s), desc="soak", unit="s", leave=False) as bar:
        while any(th.is_alive() for th in threads):
            time.sleep(1.0)
            bar.n = min(int(time.time() - t_load), int(duration_s))
            bar.refresh()
    for th in threads:
        th.join()


def _write(out: Path, summary: dict, windows: list[dict], samples: list[dict], t_load: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(summary, indent=2, default=float))
    with open(out / "soak_windows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=WINDOW_COLUMNS)
        w.writeheader()
        w.writerows(windows)
    rss_rows = [{"t_s": round(s["t"] - t_load, 2), **{k: s[k] for k in RSS_COLUMNS[1:]}} for s in samples]
    with open(out / "rss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RSS_COLUMNS)
        w.writeheader()
        w.writerows(rss_rows)
    (out / "soak.md").write_text(render_markdown(summary, windows))
    plot(windows, rss_rows, out / "soak.png")


def _mb(summary: dict, key: str) -> str:
    v = summary.get(key)
    return f"{v:,.1f} MB" if isinstance(v, (int, float)) else "n/a"


def render_markdown(summary: dict, windows: list[dict]) -> str:
    c = summary["config"]
    verdict = "PASS" if summary["passed"] else "FAIL"
    lines = [
        f"# Soak: {summary['model']} — {verdict}", "",
        f"{', '.join(c['protocols'])} × {c['users']} Locust users each, {c['rows_per_request']} rows/request, "
        f"{summary['seconds']:g} s (asked {c['duration_s']:g} s, bound {c['max_requests']:,} requests; stopped by "
        f"{summary['stopped_by']}). Server alive at the end: {summary['server_alive']}.", "",
        f"- requests served: {summary['requests']:,} ({summary['rows_served']:,} rows); errors: {summary['errors']}"
        + (f"; Triton counted {summary['server_requests_success']:,} successful / {summary['server_requests_failure']} failed"
           if "server_requests_success" in summary else ""),
        f"- server RSS (tritonserver + {summary.get('n_stubs', '?')} stubs): start {_mb(summary, 'rss_start_mb')}, "
        f"after the first window {_mb(summary, 'rss_after_first_window_mb')}, end {_mb(summary, 'rss_end_mb')}; "
        f"growth after the first window {_mb(summary, 'rss_growth_after_first_window_mb')}"
        + (f" ({summary['rss_growth_mb_per_hour']:,.1f} MB/hour)" if "rss_growth_mb_per_hour" in summary else "")
        + (" — **leak suspected**" if summary.get("leak_suspected") else ""),
        "", "## Per protocol", "",
        markdown_table(summary["protocols"], ["protocol", "requests", "errors", "rps", "p50_ms", "p99_ms", "first_p99_ms",
                                              "last_p99_ms", "p99_drift_ms", "p99_drift_ratio", "served_auc", "offline_auc"]),
        "", f"## Per window of {c['window_s']:g} s", "",
        "`host_load1`: the machine's 1-minute load average; `server_cpu`: cores busy in tritonserver + its stubs. "
        "Latency that rises with the host load while the server's CPU stays flat comes from other jobs, not the server.",
        "", markdown_table(windows, WINDOW_COLUMNS), "",
    ]
    return "\n".join(lines)


def plot(windows: list[dict], rss_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i, p in enumerate(sorted({w["protocol"] for w in windows})):
        ws = [w for w in windows if w["protocol"] == p]
        width = ws[1]["t_from_s"] - ws[0]["t_from_s"] if len(ws) > 1 else 0.0
        x = [(w["t_from_s"] + width / 2) / 60 for w in ws]  # a window's figure sits at its middle
        ax1.plot(x, [w["p99_ms"] for w in ws], "o-", color=f"C{i}", label=f"{p} p99")
        ax1.plot(x, [w["p50_ms"] for w in ws], "s--", color=f"C{i}", label=f"{p} p50", alpha=0.6)
    ax1.set_ylabel("latency per window (ms)")
    ax1.set_title("Soak: client latency and server memory over time")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    if rss_rows:
        x = [r["t_s"] / 60 for r in rss_rows]
        ax2.plot(x, [r["total_mb"] for r in rss_rows], "-", label="tritonserver + stubs")
        ax2.plot(x, [r["server_mb"] for r in rss_rows], "--", label="tritonserver")
        ax2.legend(fontsize=8, loc="center left")
        ax3 = ax2.twinx()  # other jobs on the machine explain latency changes the server did not cause
        ax3.plot(x, [r["host_load1"] for r in rss_rows], ":", color="grey", label="host load (1 min)")
        ax3.set_ylabel("host load average")
        ax3.set_ylim(bottom=0)
        ax3.legend(fontsize=8, loc="center right")
    ax2.set_xlabel("minutes since the load started")
    ax2.set_ylabel("RSS (MB)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

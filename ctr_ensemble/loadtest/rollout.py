"""A rollout under load: Locust users on the ensemble while ``deploy`` (and then ``rollback``) switch releases.

Every answer is checked against two offline predictions of its rows: the old release's and the new one's
(``OfflineReference`` over each export's files). An answer is *old*, *new*, or a mismatch (an error); a request
sent after a switch returned must come from the release switched to (else an ``order`` error). The report gives
requests, errors, p99 overall and in the switch window (1 s either side of each switch), and the switch times.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.repository import ENSEMBLE_NAME
from ctr_ensemble.loadtest import stats
from ctr_ensemble.loadtest.report import markdown_table
from ctr_ensemble.loadtest.rows import OfflineReference, load_rows
from ctr_ensemble.loadtest.sweep import LOCUSTFILE, Target, model_inputs, run_locust, save_rows, write_run_config
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.serving import deploy as dep

WINDOW_S = 1.0  # seconds either side of a switch that count as "during the switch"


@dataclass
class RolloutConfig:
    users: int = 4  # per protocol
    protocols: tuple[str, ...] = ("grpc", "http")
    hold_s: float = 10.0  # seconds of load before the deploy, between the switches and after the last one
    rollback: bool = True  # roll back to the old release after the deploy
    max_duration_s: float = 600.0  # Locust's own time limit, a safety net: the run ends when the steps are done
    rows_per_request: int = 16
    max_rows: int = 4096
    timeout_s: float = 30.0

    def validate(self) -> None:
        if not 0 < self.hold_s and 3 * self.hold_s < self.max_duration_s:
            raise CtrError(f"hold {self.hold_s}s: must be positive and leave room inside {self.max_duration_s}s")


def classify(res: dict[str, np.ndarray], n_rows: int, refs: dict[str, np.ndarray], tol: float = PARITY_TOL) -> np.ndarray:
    """Per request: the name of the reference every row of its answer matches, ``""`` if none, ``"failed"``."""
    ok = res["ok"].astype(bool)
    out = np.full(len(ok), "failed", dtype=object)
    starts, sizes = res["row_start"][ok].astype(np.int64), res["n_rows"][ok].astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    pred = res["pred"].astype(np.float64)
    for j, (i, s) in enumerate(zip(np.flatnonzero(ok), starts)):
        idx = (s + np.arange(sizes[j])) % n_rows
        p = pred[bounds[j]:bounds[j + 1]]
        out[i] = next((name for name, ref in refs.items() if np.all(np.abs(p - ref[idx]) <= tol)), "")
    return out


def _p99(lat: np.ndarray) -> float:
    return float(np.percentile(lat, 99)) if len(lat) else float("nan")


def run_rollout(cfg: RolloutConfig, target: Target, new_export: Path, data: Path, out: Path, fmt: str = "auto",
                console: Console | None = None) -> dict:
    """Load ``target`` (serving ``target.repository``), deploy ``new_export`` and maybe roll back, mid-load."""
    cfg.validate()
    console = console or Console()
    repo, out = Path(target.repository), Path(out)
    work = out / "work"
    inputs = model_inputs(target, ENSEMBLE_NAME)
    rows = load_rows(Path(data), repo, ENSEMBLE_NAME, inputs, cfg.max_rows, fmt)
    refs = {"old": OfflineReference().predict(repo, ENSEMBLE_NAME, rows),
            "new": OfflineReference().predict(Path(new_export), ENSEMBLE_NAME, rows)}
    gap = float(np.max(np.abs(refs["old"] - refs["new"])))
    if not gap > 10 * PARITY_TOL:
        raise CtrError(f"{new_export}: predicts the same as the served release (max |Δ| {gap:.2g}); "
                       "a rollout test needs releases that answer differently")
    rfile = save_rows(rows, work / "rows.npz")
    stop_file = work / "stop"
    stop_file.unlink(missing_ok=True)
    confs = {p: write_run_config(work / p / "config.json", http_url=target.http_url, grpc_url=target.grpc_url,
                                 model=ENSEMBLE_NAME, rows_file=str(rfile), inputs=inputs,
                                 rows_per_request=cfg.rows_per_request, timeout_s=cfg.timeout_s,
                                 max_requests=1 << 40, results_dir=str(work / p / "results"), stop_file=str(stop_file))
             for p in cfg.protocols}
    for p in cfg.protocols:
        for f in (work / p / "results").glob("results-*.npz"):
            f.unlink()
    codes: dict[str, tuple[int, str]] = {}
    threads = [threading.Thread(target=lambda p=p: codes.__setitem__(
        p, run_locust(confs[p], p, cfg.users, 0, cfg.max_duration_s, LOCUSTFILE, grace_s=max(60.0, 3 * cfg.timeout_s))))
        for p in cfg.protocols]
    t0 = time.time()
    for th in threads:
        th.start()
    switches = []
    try:
        for action in ["deploy"] + (["rollback"] if cfg.rollback else []):
            time.sleep(cfg.hold_s)  # load on the release in place before each switch
            t_call = time.time()
            if action == "deploy":
                r = dep.deploy(new_export, repo, target.http_url, target.admin_key)
            else:
                r = dep.rollback(repo, target.http_url, target.admin_key)
            r.update(action=action, started_unix=t_call, returned_unix=time.time(),
                     serves="new" if action == "deploy" else "old")
            console.print(f"[bold]{action}[/] at {t_call - t0:.1f}s: release {r['from_release']} → {r['release']} "
                          f"(load {r['load_s']:.2f}s, switch {r['switch_s']:.2f}s)")
            switches.append(r)
        time.sleep(cfg.hold_s)  # and on the release switched to
    finally:
        stop_file.touch()
    for th in threads:
        th.join()
    return _summarize(cfg, work, rows, refs, switches, codes, t0, out, target)


def _summarize(cfg, work, rows, refs, switches, codes, t0, out: Path, target: Target) -> dict:
    proto_rows, by_release = [], {"old": 0, "new": 0}
    all_lat, window_lat = [], []
    for p in cfg.protocols:
        res = stats.load_results(work / p / "results")
        kind = classify(res, len(rows["label"]), refs)
        t_start, lat = res["t_start"], res["latency_ms"]
        # A request sent after a switch returned is answered by the release it switched to (until the next one).
        expected = np.full(len(t_start), "old", dtype=object)
        unknown = np.zeros(len(t_start), bool)  # sent while a switch was in progress: either release is right
        for s in switches:
            unknown |= (t_start >= s["started_unix"]) & (t_start < s["returned_unix"])
            expected[t_start >= s["returned_unix"]] = s["serves"]
        answered = (kind != "failed")
        order = answered & ~unknown & (kind != "") & (kind != expected)
        failed, mismatched = int((~answered).sum()), int((answered & (kind == "")).sum())
        errors_by_kind = dict(sorted({**{str(e): int(c) for e, c in zip(*np.unique(res["error"][~answered].astype(str),
                                                                                    return_counts=True))},
                                      **({"mismatch": mismatched} if mismatched else {}),
                                      **({"order": int(order.sum())} if order.any() else {})}.items()))
        in_window = np.zeros(len(t_start), bool)
        for s in switches:
            in_window |= (t_start + lat / 1e3 >= s["started_unix"] - WINDOW_S) & (t_start <= s["returned_unix"] + WINDOW_S)
        good = answered & (kind != "")
        all_lat.append(lat[good])
        window_lat.append(lat[good & in_window])
        for k in by_release:
            by_release[k] += int((kind == k).sum())
        proto_rows.append({"protocol": p, "requests": int(len(t_start)), "errors": failed + mismatched + int(order.sum()),
                           "answered_old": int((kind == "old").sum()), "answered_new": int((kind == "new").sum()),
                           "p50_ms": float(np.percentile(lat[good], 50)) if good.any() else float("nan"),
                           "p99_ms": _p99(lat[good]), "p99_switch_ms": _p99(lat[good & in_window]),
                           "requests_in_switch_window": int(in_window.sum()), "errors_by_kind": errors_by_kind,
                           "locust_exit": codes.get(p, (None,))[0]})
    summary = {"config": asdict(cfg), "switches": [dict(s) for s in switches],
               "requests": sum(r["requests"] for r in proto_rows), "errors": sum(r["errors"] for r in proto_rows),
               "answered": by_release, "p99_ms": _p99(np.concatenate(all_lat)),
               "p99_switch_ms": _p99(np.concatenate(window_lat)), "protocols": proto_rows,
               "server_alive": target.alive(), "max_abs_diff_old_new": float(np.max(np.abs(refs["old"] - refs["new"])))}
    for s in summary["switches"]:
        s["at_s"] = round(s["started_unix"] - t0, 2)
    summary["passed"] = bool(summary["errors"] == 0 and summary["server_alive"] and by_release["old"] and by_release["new"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "rollout.md").write_text(render_markdown(summary))
    return summary


def render_markdown(s: dict) -> str:
    cfg = s["config"]
    lines = ["# Rollout under load (`make rollout`)", "",
             f"{cfg['users']} Locust users per protocol ({', '.join(cfg['protocols'])}), {cfg['rows_per_request']} rows "
             f"per request; {cfg['hold_s']:g} s of load, then `ctr-ensemble deploy`, {cfg['hold_s']:g} s"
             + (f", `ctr-ensemble rollback`, {cfg['hold_s']:g} s" if cfg["rollback"] else "")
             + ". Every answer is compared with the old and the new release's offline predictions of its rows "
               f"(max |Δ| between the two: {s['max_abs_diff_old_new']:.3g}).", "",
             f"**{s['requests']:,} requests, {s['errors']} errors**; answered by the old release {s['answered']['old']:,}, "
             f"by the new {s['answered']['new']:,}; p99 {s['p99_ms']:.1f} ms overall, {s['p99_switch_ms']:.1f} ms "
             f"within {WINDOW_S:g} s of a switch. {'PASSED' if s['passed'] else 'FAILED'}.", "",
             markdown_table([{**r, "errors_by_kind": ", ".join(f"{k} {v}" for k, v in r["errors_by_kind"].items()) or "–"}
                             for r in s["protocols"]],
                            ["protocol", "requests", "errors", "answered_old", "answered_new", "p50_ms", "p99_ms",
                             "p99_switch_ms", "requests_in_switch_window", "errors_by_kind"]), "",
             "| switch | at (s) | release | load new models (s) | ensemble reload (s) | total (s) |",
             "|---|---|---|---|---|---|"]
    for w in s["switches"]:
        lines.append(f"| {w['action']} | {w['at_s']:.1f} | {w['from_release']} → {w['release']} | {w['load_s']:.2f} | "
                     f"{w['switch_s']:.2f} | {w['total_s']:.2f} |")
    return "\n".join(lines) + "\n"

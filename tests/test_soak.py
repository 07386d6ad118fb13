"""Soak (``ctr-ensemble soak`` / ``make soak``): window and drift arithmetic, and short real runs against the
real tritonserver: a clean run passes with figures, the request bound stops a run, a killed stub fails it."""

import csv
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from ctr_ensemble.cli import app
from ctr_ensemble.errors import CtrError
from ctr_ensemble.loadtest.soak import SoakConfig, p99_drift, run_soak, window_rows
from ctr_ensemble.loadtest.sweep import Target
from ctr_ensemble.serving import metrics
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.serving.supervisor import stub_pids
from tests.waits import wait_for


def _res(t, lat, ok=None):
    t, lat = np.asarray(t, float), np.asarray(lat, float)
    return {"t_start": t, "latency_ms": lat, "ok": np.ones(len(t), bool) if ok is None else np.asarray(ok, bool)}


def test_windows_and_p99_drift_compare_first_and_last_window():
    t = np.arange(0, 30, 0.01) + 1000.0  # 3000 requests over 30 s
    lat = np.full(len(t), 10.0)
    lat[t >= 1020] = 30.0  # the last third got slower
    ok = np.ones(len(t), bool)
    ok[::100] = False  # 30 failures, one in each 1 s
    res = _res(t, lat, ok)
    rows = window_rows(res, "grpc", 1000.0, 10.0)
    assert [r["window"] for r in rows] == [1, 2, 3] and [r["requests"] for r in rows] == [1000, 1000, 1000]
    assert [r["errors"] for r in rows] == [10, 10, 10] and rows[0]["rps"] == pytest.approx(99.0)
    assert rows[0]["p99_ms"] == 10.0 and rows[2]["p99_ms"] == 30.0
    d = p99_drift(res, 10.0)
    assert d["first_p99_ms"] == 10.0 and d["last_p99_ms"] == 30.0
    assert d["p99_drift_ms"] == 20.0 and d["p99_drift_ratio"] == 3.0
    none_ok = p99_drift(_res([1.0, 2.0], [5.0, 5.0], [False, False]), 1.0)
    assert none_ok["p99_drift_ms"] is None


@pytest.mark.parametrize("bad, msg", [
    ({"protocols": ["grpc", "tcp"]}, "protocols"),
    ({"duration_s": 60, "window_s": 40}, "two windows"),
    ({"users": 0}, "users"),
    ({"max_requests": 1}, "max_requests"),
])
def test_bad_soak_settings_are_refused(bad, msg):
    with pytest.raises(CtrError, match=msg):
        SoakConfig(**bad).validate()


@pytest.mark.integration
def test_soak_cli_reports_requests_errors_drift_and_rss(tmp_path, tiny_repo, tiny_data):
    out = tmp_path / "soak"
    res = CliRunner().invoke(app, ["soak", "--repository", str(tiny_repo), "--data", str(tiny_data / "test.tsv"),
                                   "--duration", "8", "--window", "3", "--sample", "1", "--users", "1",
                                   "--rows-per-request", "32", "--max-rows", "1500", "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "soak.json").read_text())
    assert s["passed"] and s["errors"] == 0 and s["server_alive"] and s["stopped_by"] == "time"
    assert s["requests"] > 20 and s["server_requests_success"] == s["requests"] and s["server_requests_failure"] == 0
    assert s["rows_served"] == 32 * s["requests"]
    for p in s["protocols"]:
        assert p["protocol"] in ("grpc", "http") and p["errors"] == 0 and p["served_auc"] == p["offline_auc"]
        assert p["first_p99_ms"] > 0 and p["last_p99_ms"] > 0
        assert p["p99_drift_ms"] == pytest.approx(p["last_p99_ms"] - p["first_p99_ms"])
    # tritonserver + one stub per Python-based ONNX member and the fusion model
    assert s["n_stubs"] == 3 and s["rss_start_mb"] > s["rss_server_start_mb"] > 10
    assert s["rss_end_mb"] > 0 and "rss_growth_after_first_window_mb" in s and "leak_suspected" in s
    windows = list(csv.DictReader(open(out / "soak_windows.csv")))
    assert {w["protocol"] for w in windows} == {"grpc", "http"} and len(windows) >= 4
    assert sum(int(w["requests"]) for w in windows) == s["requests"]
    rss = list(csv.DictReader(open(out / "rss.csv")))
    assert len(rss) >= 5 and float(rss[-1]["cpu_s"]) > float(rss[0]["cpu_s"]) > 0 and float(rss[0]["host_load1"]) >= 0
    assert any(w["server_cpu"] and float(w["server_cpu"]) > 0 for w in windows)
    assert (out / "soak.png").stat().st_size > 10_000 and "— PASS" in (out / "soak.md").read_text()


@pytest.mark.integration
def test_soak_stops_at_the_request_bound(tmp_path, server, tiny_repo, tiny_data):
    tgt = Target(server.host, server.http_port, server.grpc_port, server.metrics_port, tiny_repo, server=server)
    cfg = SoakConfig(duration_s=60, window_s=2, sample_s=1, users=2, rows_per_request=16, max_rows=1500, max_requests=40)
    stale = tmp_path / "soak" / "work" / "grpc" / "results" / "results-host-1.npz"  # an earlier soak's, not counted
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not this run")
    t0 = time.time()
    s = run_soak(cfg, tiny_repo, tiny_data / "test.tsv", tmp_path / "soak", target=tgt)
    assert s["stopped_by"] == "request bound" and s["requests"] == 40 and s["errors"] == 0 and s["passed"]
    assert time.time() - t0 < 50 and server.is_running()  # ended by the bound, and a server it did not start is left up


@pytest.mark.integration
def test_soak_fails_and_counts_errors_when_the_fusion_stub_dies(tmp_path, tiny_repo, tiny_data):
    with TritonServer(tiny_repo) as srv:
        tgt = Target(srv.host, srv.http_port, srv.grpc_port, srv.metrics_port, tiny_repo, server=srv)

        def kill_fusion():  # once the soak has answers (not after a fixed delay: Locust starts slowly on a loaded machine)
            try:
                wait_for(lambda: metrics.scrape(srv.metrics_url).get("ctr_ensemble", {}).get("success", 0) >= 10,
                         60 + cfg.duration_s, "10 answered soak requests")  # Locust's start-up, then the run
            except AssertionError as e:
                failed.append(str(e))
                return
            fusion = [pid for pid, model in stub_pids(srv.pid).items() if "/fusion/" in model]
            os.kill(fusion[0], signal.SIGKILL)
            killed_at.append(time.monotonic())

        failed, killed_at = [], []
        cfg = SoakConfig(duration_s=9, window_s=3, sample_s=1, users=1, rows_per_request=16, max_rows=1500)

        killer = threading.Thread(target=kill_fusion)
        killer.start()
        s = run_soak(cfg, tiny_repo, tiny_data / "test.tsv", tmp_path / "soak", target=tgt)
        ended = time.monotonic()
        killer.join()
    assert not failed and killed_at and killed_at[0] < ended, failed  # the stub was killed during the soak
    assert not s["passed"] and s["errors"] > 0 and s["requests"] > s["errors"]
    kinds = {k for p in s["protocols"] for k in p["errors_by_kind"]}
    assert kinds and all(k.startswith("InferenceServerException") for k in kinds), kinds
    assert s["n_stubs"] == 3 and "— FAIL" in (tmp_path / "soak" / "soak.md").read_text()

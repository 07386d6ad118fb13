"""Integration: real Locust runs (subprocess, both protocols) against the real tritonserver on the
tiny repository; served predictions checked against the offline reference; faults."""

import csv
import threading
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from ctr_ensemble.cli import app
from ctr_ensemble.loadtest import perf, report
from ctr_ensemble.loadtest.sweep import SweepConfig, Target, Variant, run_sweep
from ctr_ensemble.serving import metrics
from ctr_ensemble.serving.server import ADMIN_HEADER, TritonServer

pytestmark = pytest.mark.integration


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_locust_run_serves_offline_auc_with_no_errors(tmp_path, tiny_repo, tiny_data):
    out = tmp_path / "lt"
    args = ["loadtest", "--repository", str(tiny_repo), "--data", str(tiny_data / "test.tsv"), "--model", "ctr_ensemble",
            "--users", "2", "--duration", "3", "--warmup", "0.5", "--rows-per-request", "32", "--max-rows", "1500",
            "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    header = next(csv.reader(open(out / "latency_vs_auc.csv")))
    assert header[: len(report.COLUMNS)] == report.COLUMNS == [
        "variant", "protocol", "users", "rps", "rows_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "served_auc", "offline_auc"]
    rows = _read(out / "latency_vs_auc.csv")
    assert sorted(r["protocol"] for r in rows) == ["grpc", "http"]
    for r in rows:
        assert r["status"] == "ok" and int(r["errors"]) == 0 and int(r["users"]) == 2
        assert float(r["served_auc"]) == float(r["offline_auc"]) and 0.5 < float(r["served_auc"]) < 1
        assert r["ne_base"] == "train" and float(r["served_ne"]) == pytest.approx(float(r["offline_ne"]), rel=1e-5)
        assert float(r["served_calibration"]) == pytest.approx(float(r["offline_calibration"]), rel=1e-5)
        # coverage < 1 only when a loaded machine made the run slow; AUCs are still over the same rows
        assert float(r["max_abs_diff"]) <= 1e-5 and 0 < float(r["coverage"]) <= 1.0, r
        assert float(r["rps"]) > 0 and float(r["rows_per_s"]) == pytest.approx(32 * float(r["rps"]))
        assert 0 < float(r["p50_ms"]) <= float(r["p95_ms"]) <= float(r["p99_ms"]) <= float(r["max_ms"])
        assert float(r["server_queue_ms"]) >= 0 and float(r["server_compute_ms"]) > 0
    served = {(r["protocol"], r["model"]) for r in _read(out / "server_metrics.csv") if int(r["requests"]) > 0}
    assert {m for _, m in served} == {"ctr_ensemble", "deepfm", "dcnv2", "fusion"}
    assert (out / "latency_vs_auc.png").stat().st_size > 10_000
    md = (out / "latency_vs_auc.md").read_text()
    assert "| variant | protocol | users | rps |" in md and "Where time goes inside Triton" in md
    reason = perf.why_not_runnable(perf.find_binary())
    if reason is None:  # perf_analyzer measured the same cells
        for r in rows:
            assert float(r["pa_rps"]) > 0 and float(r["pa_p50_ms"]) > 0, r.get("pa_note")
        assert "Locust vs perf_analyzer" in md
    else:
        assert all(r["pa_note"] == reason for r in rows)


def test_perf_analyzer_check_names_why_a_binary_cannot_run(tmp_path):
    """The measured run is in the test above (same rows and concurrency as Locust); the check that decides
    whether it runs says exactly why not: no binary, no such file, a binary that fails or is not perf_analyzer."""
    assert perf.why_not_runnable(None) == "perf_analyzer not found (make perf-venv, or --perf-analyzer PATH)"
    assert perf.why_not_runnable(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file"
    fake = tmp_path / "perf_analyzer"
    for script, reason in (("echo 'cannot open shared object'; exit 127", f"{fake} cannot run here: cannot open shared object"),
                           ("echo 'some other tool'", f"{fake} cannot run here: some other tool"),
                           ("exit 3", f"{fake} cannot run here: exit 3"),
                           ("echo ' Perf Analyzer version 2.51.0'", None)):
        fake.write_text(f"#!/bin/sh\n{script}\n")
        fake.chmod(0o755)
        assert perf.why_not_runnable(fake) == reason, script
    real = perf.find_binary()
    if real is not None:  # the one the test above uses: it runs, or the reason is what the sweep reports
        reason = perf.why_not_runnable(real)
        assert reason is None or reason.startswith(str(real)), reason


def test_server_dying_mid_run_keeps_partial_results_and_fails(tmp_path, tiny_repo, tiny_data):
    server = TritonServer(tiny_repo, admin_key="k-test").start()
    try:
        # The production restriction: admin APIs need the key, inference does not.
        url = f"http://{server.http_url}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5)
        assert e.value.code == 403
        req = urllib.request.Request(url, method="POST", headers={ADMIN_HEADER: "k-test"})
        assert urllib.request.urlopen(req, timeout=5).status == 200

        tgt = Target("127.0.0.1", server.http_port, server.grpc_port, server.metrics_port, tiny_repo, "k-test", server)
        cfg = SweepConfig(variants=[Variant("ens", "ctr_ensemble"), Variant("deepfm", "deepfm")], protocols=["grpc"], users=[2],
                          duration_s=10, warmup_s=0.5, max_rows=1500, perf_analyzer=False)

        def stop_after_some_answers():  # not a fixed delay: Locust starts slowly on a loaded machine
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                served = metrics.scrape(server.metrics_url).get("ctr_ensemble", {}).get("success", 0)
                if served >= 20:
                    break
                time.sleep(0.1)
            server.stop()

        killer = threading.Thread(target=stop_after_some_answers)
        killer.start()
        res = run_sweep(cfg, tiny_repo, tiny_data / "test.tsv", tmp_path / "out", target=tgt)
        killer.join()
    finally:
        server.stop()
    first, second = res.rows
    assert first["status"] == "server_died" and first["errors"] > 0, first
    assert first["requests"] > first["errors"] > 0  # answered requests before the stop are kept
    assert "mismatch" not in first["errors_by_kind"]
    assert second["status"] == "not_run"
    assert res.failed


def test_variant_that_fails_to_load_is_reported_and_the_sweep_goes_on(tmp_path, tiny_repo, tiny_data):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(tiny_repo, broken)
    (broken / "dcnv2" / "1" / "model.onnx").write_bytes(b"not onnx")
    cfg = SweepConfig(variants=[Variant("ens", "ctr_ensemble"), Variant("collab", "ctr_collaborative")],
                      protocols=["http"], users=[1], duration_s=2, warmup_s=0.5, max_rows=1500, perf_analyzer=False)
    res = run_sweep(cfg, broken, tiny_data / "test.tsv", tmp_path / "out")
    by = {r["variant"]: r for r in res.rows}
    assert by["collab"]["status"] == "skipped" and "ctr_collaborative" in by["collab"]["note"]
    assert by["ens"]["status"] == "load_failed" and "dcnv2" in by["ens"]["note"]
    assert res.failed


def test_sweep_serves_the_deployment_variants_of_a_repository_exported_without_them(tmp_path, tiny_repo, tiny_data):
    from ctr_ensemble.export.repository import RepoOptions, reconfigure_repository

    plain = tmp_path / "plain"
    reconfigure_repository(tiny_repo, plain, RepoOptions(max_batch_size=256, fusion_kind="cpu"))  # no variants
    opts = {"variants": ["single_hop", "all_onnx"]}
    cfg = SweepConfig(variants=[Variant("single_hop", "ctr_single_hop", opts), Variant("all_onnx", "ctr_all_onnx", opts)],
                      protocols=["grpc"], users=[2], duration_s=3, warmup_s=0.5, max_rows=1500, perf_analyzer=False)
    res = run_sweep(cfg, plain, tiny_data / "test.tsv", tmp_path / "out")
    assert [r["variant"] for r in res.rows] == ["single_hop", "all_onnx"]
    for r in res.rows:
        assert r["status"] == "ok" and r["errors"] == 0 and r["requests"] > 0, r
        assert r["served_auc"] == r["offline_auc"] and r["mismatched_rows"] == 0

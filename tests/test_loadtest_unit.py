"""Load-test pieces without a server: Pareto front, steady-state and parity accounting, perf_analyzer
input data, sweep files, derived repositories."""

import base64
import json

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.repository import RepoOptions, reconfigure_repository
from ctr_ensemble import metrics
from ctr_ensemble.loadtest import perf, report, stats
from ctr_ensemble.loadtest.rows import InputSpec
from ctr_ensemble.loadtest.sweep import load_sweep


def test_pareto_front_keeps_only_undominated_points():
    lat = [10.0, 5.0, 20.0, 5.0, 7.0, float("nan"), 3.0]
    auc = [0.80, 0.78, 0.81, 0.77, 0.78, 0.90, None]
    # 0: not dominated (only 2 is better in AUC, and it is slower); 1: fastest at 0.78;
    # 2: best AUC; 3: dominated by 1 (same latency, worse AUC); 4: dominated by 1; 5, 6: unusable.
    assert stats.pareto_front(lat, auc) == [True, True, True, False, False, False, False]
    assert stats.pareto_front([1.0, 1.0], [0.7, 0.7]) == [True, True]  # ties dominate neither


def _results(n_req=20, rpr=4, n_rows=30, t_gap=0.1, lat=5.0):
    starts = (np.arange(n_req) * rpr) % n_rows
    return {
        "t_start": 1000.0 + np.arange(n_req) * t_gap, "latency_ms": np.full(n_req, lat), "row_start": starts,
        "n_rows": np.full(n_req, rpr), "ok": np.ones(n_req, bool), "error": np.array([""] * n_req, dtype=object),
    }


def _fill(res, offline, labels, noise=None):
    idx = np.concatenate([(s + np.arange(k)) % len(labels) for s, k, o in zip(res["row_start"], res["n_rows"], res["ok"]) if o])
    res["pred"] = offline[idx].astype(np.float32) + (0 if noise is None else noise[: len(idx)])
    res["label"] = labels[idx]
    return res


def test_summary_counts_mismatches_failures_and_drops_warmup():
    rng = np.random.default_rng(0)
    labels = (rng.random(30) < 0.4).astype(np.float32)
    offline = rng.random(30).astype(np.float32).astype(np.float64)
    res = _results()
    res["latency_ms"][:5] = 500.0  # slow warm-up requests, dropped from percentiles
    res["ok"][7] = False
    res["error"][7] = "InferenceServerException:StatusCode.UNAVAILABLE"
    noise = np.zeros(200, np.float32)
    noise[0] = 1e-3  # first row of the first request differs from offline
    s = stats.summarize(_fill(res, offline, labels, noise), labels, offline, warmup_s=0.45)
    assert s["requests"] == 20 and s["failed"] == 1 and s["mismatched_requests"] == 1
    assert s["errors"] == 2
    assert s["errors_by_kind"] == {"InferenceServerException:StatusCode.UNAVAILABLE": 1, "mismatch": 1}
    assert s["p99_ms"] == pytest.approx(5.0) and s["max_ms"] == pytest.approx(5.0)
    assert s["steady_requests"] == 14  # t >= 1000.45: requests 5..19 less the failed one
    assert s["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert s["coverage"] == 1.0


def test_summary_served_auc_equals_offline_when_predictions_agree():
    rng = np.random.default_rng(1)
    labels = (rng.random(30) < 0.4).astype(np.float32)
    offline = rng.random(30).astype(np.float32).astype(np.float64)
    s = stats.summarize(_fill(_results(), offline, labels), labels, offline, warmup_s=0.0)
    assert s["errors"] == 0 and s["served_auc"] == s["offline_auc"] and s["served_auc"] is not None
    assert s["rps"] == pytest.approx(20 / (1.9 + 0.005), rel=1e-6)
    assert s["rows_per_s"] == pytest.approx(4 * s["rps"])


def test_summary_has_served_ne_and_calibration_beside_auc(tmp_path):
    rng = np.random.default_rng(2)
    labels = (rng.random(30) < 0.4).astype(np.float32)
    offline = rng.random(30).astype(np.float32).astype(np.float64)
    s = stats.summarize(_fill(_results(), offline, labels), labels, offline, warmup_s=0.0)
    assert s["ne_base"] == "self" and s["served_ne"] == pytest.approx(s["offline_ne"], rel=1e-6)
    assert s["served_ne"] == pytest.approx(metrics.normalized_entropy(labels, offline), rel=1e-6)
    assert s["served_calibration"] == pytest.approx(offline.mean() / labels.mean(), rel=1e-6)
    assert s["served_ece"] == pytest.approx(s["offline_ece"], rel=1e-6)
    t = stats.summarize(_fill(_results(), offline, labels), labels, offline, warmup_s=0.0, train_base_rate=0.25)
    assert t["ne_base"] == "train"
    assert t["served_ne"] == pytest.approx(metrics.normalized_entropy(labels, offline, base_rate=0.25), rel=1e-6)
    row = {"variant": "base", "protocol": "grpc", "users": 1, "status": "ok", "p99_ms": 5.0, **t}
    paths = report.write_report([row], [], tmp_path, {})
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"served_ne", "offline_ne", "ne_base", "served_calibration", "served_ece"} <= set(header)
    md = paths["md"].read_text()
    assert "| served_auc | offline_auc | served_ne | served_calibration |" in md


def test_summary_refuses_results_that_do_not_match_the_rows():
    labels = np.array([0, 1] * 15, np.float32)
    offline = np.linspace(0.1, 0.9, 30)
    res = _fill(_results(), offline, labels)
    res["label"] = 1 - res["label"]
    with pytest.raises(CtrError, match="different runs"):
        stats.summarize(res, labels, offline, 0.0)


def test_perf_analyzer_input_data_round_trips_real_rows_with_nan():
    rows = {"cat_ids": np.arange(12, dtype=np.int64).reshape(4, 3), "num": np.array([[0.5, np.nan], [1, 2], [3, -np.inf], [4, 5]], np.float32),
            "label": np.array([0, 1, 0, 1], np.float32)}
    inputs = [InputSpec("cat_ids", "INT64", (3,)), InputSpec("num", "FP32", (2,))]
    doc = json.loads(json.dumps(perf.input_data(rows, inputs, max_entries=3)))
    assert len(doc["data"]) == 3 and set(doc["data"][0]) == {"cat_ids", "num"}
    for r, entry in enumerate(doc["data"]):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(entry["cat_ids"]["b64"]), "<i8"), rows["cat_ids"][r])
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(entry["num"]["b64"]), "<f4"), rows["num"][r])


def test_perf_analyzer_csv_is_parsed_in_ms_and_requests():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pa.csv"
        p.write_text("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
                     "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
                     "2,6400,20,2655,300,226,14153,868,4,16231,28224,33385,45833\n")
        r = perf.parse_csv(p, batch=64)
    assert r.rps == pytest.approx(100.0) and r.rows_per_s == 6400
    assert r.p50_ms == pytest.approx(16.231) and r.p99_ms == pytest.approx(45.833)
    assert r.server_queue_ms == pytest.approx(0.3) and r.server_compute_ms == pytest.approx(15.247)


def test_missing_perf_analyzer_is_a_reason_not_a_crash(tmp_path):
    assert "not found" in perf.why_not_runnable(None)
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\necho 'version GLIBC_2.38 not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert "cannot run here" in perf.why_not_runnable(fake)


def test_sweep_file_is_validated(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("users: [1, 2]\nprotocols: [grpc]\nvariants:\n  - {name: a, model: deepfm}\n"
                    "  - {name: b, model: ctr_ensemble, options: {fusion_mode: mean, dynamic_batching: false}}\n")
    cfg = load_sweep(good)
    assert [v.name for v in cfg.variants] == ["a", "b"] and cfg.users == [1, 2]
    for text, match in [("variants: [{name: a}]\nspeed: 3\n", "unknown keys"),
                        ("variants: [{name: a, options: {gpus: 2}}]\n", "unknown options"),
                        ("variants: [{name: a}, {name: a}]\n", "unique"),
                        ("variants: [{name: a}]\nprotocols: [udp]\n", "protocols")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CtrError, match=match):
            load_sweep(bad)


def _cfg(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_reconfigured_repository_changes_configs_only(tmp_path, tiny_repo):
    dst = tmp_path / "variant"
    reconfigure_repository(tiny_repo, dst, RepoOptions(max_batch_size=256, dynamic_batching=False, instances=2, fusion_mode="mean", fusion_kind="cpu"))
    member = _cfg(dst / "deepfm" / "config.pbtxt")
    assert not member.HasField("dynamic_batching") and member.instance_group[0].count == 2
    assert [i.name for i in member.input] == [i.name for i in _cfg(tiny_repo / "deepfm" / "config.pbtxt").input]
    assert _cfg(dst / "fusion" / "config.pbtxt").parameters["fusion_mode"].string_value == "mean"
    assert (dst / "deepfm" / "1" / "model.onnx").stat().st_ino == (tiny_repo / "deepfm" / "1" / "model.onnx").stat().st_ino
    assert json.loads((dst / "repository.json").read_text())["fusion"]["mode"] == "mean"
    assert _cfg(tiny_repo / "deepfm" / "config.pbtxt").HasField("dynamic_batching")  # the base is untouched

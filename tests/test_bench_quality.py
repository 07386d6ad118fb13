"""benchmarks/bench_quality.py: split files, seed aggregation, and a tiny end-to-end run (no FuxiCTR)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.synth import generate
from tests.conftest import tiny_synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_export_parquet_keeps_rows_and_values(bq, tmp_path):
    raw = tmp_path / "raw"
    generate(raw, tiny_synth(train=800, val=200, test=200))
    n, fields = bq.export_parquet(raw / "train.tsv", tmp_path / "train.parquet")
    assert n == 800 and len(fields["categorical"]) == 26 and len(fields["numeric"]) == 13 and fields["sequence"] is None
    # Same spec and the same encoded arrays from the original TSV and from the split file both frameworks read.
    spec_tsv = fit(raw / "train.tsv", min_count=2)
    spec_pq = fit(tmp_path / "train.parquet", min_count=2)
    assert spec_pq.fingerprint() == spec_tsv.fingerprint()
    a, b = encode_file(raw / "train.tsv", spec_tsv), encode_file(tmp_path / "train.parquet", spec_tsv)
    np.testing.assert_array_equal(a.cat_ids, b.cat_ids)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(np.isnan(a.num), np.isnan(b.num))  # missing stays missing (null in the file)
    np.testing.assert_allclose(np.nan_to_num(a.num), np.nan_to_num(b.num))
    assert pq.read_table(tmp_path / "train.parquet").column("I1").null_count == int(np.isnan(a.num[:, 0]).sum())
    # Deterministic: a second export writes the same table.
    bq.export_parquet(raw / "train.tsv", tmp_path / "again.parquet")
    assert pq.read_table(tmp_path / "again.parquet").equals(pq.read_table(tmp_path / "train.parquet"))
    # keep_last keeps the last (most recent) rows, in order.
    n_last, _ = bq.export_parquet(raw / "train.tsv", tmp_path / "last.parquet", keep_last=100)
    c = encode_file(tmp_path / "last.parquet", spec_tsv)
    assert n_last == 100
    np.testing.assert_array_equal(c.cat_ids, a.cat_ids[-100:])


def test_mean_std_and_in_std(bq):
    m, s = bq.mean_std([0.70, 0.72, 0.74])
    assert m == pytest.approx(0.72) and s == pytest.approx(0.02)  # sample std (ddof=1)
    assert bq.mean_std([0.7]) == (0.7, 0.0)
    assert bq.mean_std([]) == (None, None)
    assert bq.in_std(-0.02, 0.01, 0.01) == pytest.approx(-2.0)
    assert bq.in_std(0.01, 0.0, math.sqrt(2) * 0.01) == pytest.approx(1.0)  # pooled sqrt((0 + 2e-4) / 2)
    assert bq.in_std(0.0, 0.0, 0.0) is None and bq.in_std(0.1, 0.0, 0.0) == math.inf


def test_aggregate_side_by_side(bq):
    def run(fw, seed, auc, ll, sps, error=None):
        return {"dataset": "d", "member": "deepfm", "framework": fw, "seed": seed, "test_auc": auc, "test_logloss": ll,
                "samples_per_s": sps, "epochs": 2, "error": error}

    runs = [run("ours", 1, 0.70, 0.50, 100), run("ours", 2, 0.72, 0.48, 300),
            run("fuxictr", 1, 0.73, 0.47, 100), run("fuxictr", 2, 0.75, 0.45, 100),
            run("fuxictr", 3, None, None, None, error="boom"),
            {**run("ours", 1, 0.6, 0.6, 50), "member": "dhen"}]
    rows = {r["member"]: r for r in bq.aggregate(runs)}
    r = rows["deepfm"]
    assert r["ours_runs"] == 2 and r["fuxictr_runs"] == 2 and r["fuxictr_error"] == "boom"
    assert r["ours_auc_mean"] == pytest.approx(0.71) and r["fuxictr_auc_mean"] == pytest.approx(0.74)
    assert r["auc_diff"] == pytest.approx(-0.03)
    assert r["auc_diff_in_std"] == pytest.approx(-0.03 / math.sqrt(2e-4))  # both stds are 0.01414
    assert r["logloss_diff"] == pytest.approx(0.03)
    assert r["speed_ratio"] == pytest.approx(2.0)
    d = rows["dhen"]
    assert d["fuxictr_error"] == "no FuxiCTR model" and d["auc_diff"] is None and d["speed_ratio"] is None


def test_tiny_end_to_end(bq, tmp_path):
    """One member, one seed, a few steps on the tiny synthetic set; FuxiCTR's venv is missing, which the table says."""
    rc = bq.main(["--datasets", "tinysynth", "--members", "deepfm,dcn", "--seeds", "1", "--train-set", "epochs=1",
                  "--model-set", "embedding_regularizer=0.02", "--max-steps", "3", "--fuxictr-python",
                  str(tmp_path / "no-venv" / "python"), "--out", str(tmp_path), "--docs", str(tmp_path / "docs")])
    assert rc == 0
    assert (tmp_path / "docs" / "quality.md").read_text() == (tmp_path / "quality.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "quality.csv")))
    assert [r["member"] for r in rows] == ["deepfm", "dcn"]
    for r in rows:
        assert r["ours_runs"] == "1" and 0.5 < float(r["ours_auc_mean"]) < 1 and float(r["ours_samples_per_s"]) > 0
        assert r["fuxictr_runs"] == "0" and "not found" in r["fuxictr_error"]
    md = (tmp_path / "quality.md").read_text()
    assert "## tinysynth" in md and "oracle AUC" in md and "not found" in md
    assert "{'embedding_regularizer': 0.02}" in md and "commit " in md  # overrides and the stamp are in the report
    runs = list(csv.DictReader(open(tmp_path / "quality_runs.csv")))
    assert all(float(r["test_ne"]) > 0 and float(r["test_calibration"]) > 0 for r in runs if r["framework"] == "ours")
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert len(list(csv.DictReader(open(tmp_path / "quality_runs.csv")))) == 4  # 2 ours + 2 FuxiCTR (failed)
    for split in ("train", "val", "test"):
        assert (tmp_path / "quality" / "data" / "tinysynth" / f"{split}.parquet").is_file()


def test_fuxictr_request_is_the_bars_recipe(bq):
    cfg = bq.BenchConfig()
    r = bq.fuxictr_request("deepfm", 2, cfg, train_rows=7200)
    assert r["config"]["hidden"] == [400, 400, 400] and r["config"]["embedding_dim"] == 10
    assert r["config"]["batch_norm"] is True and r["config"]["dropout"] == 0.2
    assert r["train"]["embedding_regularizer"] == 0.05 and r["train"]["early_stop_patience"] == 2
    assert r["train"]["batch_size"] == 256  # 4096 halved until an epoch has >= 16 steps
    assert bq.fuxictr_request("deepfm", 1, cfg, train_rows=10**6)["train"]["batch_size"] == 4096
    assert bq.fuxictr_request("fibinet", 1, cfg, 7200)["config"]["hidden"] == bq.models.make_config("fibinet").hidden
    assert bq.fuxictr_request("dcnv2", 1, cfg, 7200)["config"]["cross_layers"] == 3
    ours = bq.parse_args(["--fuxictr-recipe", "ours"])
    r = bq.fuxictr_request("deepfm", 2, ours, train_rows=7200)
    d = bq.models.make_config("deepfm")
    assert r["config"]["hidden"] == d.hidden and r["config"]["embedding_dim"] == d.embedding_dim
    assert r["train"]["embedding_regularizer"] == d.embedding_regularizer and r["train"]["batch_size"] == 512


def test_verdict_is_the_issues_bar(bq):
    def row(m, o, f, fs):
        return {"member": m, "ours_auc_mean": o, "fuxictr_auc_mean": f, "goal": o >= f - fs}

    v = bq.dataset_verdict([row("deepfm", 0.70, 0.71, 0.02), row("dcn", 0.74, 0.72, 0.01)])
    assert "ours 0.7200, FuxiCTR 0.7150 (✓ mean)" in v and "2/2" in v
    v = bq.dataset_verdict([row("deepfm", 0.68, 0.71, 0.02), row("dcn", 0.74, 0.72, 0.01)])
    assert "✗ deepfm" in v and "1/2" in v


def test_unknown_dataset_is_an_argument_error(bq):
    with pytest.raises(SystemExit):
        bq.parse_args(["--datasets", "nope"])

"""NE, calibration and ECE against hand computations; the training base rate in the feature spec;
the new keys in `evaluate`'s summary (what the demo writes to summary.json)."""

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from ctr_ensemble import metrics
from ctr_ensemble.data.fit import FitAccumulator
from ctr_ensemble.data.spec import FeatureSpec

Y = np.array([1, 0, 0, 0])
P = np.array([0.5, 0.25, 0.25, 0.25])
LOGLOSS = -(math.log(0.5) + 3 * math.log(0.75)) / 4  # 0.389048
H_QUARTER = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335, entropy of a 25% CTR


def test_binary_entropy():
    assert metrics.binary_entropy(0.25) == pytest.approx(H_QUARTER, rel=1e-12)
    assert metrics.binary_entropy(0.5) == pytest.approx(math.log(2), rel=1e-12)
    assert metrics.binary_entropy(0.0) == metrics.binary_entropy(1.0) == metrics.binary_entropy(float("nan")) == 0.0


def test_normalized_entropy_by_hand():
    assert metrics.logloss(Y, P) == pytest.approx(LOGLOSS, rel=1e-9)
    assert metrics.normalized_entropy(Y, P) == pytest.approx(LOGLOSS / H_QUARTER, rel=1e-9)  # own CTR 0.25
    assert metrics.normalized_entropy(Y, P, base_rate=0.5) == pytest.approx(LOGLOSS / math.log(2), rel=1e-9)
    # Predicting the base rate everywhere is NE 1 by construction.
    assert metrics.normalized_entropy(Y, np.full(4, 0.25)) == pytest.approx(1.0, rel=1e-6)


def test_normalized_entropy_one_class_and_empty():
    zeros, p = np.zeros(5), np.full(5, 0.1)
    assert metrics.normalized_entropy(zeros, p) is None  # own CTR 0: no reference entropy
    assert metrics.normalized_entropy(zeros, p, base_rate=0.1) == pytest.approx(-math.log(0.9) / metrics.binary_entropy(0.1))
    assert metrics.normalized_entropy(zeros, p, base_rate=1.0) is None
    assert metrics.normalized_entropy([], [], base_rate=0.1) is None


def test_calibration_by_hand():
    assert metrics.calibration(Y, P) == pytest.approx(0.3125 / 0.25)
    assert metrics.calibration(np.ones(3), np.full(3, 0.5)) == pytest.approx(0.5)
    assert metrics.calibration(np.zeros(3), np.full(3, 0.5)) is None  # no click to compare with
    assert metrics.calibration([], []) is None


def test_ece_by_hand_and_edge_cases():
    # 2 equal-frequency bins: edges at the 0/50/100th percentiles (0.1, 0.25, 0.4) → {0.1, 0.2} and {0.3, 0.4}.
    # |0.15 - 0| and |0.35 - 1|, each bin half the rows: 0.5·0.15 + 0.5·0.65.
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    assert metrics.expected_calibration_error(y, p, bins=2) == pytest.approx(0.4)
    # Unequal bin sizes weigh by rows: ties put 3 of 4 rows in the first bin.
    assert metrics.expected_calibration_error([0, 1, 0, 1], [0.2, 0.2, 0.2, 0.9], bins=2) == pytest.approx(
        0.75 * abs(0.2 - 1 / 3) + 0.25 * abs(0.9 - 1))
    assert metrics.expected_calibration_error(Y, np.full(4, 0.25)) == pytest.approx(0.0)  # constant = CTR
    assert metrics.expected_calibration_error(np.zeros(4), np.full(4, 0.2)) == pytest.approx(0.2)  # one class
    assert metrics.expected_calibration_error([], []) is None
    with pytest.raises(ValueError, match="bins"):
        metrics.expected_calibration_error(Y, P, bins=0)


def test_calibration_bins_are_scikit_learns_quantile_bins():
    rng = np.random.default_rng(0)
    p = rng.beta(1, 20, 5000)  # CTR-like: crowded near 0
    y = (rng.random(5000) < p).astype(int)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    n, mean_p, mean_y = metrics.calibration_bins(y, p, 10)
    np.testing.assert_allclose(mean_p, prob_pred, rtol=1e-12)
    np.testing.assert_allclose(mean_y, prob_true, rtol=1e-12)
    assert n.sum() == 5000 and n.min() >= 499  # equal frequency
    ece = metrics.expected_calibration_error(y, p)
    assert ece == pytest.approx(np.sum(n * np.abs(prob_pred - prob_true)) / 5000) and ece < 0.02


def test_quality_keys_and_ne_base():
    q = metrics.quality(Y, P)
    assert tuple(q) == metrics.QUALITY_KEYS and q["ne_base"] == "self" and q["auc"] == 1.0
    assert q["ne"] == pytest.approx(LOGLOSS / H_QUARTER) and q["calibration"] == pytest.approx(1.25)
    t = metrics.quality(Y, P, train_base_rate=0.5)
    assert t["ne_base"] == "train" and t["ne"] == pytest.approx(LOGLOSS / math.log(2))
    one = metrics.quality(np.zeros(3), np.full(3, 0.1))
    assert one["auc"] is None and one["ne"] is None and one["calibration"] is None and one["ece"] == pytest.approx(0.1)
    assert metrics.quality([], []) == dict.fromkeys(metrics.QUALITY_KEYS)


# --- the training base rate recorded in the feature spec


def test_fit_records_the_training_base_rate(tiny_data, tiny_spec, tmp_path):
    from ctr_ensemble.data.encode import encode_file

    labels = encode_file(tiny_data / "train.tsv", tiny_spec).label
    assert tiny_spec.fitted_on["label_mean"] == pytest.approx(float(np.mean(labels, dtype=np.float64)), abs=1e-12)
    # fitted_on is outside the fingerprint: a spec without the key (written before it existed) is the same encoding.
    d = tiny_spec.to_dict()
    del d["fitted_on"]["label_mean"]
    old = FeatureSpec.from_dict(d)
    assert old.fingerprint() == tiny_spec.fingerprint() and "label_mean" not in old.fitted_on
    tiny_spec.save(tmp_path / "s.json")
    assert FeatureSpec.load(tmp_path / "s.json").fitted_on["label_mean"] == tiny_spec.fitted_on["label_mean"]


def test_accumulator_drops_the_base_rate_when_a_chunk_did_not_count_labels():
    def spec(*positives):
        acc = FitAccumulator(["c"], [], None)
        for pos in positives:
            acc.add_sums(10, np.zeros((3, 0)), None, pos)
        return acc.spec(1, 1, {})

    assert spec(3, 1).fitted_on["label_mean"] == pytest.approx(0.2)
    assert "label_mean" not in spec(3, None).fitted_on  # a chunk read before positives were recorded (resumed prepare)


def test_prepare_records_the_same_base_rate_as_fit(prepared, tiny_spec):
    from ctr_ensemble.data.prepared.manifest import SPEC_FILE

    spec = FeatureSpec.load(prepared / "train" / SPEC_FILE)
    assert spec.fitted_on["label_mean"] == pytest.approx(tiny_spec.fitted_on["label_mean"], abs=1e-12)


# --- evaluate's summary (the demo's summary.json is this dict plus its checks)


def test_evaluate_reports_ne_calibration_and_ece(tiny_data, tiny_repo, tiny_spec, monkeypatch):
    from ctr_ensemble.evaluation import evaluate as ev

    s = ev.evaluate(tiny_data / "test.tsv", tiny_repo, ["torch", "onnx"], ev.EvalTargets())
    assert s["base_rate"]["train"] == pytest.approx(tiny_spec.fitted_on["label_mean"])
    assert 0 < s["base_rate"]["self"] < 1
    for rows in [*s["members"].values(), s["ensemble"]]:
        assert set(rows) == {"torch", "onnx"}
        for r in rows.values():
            assert {"auc", "logloss", "ne", "ne_base", "calibration", "ece"} <= set(r)
            assert r["ne_base"] == "train" and r["ne"] > 0 and r["calibration"] > 0 and 0 <= r["ece"] <= 1
            assert r["ne"] == pytest.approx(r["logloss"] / metrics.binary_entropy(s["base_rate"]["train"]))
    cols = [c.header for c in ev.render_table(s).columns]
    assert {"NE", "calibration", "ECE"} <= set(cols)

    # A repository whose spec predates label_mean: NE falls back to the file's own CTR, and says so.
    spec = FeatureSpec.from_dict(tiny_spec.to_dict())
    spec.fitted_on.pop("label_mean")
    monkeypatch.setattr(ev, "repository_spec", lambda repo: spec)
    s = ev.evaluate(tiny_data / "test.tsv", tiny_repo, ["torch"], ev.EvalTargets())
    assert s["base_rate"]["train"] is None
    r = s["ensemble"]["torch"]
    assert r["ne_base"] == "self" and r["ne"] == pytest.approx(r["logloss"] / metrics.binary_entropy(s["base_rate"]["self"]))
    assert "own CTR" in ev.render_table(s).caption

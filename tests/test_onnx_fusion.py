"""The fused ONNX graph (members + fusion rule in ONNX ops) against ``FusionRule.fuse`` on the members' own ONNX
outputs: every rule, exact 0/1 and saturated probabilities, ties, real exported members at batch 1 and 7."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ctr_ensemble import metrics, models
from ctr_ensemble.data.spec import CategoricalField, FeatureSpec, NumericField, SequenceField
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.onnx_fusion import PROB, WEIGHT_GRAPHS, WEIGHTS, fused_model, write_fused_model
from ctr_ensemble.layers.fusion import COLLABORATIVE, FITTED, RULES, FusionRule
from tests.conftest import TINY_MODEL

N = 3
RULE_CASES = {
    "ne_tau1": FusionRule("negation_entropy", 1.0),
    "ne_tau0.5": FusionRule("negation_entropy", 0.5),
    "ne_argmax": FusionRule("negation_entropy", 0.0),
    "mean": FusionRule("mean"),
    "fitted_prob": FusionRule(FITTED, 0.7, priors=(0.3, -0.2, 0.0)),
    "fitted_logit": FusionRule(FITTED, 1.3, priors=(-0.5, 0.1, 0.25), space="logit"),
}
# Member probabilities, one column per member: exact 0 and 1, 0.5 (NE = −log 2), below and above float32's
# resolution at 0 and 1, saturated sigmoids, out-of-range values the clamps must catch, and ties for τ = 0.
EDGE_ROWS = [
    [0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.3, 0.3, 0.8],
    [1e-9, 1.0 - 1e-9, 0.5], [1e-30, 1e-7, 1.0 - 1e-7], [1e-45, 0.9999, 0.0001], [-0.25, 1.5, 0.6],
    [0.2, 0.2, 0.2], [0.7, 0.4, 0.7], [0.0, 0.37, 1.0],
]


def _sigmoid_rows(rng, n):
    return 1.0 / (1.0 + np.exp(-rng.normal(0.0, 8.0, (n, N))))  # many saturate at 0 or 1 in float32


def _column_member(path, i: int, n: int = N, via_if: bool = False) -> str:
    """A hand-made member whose ``prob`` is column ``i`` of the shared input ``num`` (B, n), exactly. ``via_if``:
    computed in an If branch that reads the outer graph's input and initializer, beside a dead node."""
    gather = helper.make_node("Gather", ["num", "col"], ["prob"], axis=1)
    nodes = [gather, helper.make_node("Identity", ["num"], ["repr"])]
    if via_if:
        branch = helper.make_graph([gather], "then", [], [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None)])
        nodes = [helper.make_node("Constant", [], ["yes"], value=onnx.numpy_helper.from_array(np.array(True))),
                 helper.make_node("If", ["yes"], ["prob"], then_branch=branch, else_branch=branch),
                 helper.make_node("Sub", ["num", "num"], ["dead"]), helper.make_node("Identity", ["dead"], ["repr"])]
    graph = helper.make_graph(
        nodes, f"column{i}", [helper.make_tensor_value_info("num", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("repr", TensorProto.FLOAT, ["batch", n])],
        [onnx.numpy_helper.from_array(np.array([i], np.int64), "col")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_export.OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def columns(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("columns")
    return {f"m{i}": _column_member(out / f"m{i}.onnx", i) for i in range(N)}


def _check_parity(members: dict, rule: FusionRule, feeds: dict, tmp_path) -> None:
    """The fused graph's outputs against ``rule.fuse`` over the members' own ONNX ``prob``s."""
    probs = np.concatenate([onnx_export.session(p).run(["prob"], feeds)[0] for p in members.values()], axis=1)
    ref_prob, ref_w = (t.numpy() for t in rule.fuse(torch.from_numpy(probs)))
    sess = onnx_export.session(write_fused_model(members, rule, tmp_path / "fused.onnx"))
    prob, w = sess.run([PROB, WEIGHTS], feeds)
    assert prob.shape == ref_prob.shape == (len(probs), 1) and w.shape == ref_w.shape == probs.shape
    assert prob.dtype == w.dtype == np.float32
    assert np.isfinite(w).all() and ((0.0 <= prob) & (prob <= 1.0)).all()  # a probability, rounding included
    for got, ref in ((prob, ref_prob), (w, ref_w)):
        assert float(np.max(np.abs(got - ref))) <= metrics.PARITY_TOL, (got, ref)


@pytest.mark.parametrize("case", RULE_CASES)
def test_every_rule_matches_the_reference_on_exact_and_saturated_probabilities(case, columns, tmp_path):
    num = np.concatenate([np.array(EDGE_ROWS), _sigmoid_rows(np.random.default_rng(0), 64)]).astype(np.float32)
    _check_parity(columns, RULE_CASES[case], {"num": num}, tmp_path)


def test_argmax_ties_share_equally_and_certain_members_win(columns, tmp_path):
    num = np.array([[0.0, 1.0, 0.5], [0.3, 0.3, 0.8], [0.5, 0.5, 0.5], [0.0, 0.37, 1.0]], np.float32)
    sess = onnx_export.session(write_fused_model(columns, RULE_CASES["ne_argmax"], tmp_path / "f.onnx"))
    prob, w = sess.run([PROB, WEIGHTS], {"num": num})
    np.testing.assert_array_equal(w, np.array([[0.5, 0.5, 0], [0, 0, 1], [1 / 3] * 3, [0.5, 0, 0.5]], np.float32))
    np.testing.assert_allclose(prob[:, 0], [0.5, 0.8, 0.5, 0.5], atol=1e-7)


def test_fused_graph_has_the_shared_inputs_once_and_two_outputs(columns):
    model = fused_model(columns, RULE_CASES["fitted_logit"])
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["num"]
    assert [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in model.graph.output] \
        == [(PROB, ["batch", 1]), (WEIGHTS, ["batch", N])]
    names = {t.name for t in model.graph.initializer}
    assert {f"m{i}/col" for i in range(N)} <= names  # each member's initializers, prefixed
    assert not any(o.endswith("/repr") for n in model.graph.node for o in n.output)  # pruned: not served


def test_members_with_subgraphs_keep_their_outer_reads_and_lose_dead_nodes(tmp_path):
    """onnx's add_prefix alone leaves an If branch reading the old name of an outer initializer."""
    members = {f"m{i}": _column_member(tmp_path / f"m{i}.onnx", i, via_if=True) for i in range(N)}
    model = fused_model(members, RULE_CASES["ne_tau1"])
    assert not any(o.endswith(("/dead", "/repr")) for n in model.graph.node for o in n.output)
    num = np.concatenate([np.array(EDGE_ROWS), _sigmoid_rows(np.random.default_rng(1), 8)]).astype(np.float32)
    _check_parity(members, RULE_CASES["ne_tau1"], {"num": num}, tmp_path)


def test_every_registered_rule_has_an_onnx_graph():
    assert set(WEIGHT_GRAPHS) == set(RULES)


# --- real members: two different tiny architectures, untrained and seeded -------------------------------------

def _spec(sequence: bool) -> FeatureSpec:
    return FeatureSpec(categorical=[CategoricalField(f"c{i}", [str(j) for j in range(5 + 3 * i)]) for i in range(4)],
                       numeric=[NumericField(f"x{i}", 0.1 * i, 1.0 + i) for i in range(2)],
                       sequence=SequenceField("hist", [str(j) for j in range(20)], 4) if sequence else None)


def _feeds(spec: FeatureSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"cat_ids": rng.integers(-1, max(spec.cat_sizes) + 1, (rows, spec.n_cat)),
             "num": rng.normal(0, 3, (rows, spec.n_num)).astype(np.float32)}
    if spec.sequence:
        feeds |= {"seq_ids": rng.integers(0, spec.sequence.size, (rows, 4)), "seq_len": rng.integers(0, 6, (rows, 1))}
    return {k: v for k, v in feeds.items() if k in spec.input_names}


def _export(spec: FeatureSpec, arch: str, seed: int, path) -> str:
    torch.manual_seed(seed)
    model = models.build(arch, models.make_config(arch, TINY_MODEL[arch]), spec)
    return str(onnx_export.export_member(model, spec, path))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Members per spec: (spec, name → ONNX path); the sequence spec adds seq_ids/seq_len inputs."""
    out = tmp_path_factory.mktemp("real")
    plain, seq = _spec(False), _spec(True)
    return {"plain": (plain, {a: _export(plain, a, k, out / f"{a}.onnx") for k, a in enumerate(("deepfm", "dcnv2"))}),
            "sequence": (seq, {a: _export(seq, a, k, out / f"seq_{a}.onnx") for k, a in enumerate(("deepfm", "pnn"))})}


@pytest.mark.parametrize("case", ["ne_tau1", "ne_argmax", "mean", "fitted_logit"])
@pytest.mark.parametrize("kind", ["plain", "sequence"])
def test_real_members_fuse_with_parity_at_any_batch(kind, case, real, tmp_path):
    spec, members = real[kind]
    rule = RULE_CASES[case]
    if rule.priors:
        rule = FusionRule(rule.mode, rule.tau, priors=rule.priors[:2], space=rule.space)
    for rows in (1, 7):
        _check_parity(members, rule, _feeds(spec, rows, rows), tmp_path)


# --- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [COLLABORATIVE, "median"])
def test_a_rule_without_an_onnx_form_is_an_error(mode, columns):
    with pytest.raises(CtrError, match=rf"fusion mode '{mode}' has no fused ONNX graph"):
        fused_model(columns, SimpleNamespace(mode=mode, tau=1.0, priors=None, space="prob"))


def test_members_with_different_inputs_are_an_error(columns, real, tmp_path):
    other = {**columns, "wide": _column_member(tmp_path / "wide.onnx", 0, n=N + 1)}
    with pytest.raises(CtrError, match=r"member 'wide' .* takes inputs \['num:FLOAT\[\?,4\]'\], but 'm0' takes"):
        fused_model(other, RULE_CASES["mean"])
    mixed = {**real["plain"][1], "seq": real["sequence"][1]["deepfm"]}
    with pytest.raises(CtrError, match=r"member 'seq' .*seq_ids:INT64.*share one feature spec"):
        fused_model(mixed, RULE_CASES["mean"])


def test_fitted_priors_must_be_one_per_member(columns):
    with pytest.raises(CtrError, match="2 priors for 3 members"):
        fused_model(columns, FusionRule(FITTED, 1.0, priors=(0.0, 1.0)))

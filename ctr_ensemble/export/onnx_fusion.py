"""The whole ensemble as one ONNX graph: every member, then the confidence fusion (``layers.fusion``) in ONNX ops.

In production the ensemble is served as one model by Triton's native ``onnxruntime`` backend: no Python in the
hot path, no ensemble scheduler copying member outputs between models, and the whole graph runs on ORT's CPU,
CUDA or TensorRT execution provider. The graph is::

    shared inputs (cat_ids, num, seq_ids, seq_len: the members' own names, dtypes and dynamic dims, not prefixed)
      → member graphs, internal names prefixed ``<member>/`` (initializers included; ``repr`` dropped)
      → Concat of the members' ``prob`` in ensemble order            # (B, N)
      → the rule's weights                                           # (B, N)  output ``weights``
      → Σ w·p (prob space) or σ(Σ w·logit p) (logit space)           # (B, 1)  output ``prob``

The fusion is ``FusionRule.fuse`` op for op, clamps included: negation entropy NE(p) = p·log p + (1 − p)·log(1 − p)
(arXiv 2411.13700, "A Collaborative Ensemble Framework for CTR Prediction"), weights softmax(NE/τ), the argmax at
τ = 0 (ties share equally), the mean, or the fitted softmax(a + NE/τ). The collaborative ensemble's head weights
member representations and is not a rule over probabilities: it has no fused graph here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.onnx_export import OPSET
from ctr_ensemble.layers.fusion import EPS, RULES, FusionRule
from ctr_ensemble.models.base import OUTPUT_NAMES

PROB, WEIGHTS = "prob", "weights"  # the fused graph's outputs
_MEMBER_PROB = OUTPUT_NAMES[0]  # the one member output the fusion reads
_FUSION = "fusion/"  # the fusion step's own names


class _Ops:
    """The fusion step's nodes and constants, under ``fusion/``."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []

    def const(self, value, dtype=np.float32) -> str:
        name = f"{_FUSION}c{len(self.consts)}"
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def __call__(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        name = f"{_FUSION}{op_type}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name=name, **attrs))
        return out or name

    def row_sum(self, x: str, out: str | None = None) -> str:
        return self("ReduceSum", x, self.const([1], np.int64), out=out, keepdims=1)  # (B, 1)


def _negation_entropy(op: _Ops, p: str) -> str:
    """NE of ``p`` (B, N), already clamped to [0, 1]: exactly 0 at p = 0 and p = 1, like xlogy(0, 0) = 0. Log sees
    0.5 there instead (never log 0: 0·(−inf) is NaN), and ``Where`` puts the 0 back, as the reference does."""
    inside = op("And", op("Greater", p, op.const(0.0)), op("Less", p, op.const(1.0)))
    s = op("Where", inside, p, op.const(0.5))
    q = op("Sub", op.const(1.0), s)
    xlogx = op("Add", op("Mul", s, op("Log", s)), op("Mul", q, op("Log", q)))
    return op("Where", inside, xlogx, op.const(0.0))  # (B, N)


def _ne_weights(op: _Ops, p: str, rule: FusionRule, n: int) -> str:
    conf = _negation_entropy(op, p)
    if rule.tau == 0.0:
        # Exact equality with the row maximum, as the reference: equal probabilities give bit-equal NE (same ops),
        # and p = 0 and p = 1 are both exactly 0, so ties are found in ONNX as in torch.
        top = op("Cast", op("Equal", conf, op("ReduceMax", conf, axes=[1], keepdims=1)), to=TensorProto.FLOAT)
        return op("Div", top, op.row_sum(top), out=WEIGHTS)
    return op("Softmax", op("Div", conf, op.const(rule.tau)), axis=1, out=WEIGHTS)


def _mean_weights(op: _Ops, p: str, rule: FusionRule, n: int) -> str:
    # Expanded from a constant, not computed from p: NaN or inf member outputs must not reach the weights.
    return op("Expand", op.const(np.full((1, n), 1.0 / n)), op("Shape", p), out=WEIGHTS)


def _fitted_weights(op: _Ops, p: str, rule: FusionRule, n: int) -> str:
    if len(rule.priors) != n:
        raise CtrError(f"fusion rule {rule.describe()} has {len(rule.priors)} priors for {n} members")
    logits = op("Add", op.const(rule.priors), op("Div", _negation_entropy(op, p), op.const(rule.tau)))
    return op("Softmax", logits, axis=1, out=WEIGHTS)


# Per rule of ``layers.fusion.RULES``: its weights in ONNX, (ops, clamped probs (B, N), rule, N) → weights (B, N).
WEIGHT_GRAPHS: dict[str, Callable[[_Ops, str, FusionRule, int], str]] = {
    "negation_entropy": _ne_weights, "mean": _mean_weights, "fitted": _fitted_weights,
}


def _fusion(op: _Ops, probs: str, rule: FusionRule, n: int) -> None:
    p = op("Clip", probs, op.const(0.0), op.const(1.0))  # (B, N)
    w = WEIGHT_GRAPHS[rule.mode](op, p, rule, n)  # (B, N)
    if rule.space == "logit":
        # float32 bounds, as torch clamps a float32 tensor: 1 − EPS is 1 − 2^-23 there.
        c = op("Clip", probs, op.const(EPS), op.const(1.0 - EPS))
        z = op("Log", op("Div", c, op("Sub", op.const(1.0), c)))  # torch.logit: log(p / (1 − p))
        op("Sigmoid", op.row_sum(op("Mul", w, z)), out=PROB)  # (B, 1)
    else:
        op("Clip", op.row_sum(op("Mul", w, p)), op.const(0.0), op.const(1.0), out=PROB)  # (B, 1)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, its subgraphs' included (they may read the outer graph's values)."""
    names = set(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            names.update(*(_reads(n) for n in g.node))
    return names


def _prune(graph: onnx.GraphProto, outputs: list[str]) -> onnx.GraphProto:
    """``graph`` with only what ``outputs`` need: what only ``repr`` (or nothing) reads would run on every request."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    keep: set[int] = set()
    todo = list(outputs)
    while todo:
        i = producer.get(todo.pop())
        if i is not None and i not in keep:
            keep.add(i)
            todo += _reads(graph.node[i])
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    live = set(outputs).union(*(_reads(n) | set(n.output) for n in nodes))
    return helper.make_graph(nodes, graph.name, [], [], [t for t in graph.initializer if t.name in live],
                             value_info=[v for v in graph.value_info if v.name in live])


def _prefixed(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """``model`` with every name but its graph inputs prefixed: the shared inputs feed every member. The initializers
    seed the name map: ``add_prefix`` renames subgraphs before initializers, missing their reads of outer ones."""
    model = onnx.compose.add_prefix(model, prefix, rename_nodes=False, rename_edges=False, rename_inputs=False,
                                    rename_outputs=False, rename_initializers=False, rename_value_infos=False)
    onnx.compose.add_prefix_graph(model.graph, prefix, rename_inputs=False, inplace=True,
                                  name_map={t.name: prefix + t.name for t in model.graph.initializer})
    return model


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def _signature(inputs: list[onnx.ValueInfoProto]) -> list[str]:
    """Names, dtypes and dims (dynamic ones as ``?``), comparable across members and readable in a message."""
    def dims(t) -> str:
        return ",".join(str(d.dim_value) if d.HasField("dim_value") else "?" for d in t.tensor_type.shape.dim)
    return [f"{i.name}:{TensorProto.DataType.Name(i.type.tensor_type.elem_type)}[{dims(i.type)}]" for i in inputs]


def fused_model(members: dict[str, str | Path], rule: FusionRule) -> onnx.ModelProto:
    """One ONNX model of the member ONNX files ``members`` (name → path, in ensemble order) and ``rule``: inputs
    the members' (shared), outputs ``prob`` FP32 [B, 1] and ``weights`` FP32 [B, N]. CtrError for a rule with
    no ONNX form (collaborative, unknown), members whose inputs differ, or a graph onnx.checker refuses."""
    mode = getattr(rule, "mode", None)
    if mode not in WEIGHT_GRAPHS:
        raise CtrError(f"fusion mode {mode!r} has no fused ONNX graph; expected one of {tuple(WEIGHT_GRAPHS)} "
                       f"(a collaborative ensemble's head weights member representations, not probabilities)")
    if not members:
        raise CtrError("a fused ONNX model needs at least one member")
    if _FUSION.rstrip("/") in members:
        raise CtrError(f"member name {_FUSION.rstrip('/')!r} is reserved for the fusion step's names")
    loaded = {name: onnx.load(str(path)) for name, path in members.items()}
    first_name, first = next(iter(loaded.items()))
    inputs, opsets = _inputs(first), {}
    nodes, inits, infos, functions = [], [], [], []
    for name, model in loaded.items():
        if _signature(_inputs(model)) != _signature(inputs):
            raise CtrError(f"member {name!r} ({members[name]}) takes inputs {_signature(_inputs(model))}, but "
                           f"{first_name!r} takes {_signature(inputs)}: the members of one ensemble share one feature spec")
        if _MEMBER_PROB not in {o.name for o in model.graph.output}:
            raise CtrError(f"member {name!r} ({members[name]}) has no output {_MEMBER_PROB!r}")
        for o in model.opset_import:
            opsets.setdefault(o.domain, o.version)
            if opsets[o.domain] != o.version or (o.domain in ("", "ai.onnx") and o.version != OPSET):
                raise CtrError(f"member {name!r} ({members[name]}) imports opset {o.version} of domain "
                               f"{o.domain or 'ai.onnx'!r}; the fused graph is built for opset {OPSET}")
        model = _prefixed(model, f"{name}/")
        graph = _prune(model.graph, [f"{name}/{_MEMBER_PROB}"])
        nodes += graph.node
        inits += graph.initializer
        infos += graph.value_info
        functions += model.functions
    opsets.setdefault("", OPSET)
    n = len(loaded)
    op = _Ops()
    probs = op("Concat", *(f"{name}/{_MEMBER_PROB}" for name in loaded), axis=1)  # (B, N)
    _fusion(op, probs, rule, n)
    batch = next(o for o in first.graph.output if o.name == _MEMBER_PROB).type.tensor_type.shape.dim[0]
    batch = batch.dim_param or batch.dim_value or "batch"
    outputs = [helper.make_tensor_value_info(PROB, TensorProto.FLOAT, [batch, 1]),
               helper.make_tensor_value_info(WEIGHTS, TensorProto.FLOAT, [batch, n])]
    graph = helper.make_graph(nodes + op.nodes, "fused_ensemble", inputs, outputs, inits + op.consts, value_info=infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=functions, producer_name="ctr-ensemble",
                              doc_string=f"{' + '.join(loaded)} fused by {rule.describe()}")
    model.ir_version = max(m.ir_version for m in loaded.values())  # not onnx's newest: ORT may not read that yet
    helper.set_model_props(model, {"members": json.dumps(list(loaded)), "fusion": json.dumps(rule.entry())})
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CtrError(f"fused ONNX model of {list(loaded)} fails onnx.checker: {str(e).splitlines()[0]}") from e
    return model


def write_fused_model(members: dict[str, str | Path], rule: FusionRule, path: str | Path) -> Path:
    """``fused_model`` written to ``path`` (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(fused_model(members, rule), str(path))
    return path

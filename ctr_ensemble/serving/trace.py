"""Triton's trace API (``--trace-config``, level TIMESTAMPS): where one request's time goes, model by model.

A server started with ``trace_flags(path)`` writes, when it shuts down, a JSON list of trace entries: per traced
request (and per request an ensemble sends to each of its steps, with ``parent_id`` the ensemble's trace) its
``model_name`` and its timestamps in ns: ``HTTP_RECV_START/END`` or ``GRPC_WAITREAD_START/END`` (the frontend
reading the request), ``REQUEST_START``, ``QUEUE_START``, ``COMPUTE_START``, ``COMPUTE_INPUT_END``,
``COMPUTE_OUTPUT_START``, ``COMPUTE_END``, ``REQUEST_END``, ``HTTP_SEND_START/END`` or ``GRPC_SEND_START/END``.
An ensemble itself has no queue or compute timestamps: its time is its steps' plus the gaps between them.

``breakdown`` turns one top-level request into named stages (µs), in the order they happen:

- ``recv`` / ``send``: the frontend reading the request (HTTP only: gRPC's read timestamps start when its
  handler begins waiting for a request, idle time included) / writing the response (HTTP or gRPC);
- per model the request ran through (the model itself, or an ensemble's steps): ``<model>.queue``
  (QUEUE_START → COMPUTE_START), ``<model>.input`` (→ COMPUTE_INPUT_END: inputs gathered, copied to the
  backend), ``<model>.infer`` (→ COMPUTE_OUTPUT_START: the backend's own work; for a Python model the IPC to its
  stub process is inside), ``<model>.output`` (→ COMPUTE_END);
- an ensemble's ``dispatch`` (its REQUEST_START → the first step's), ``hops`` (between steps: a step's
  REQUEST_START after the steps before it ended, summed), ``collect`` (the last step's REQUEST_END → the
  ensemble's);
- ``total``: REQUEST_START → REQUEST_END of the top-level request (inside the server, frontend excluded).

Tracing every request costs time itself (a few µs per timestamp); the figures are for finding where the time
goes, the untraced latencies are measured separately.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ctr_ensemble.errors import CtrError

RECV = {"http": ("HTTP_RECV_START", "HTTP_RECV_END"), "grpc": ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END")}
# gRPC's WAITREAD_START is when its handler began waiting for the next request: idle time between sequential
# requests, not reading. Only HTTP's recv is a stage.
RECV_STAGE = ("http",)
SEND = {"http": ("HTTP_SEND_START", "HTTP_SEND_END"), "grpc": ("GRPC_SEND_START", "GRPC_SEND_END")}
MODEL_STAGES = (("queue", "QUEUE_START", "COMPUTE_START"), ("input", "COMPUTE_START", "COMPUTE_INPUT_END"),
                ("infer", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"), ("output", "COMPUTE_OUTPUT_START", "COMPUTE_END"))


def trace_flags(path: str | Path) -> list[str]:
    """tritonserver arguments that trace every request at level TIMESTAMPS into ``path`` (written at shutdown)."""
    return ["--trace-config", f"triton,file={path}", "--trace-config", "triton,log-frequency=0",
            "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1", "--trace-config", "count=-1"]


@dataclass
class Trace:
    id: int
    model: str = ""
    parent: int = 0
    ts: dict[str, int] = field(default_factory=dict)  # timestamp name -> ns
    children: list["Trace"] = field(default_factory=list)

    @property
    def protocol(self) -> str | None:
        return next((p for p, (start, _) in RECV.items() if start in self.ts), None)

    def span(self, start: str, end: str) -> float | None:
        """µs from ``start`` to ``end``, None where either is missing."""
        if start in self.ts and end in self.ts:
            return (self.ts[end] - self.ts[start]) / 1e3
        return None


def load(path: str | Path) -> list[Trace]:
    """The top-level requests of a trace file, each with its children (an ensemble's steps), in time order."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CtrError(f"{path}: cannot read the Triton trace file: {e}") from e
    traces: dict[int, Trace] = {}
    for e in entries:
        t = traces.setdefault(int(e["id"]), Trace(int(e["id"])))
        t.model = e.get("model_name", t.model)
        t.parent = int(e.get("parent_id", t.parent) or 0)
        for stamp in e.get("timestamps", []):
            t.ts[stamp["name"]] = int(stamp["ns"])
    for t in traces.values():
        if t.parent in traces:
            traces[t.parent].children.append(t)
    top = [t for t in traces.values() if t.parent not in traces and "REQUEST_START" in t.ts]
    for t in traces.values():
        t.children.sort(key=lambda c: c.ts.get("REQUEST_START", 0))
    return sorted(top, key=lambda t: t.ts["REQUEST_START"])


def breakdown(t: Trace) -> dict[str, float]:
    """The stages (µs) of top-level request ``t`` (see the module docstring); missing timestamps are left out."""
    out: dict[str, float] = {}
    proto = t.protocol
    if proto in RECV_STAGE:
        out["recv"] = t.span(*RECV[proto])
    steps = t.children or [t]
    for s in steps:
        for name, start, end in MODEL_STAGES:
            v = s.span(start, end)
            if v is not None:
                out[f"{s.model}.{name}"] = out.get(f"{s.model}.{name}", 0.0) + v
    if t.children:
        first = t.children[0].ts["REQUEST_START"]
        out["dispatch"] = (first - t.ts["REQUEST_START"]) / 1e3
        hops, done = 0.0, t.children[0].ts.get("REQUEST_END", first)
        for s in t.children[1:]:
            start = s.ts["REQUEST_START"]
            hops += max(0.0, start - done) / 1e3  # steps that overlap (members in parallel) add no gap
            done = max(done, s.ts.get("REQUEST_END", start))
        out["hops"] = hops
        if "REQUEST_END" in t.ts:
            out["collect"] = max(0.0, t.ts["REQUEST_END"] - done) / 1e3
    if proto is not None and t.span(*SEND[proto]) is not None:
        out["send"] = t.span(*SEND[proto])
    total = t.span("REQUEST_START", "REQUEST_END")
    if total is not None:
        out["total"] = total
    return {k: v for k, v in out.items() if v is not None}


def summarize(traces: list[Trace]) -> list[dict]:
    """Median and p90 (µs) of every stage, per (top-level model, protocol), stages in the order they happen."""
    import numpy as np

    groups: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for t in traces:
        groups[(t.model, t.protocol or "?")].append(breakdown(t))
    rows = []
    for (model, proto), parts in groups.items():
        order = list(dict.fromkeys(k for p in parts for k in p))
        for stage in order:
            vals = np.asarray([p[stage] for p in parts if stage in p])
            rows.append({"target": model, "protocol": proto, "stage": stage, "requests": len(vals),
                         "median_us": float(np.median(vals)), "p90_us": float(np.percentile(vals, 90))})
    return rows

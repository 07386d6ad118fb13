"""Triton's Prometheus metrics (port 8002): scrape, diff two scrapes, queue vs compute per model.

Triton's per-model counters are cumulative over the server's life, summed over the requests
each model executed (a request batched with others is charged the whole batch's compute):

- ``nv_inference_request_success`` / ``_failure``: requests
- ``nv_inference_count`` / ``nv_inference_exec_count``: inferences (rows of batch dim) / executions
  (batches the model ran); their ratio is the average batch the dynamic batcher formed
- ``nv_inference_request_duration_us``: end-to-end inside the server
- ``nv_inference_queue_duration_us``: waiting in the scheduler queue (batcher + busy instances)
- ``nv_inference_compute_{input,infer,output}_duration_us``: copying inputs, running, copying outputs

The difference of two scrapes taken before and after a run is what that run cost.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from ctr_ensemble.errors import CtrError

COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_input_duration_us": "compute_input_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_us",
    "nv_inference_compute_output_duration_us": "compute_output_us",
}


def parse(text: str) -> dict[str, dict[str, float]]:
    """{model: {counter: value}} from Prometheus text, summed over versions (and reasons for failures)."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = COUNTERS.get(sample.name) or COUNTERS.get(sample.name.removesuffix("_total"))
            model = sample.labels.get("model")
            if key is None or model is None:
                continue
            row = out.setdefault(model, {k: 0.0 for k in COUNTERS.values()})
            row[key] += float(sample.value)
    return out


def scrape(url: str, timeout: float = 5.0) -> dict[str, dict[str, float]]:
    """Scrape ``http://host:8002/metrics``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse(r.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        raise CtrError(f"cannot scrape Triton metrics at {url}: {e}") from e


@dataclass
class ModelCost:
    """What one model did between two scrapes; times are per request, in ms."""

    model: str
    requests: int
    failures: int
    avg_batch: float  # rows per execution: what dynamic batching achieved
    request_ms: float  # inside the server, end to end
    queue_ms: float
    compute_ms: float  # input + infer + output
    compute_input_ms: float = float("nan")
    compute_infer_ms: float = float("nan")
    compute_output_ms: float = float("nan")

    def as_dict(self) -> dict:
        return {"model": self.model, "requests": self.requests, "failures": self.failures,
                "avg_batch": round(self.avg_batch, 2), "request_ms": round(self.request_ms, 4),
                "queue_ms": round(self.queue_ms, 4), "compute_ms": round(self.compute_ms, 4),
                **{k: round(getattr(self, k), 4) for k in ("compute_input_ms", "compute_infer_ms", "compute_output_ms")}}


def diff(before: dict, after: dict) -> list[ModelCost]:
    """Per-model cost of the traffic between two scrapes (models that served nothing are left out)."""
    out = []
    for model, a in sorted(after.items()):
        b = before.get(model, {k: 0.0 for k in a})
        d = {k: a[k] - b.get(k, 0.0) for k in a}
        n = d["success"]
        if n <= 0 and d["failure"] <= 0:
            continue
        per = (lambda us: us / n / 1e3) if n > 0 else (lambda us: float("nan"))
        compute = d["compute_input_us"] + d["compute_infer_us"] + d["compute_output_us"]
        out.append(ModelCost(
            model=model, requests=int(n), failures=int(d["failure"]),
            avg_batch=d["inferences"] / d["executions"] if d["executions"] > 0 else float("nan"),
            request_ms=per(d["request_us"]), queue_ms=per(d["queue_us"]), compute_ms=per(compute),
            compute_input_ms=per(d["compute_input_us"]), compute_infer_ms=per(d["compute_infer_us"]),
            compute_output_ms=per(d["compute_output_us"]),
        ))
    return out

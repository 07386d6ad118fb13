"""Batched scoring against a running Triton server over HTTP or gRPC (tritonclient)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ctr_ensemble.errors import CtrError

PROTOCOLS = ("http", "grpc")


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as mod
    elif protocol == "grpc":
        import tritonclient.grpc as mod
    else:
        raise CtrError(f"protocol must be http or grpc, got {protocol!r}")
    return mod


@dataclass
class TritonScorer:
    """One client for one protocol; ``score`` sends ``batch_size`` rows per request."""

    url: str
    protocol: str = "http"
    timeout_s: float = 60.0
    latencies_ms: list[float] = field(default_factory=list)

    def __post_init__(self):
        self._mod = _module(self.protocol)
        try:
            if self.protocol == "http":
                self.client = self._mod.InferenceServerClient(self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            else:
                self.client = self._mod.InferenceServerClient(self.url)
        except Exception as e:
            raise CtrError(f"cannot create a Triton {self.protocol} client for {self.url}: {e}") from e

    def check_ready(self, model: str) -> None:
        try:
            ok = self.client.is_server_ready() and self.client.is_model_ready(model)
        except Exception as e:
            raise CtrError(f"Triton at {self.url} ({self.protocol}) is not reachable: {e}") from e
        if not ok:
            raise CtrError(f"model {model!r} is not ready on Triton at {self.url} ({self.protocol})")

    def infer(self, model: str, cat_ids: np.ndarray, num: np.ndarray, outputs: tuple[str, ...] = ("prob",)) -> dict[str, np.ndarray]:
        """One request; returns the requested outputs as numpy arrays."""
        mod = self._mod
        a = mod.InferInput("cat_ids", list(cat_ids.shape), "INT64")
        a.set_data_from_numpy(np.ascontiguousarray(cat_ids, dtype=np.int64))
        inputs = [a]
        if num.shape[1] > 0:  # data without numeric fields: the models have no `num` input
            b = mod.InferInput("num", list(num.shape), "FP32")
            b.set_data_from_numpy(np.ascontiguousarray(num, dtype=np.float32))
            inputs.append(b)
        outs = [mod.InferRequestedOutput(o) for o in outputs]
        t0 = time.perf_counter()
        if self.protocol == "grpc":
            r = self.client.infer(model, inputs, outputs=outs, client_timeout=self.timeout_s)
        else:
            r = self.client.infer(model, inputs, outputs=outs)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return {o: r.as_numpy(o) for o in outputs}

    def score(self, model: str, cat_ids: np.ndarray, num: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Click probabilities (N,) for all rows, ``batch_size`` rows per request."""
        return self.score_outputs(model, cat_ids, num, batch_size)["prob"][:, 0]

    def score_outputs(self, model: str, cat_ids: np.ndarray, num: np.ndarray, batch_size: int = 1024,
                      outputs: tuple[str, ...] = ("prob",)) -> dict[str, np.ndarray]:
        """The requested outputs for all rows (each (N, …)), ``batch_size`` rows per request."""
        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for s in range(0, len(cat_ids), batch_size):
            try:
                out = self.infer(model, cat_ids[s : s + batch_size], num[s : s + batch_size], outputs)
            except CtrError:
                raise
            except Exception as e:  # tritonclient raises InferenceServerException and transport errors
                raise CtrError(f"Triton {self.protocol} request for {model!r} (rows {s}..{s + batch_size - 1}) failed: {e}") from e
            for o in outputs:
                parts[o].append(out[o])
        return {o: np.concatenate(v) if v else np.zeros((0, 1), np.float32) for o, v in parts.items()}

    def close(self) -> None:
        self.client.close()

"""Batched scoring against a running Triton server over HTTP or gRPC (tritonclient)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np

from tritonclient.utils import np_to_triton_dtype

from ctr_ensemble.data.spec import INPUT_DTYPES, feed_rows, slice_feeds
from ctr_ensemble.errors import CtrError

PROTOCOLS = ("http", "grpc")
CALLS = ("sync", "async", "stream")  # gRPC client calls (TritonScorer.infer_with)


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
    """One client for one protocol; ``score`` sends ``batch_size`` rows per request. Not thread-safe (the request
    objects are reused): one scorer per thread."""

    url: str
    protocol: str = "http"
    timeout_s: float = 60.0
    latencies_ms: list[float] = field(default_factory=list)
    _prepared: dict = field(default_factory=dict, init=False, repr=False)
    _stream: queue.Queue | None = field(default=None, init=False, repr=False)
    _sent: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        self._mod = _module(self.protocol)
        try:
            if self.protocol == "http":
                self.client = self._mod.InferenceServerClient(self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            else:
                self.client = self._mod.InferenceServerClient(self.url)
        except Exception as e:
            raise CtrError(f"cannot create a Triton {self.protocol} client for {self.url}: {e}") from e

    def _request(self, model: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]):
        """The InferInput/InferRequestedOutput objects for these inputs, built once per model, names, shapes and
        dtypes and refilled with each request's data: building them is a measurable share of a batch-1 request."""
        arrays = {name: np.ascontiguousarray(v, dtype=INPUT_DTYPES.get(name, v.dtype)) for name, v in feeds.items()}
        key = (model, outputs, *((n, a.shape, a.dtype.str) for n, a in arrays.items()))
        if key not in self._prepared:
            if len(self._prepared) > 64:  # many shapes (e.g. a last partial batch each): keep the cache small
                self._prepared.clear()
            self._prepared[key] = ([self._mod.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype)) for n, a in arrays.items()],
                                   [self._mod.InferRequestedOutput(o) for o in outputs])
        inputs, outs = self._prepared[key]
        for x, a in zip(inputs, arrays.values()):
            x.set_data_from_numpy(a)
        return inputs, outs

    def check_ready(self, model: str) -> None:
        try:
            ok = self.client.is_server_ready() and self.client.is_model_ready(model)
        except Exception as e:
            raise CtrError(f"Triton at {self.url} ({self.protocol}) is not reachable: {e}") from e
        if not ok:
            raise CtrError(f"model {model!r} is not ready on Triton at {self.url} ({self.protocol})")

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = ("prob",)) -> dict[str, np.ndarray]:
        """One request with the model inputs by name (as ``Arrays.feeds()``, dtypes as
        ``data.spec.INPUT_DTYPES``); returns the requested outputs as numpy arrays."""
        inputs, outs = self._request(model, feeds, outputs)
        t0 = time.perf_counter()
        if self.protocol == "grpc":
            r = self.client.infer(model, inputs, outputs=outs, client_timeout=self.timeout_s)
        else:
            r = self.client.infer(model, inputs, outputs=outs)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return {o: r.as_numpy(o) for o in outputs}

    def score(self, model: str, feeds: dict[str, np.ndarray], batch_size: int = 1024) -> np.ndarray:
        """Click probabilities (N,) for all rows, ``batch_size`` rows per request."""
        return self.score_outputs(model, feeds, batch_size)["prob"][:, 0]

    def score_outputs(self, model: str, feeds: dict[str, np.ndarray], batch_size: int = 1024,
                      outputs: tuple[str, ...] = ("prob",)) -> dict[str, np.ndarray]:
        """The requested outputs for all rows (each (N, …)), ``batch_size`` rows per request."""
        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        for s in range(0, feed_rows(feeds), batch_size):
            try:
                out = self.infer(model, slice_feeds(feeds, s, s + batch_size), outputs)
            except CtrError:
                raise
            except Exception as e:  # tritonclient raises InferenceServerException and transport errors
                raise CtrError(f"Triton {self.protocol} request for {model!r} (rows {s}..{s + batch_size - 1}) failed: {e}") from e
            for o in outputs:
                parts[o].append(out[o])
        return {o: np.concatenate(v) if v else np.zeros((0, 1), np.float32) for o, v in parts.items()}

    def infer_with(self, call: str, model: str, feeds: dict[str, np.ndarray],
                   outputs: tuple[str, ...] = ("prob",)) -> dict[str, np.ndarray]:
        """``infer`` by another gRPC client call (``CALLS``): ``sync`` is ``infer``; ``async`` sends with
        ``async_infer`` and waits for its callback; ``stream`` sends on one bidirectional stream, opened on first use
        and kept open, and waits for the answer. One request at a time either way: these compare what each call
        costs the client, they add no concurrency."""
        if call == "sync":
            return self.infer(model, feeds, outputs)
        if self.protocol != "grpc" or call not in CALLS:
            raise CtrError(f"client call {call!r} needs protocol grpc and one of {CALLS} (got {self.protocol})")
        inputs, outs = self._request(model, feeds, outputs)
        if call == "stream":
            if self._stream is None:
                self._stream = queue.Queue()
                self.client.start_stream(callback=lambda result, error: self._stream.put((result, error)))
            self._sent += 1
            rid = str(self._sent)
            self.client.async_stream_infer(model, inputs, outputs=outs, request_id=rid)
            while True:  # an answer to an earlier request that timed out arrives late: it is not this one's
                result, error = self._wait(self._stream, call, model)
                if error is not None or result.get_response().id == rid:
                    break
        else:
            done: queue.Queue = queue.Queue(maxsize=1)
            self.client.async_infer(model, inputs, lambda result, error: done.put((result, error)), outputs=outs,
                                    client_timeout=self.timeout_s)
            result, error = self._wait(done, call, model)
        if error is not None:
            raise CtrError(f"Triton grpc {call} request for {model!r} failed: {error}")
        return {o: result.as_numpy(o) for o in outputs}

    def _wait(self, answers: queue.Queue, call: str, model: str):
        try:
            return answers.get(timeout=self.timeout_s)
        except queue.Empty:
            raise CtrError(f"Triton grpc {call} request for {model!r}: no answer within {self.timeout_s:g}s") from None

    def close(self) -> None:
        if self._stream is not None:
            self.client.stop_stream()
            self._stream = None
        self.client.close()

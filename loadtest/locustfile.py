"""Locust users that score real labelled rows on Triton over gRPC and HTTP (tritonclient).

Run headless, one user class per run (``ctr-ensemble loadtest`` does this for you)::

    CTR_LOADTEST_CONFIG=run/config.json locust -f loadtest/locustfile.py TritonGrpcUser \
        --headless -u 8 -r 8 -t 20s

This file imports only locust, gevent, grpc, numpy and tritonclient, so the same file runs in
the docker-compose locust master/workers. Everything it needs comes from the JSON file named by
``CTR_LOADTEST_CONFIG`` (written by ``ctr-ensemble loadtest``; ``--prepare-only`` writes one
for docker-compose):

    http_url, grpc_url   host:port of Triton
    model                model to call (a member, ``ctr_ensemble``, ...)
    output               output tensor holding the click probability (``prob``)
    rows_file            .npz with one array per model input (named as the model's inputs)
                         and ``label``; rows are the held-out split, already encoded
    inputs               [{"name", "datatype"}] as in the model's metadata
    rows_per_request     rows sent per request
    timeout_s            per-request client timeout
    max_requests         per process; the run stops when reached (bounded in count and time)
    results_dir          where each process writes results-<host>-<pid>.npz when it quits
    stop_file            optional: the run stops (as at max_requests) once this file exists, so a driver
                         (``loadtest.rollout``) can end it when its own steps are done

Per request each user records the raw latency in float ms (perf_counter around ``infer``,
not Locust's rounded buckets), the first row index, the number of rows, success or the error
kind, and for successful requests the predictions and the labels of the rows sent.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import gevent
import numpy as np
from locust import User, events, task
from locust.exception import StopUser
from locust.runners import LocalRunner

# gRPC's C core must cooperate with gevent's loop, before any channel exists.
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

CONFIG_ENV = "CTR_LOADTEST_CONFIG"
ERROR_BACKOFF_S = 0.05  # a dead server answers instantly: do not spin


class _Shared:
    """Per-process state: config, rows, the row cursor and what every user recorded."""

    def __init__(self) -> None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise RuntimeError(f"set {CONFIG_ENV} to the JSON file written by `ctr-ensemble loadtest`")
        self.cfg = json.loads(Path(path).read_text())
        rows = np.load(self.cfg["rows_file"])
        self.inputs = [(i["name"], i["datatype"], np.ascontiguousarray(rows[i["name"]])) for i in self.cfg["inputs"]]
        self.labels = rows["label"]
        self.n = len(self.labels)
        self.rpr = int(self.cfg["rows_per_request"])
        self.cursor = (os.getpid() * self.rpr) % self.n  # workers start at different rows
        self.sent = 0
        self.quitting = False
        self.in_flight = 0  # requests sent and not yet recorded
        self.rec = {k: [] for k in ("t_start", "latency_ms", "row_start", "n_rows", "ok", "error")}
        self.preds: list[np.ndarray] = []
        self.pred_labels: list[np.ndarray] = []
        self.stop_file = self.cfg.get("stop_file")
        self._stop_checked = 0.0
        self.stopped = False

    def stop_asked(self) -> bool:
        """Whether the driver's stop file exists (looked at most every 0.1 s: one stat, not one per request)."""
        if self.stop_file and not self.stopped and time.monotonic() - self._stop_checked > 0.1:
            self._stop_checked = time.monotonic()
            self.stopped = os.path.exists(self.stop_file)
        return self.stopped

    def next_rows(self) -> tuple[int, np.ndarray]:
        # Greenlets switch only on I/O, so this read-modify-write needs no lock.
        start = self.cursor
        self.cursor = (self.cursor + self.rpr) % self.n
        return start, (start + np.arange(self.rpr)) % self.n

    def save(self) -> Path | None:
        if not self.rec["t_start"]:
            return None
        out = Path(self.cfg["results_dir"])
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"results-{socket.gethostname()}-{os.getpid()}.npz"
        np.savez(
            path,
            t_start=np.asarray(self.rec["t_start"], np.float64),
            latency_ms=np.asarray(self.rec["latency_ms"], np.float64),
            row_start=np.asarray(self.rec["row_start"], np.int64),
            n_rows=np.asarray(self.rec["n_rows"], np.int64),
            ok=np.asarray(self.rec["ok"], bool),
            error=np.asarray(self.rec["error"], dtype=str),
            pred=np.concatenate(self.preds) if self.preds else np.zeros(0, np.float32),
            label=np.concatenate(self.pred_labels) if self.pred_labels else np.zeros(0, np.float32),
        )
        return path


_STATE: _Shared | None = None


def state() -> _Shared:
    global _STATE
    if _STATE is None:
        _STATE = _Shared()
    return _STATE


@events.quitting.add_listener
def _save_results(environment, **_kw) -> None:
    if _STATE is not None:
        _STATE.save()


def _error_kind(e: Exception) -> str:
    if isinstance(e, InferenceServerException):
        status = e.status()
        return f"InferenceServerException:{status}" if status else "InferenceServerException"
    return type(e).__name__


class _TritonUser(User):
    """One tritonclient client per user, closed-loop: the next request leaves when the answer is back."""

    abstract = True
    protocol = ""

    def on_start(self) -> None:
        self.s = state()
        cfg = self.s.cfg
        self.model, self.output = cfg["model"], cfg.get("output", "prob")
        self.timeout_s = float(cfg.get("timeout_s", 10.0))
        self.client = self.make_client(cfg)

    def on_stop(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client of a dead server may raise; nothing to keep
            pass

    @task
    def infer(self) -> None:
        s = self.s
        if s.sent >= int(s.cfg.get("max_requests", 1 << 62)) or s.stop_asked():
            if isinstance(self.environment.runner, LocalRunner) and not s.quitting:
                # quit() stops every user greenlet, this one included: run it in its own greenlet,
                # or it dies half-way and the process keeps running until the time limit.
                s.quitting = True
                gevent.spawn(self._quit_when_answered)
            raise StopUser()
        s.sent += 1
        s.in_flight += 1
        start, idx = s.next_rows()
        t_wall = time.time()
        t0 = time.perf_counter()
        exc = None
        try:
            pred = self.call(idx)
            latency_ms = (time.perf_counter() - t0) * 1e3
            s.preds.append(np.asarray(pred, np.float32).reshape(-1))
            s.pred_labels.append(s.labels[idx])
        except Exception as e:  # every failure is recorded by kind, never raised out of the user
            latency_ms = (time.perf_counter() - t0) * 1e3
            exc = e
        s.rec["t_start"].append(t_wall)
        s.rec["latency_ms"].append(latency_ms)
        s.rec["row_start"].append(start)
        s.rec["n_rows"].append(len(idx))
        s.rec["ok"].append(exc is None)
        s.rec["error"].append("" if exc is None else _error_kind(exc))
        s.in_flight -= 1
        self.environment.events.request.fire(
            request_type=self.protocol, name=self.model, response_time=latency_ms,
            response_length=len(idx), exception=exc, context={},
        )
        if exc is not None:
            gevent.sleep(ERROR_BACKOFF_S)

    def _quit_when_answered(self) -> None:
        """At the request bound: let the other users' requests in flight come back and be recorded, then quit."""
        deadline = time.monotonic() + self.timeout_s + 1.0
        while self.s.in_flight > 0 and time.monotonic() < deadline:
            gevent.sleep(0.01)
        self.environment.runner.quit()

    def _inputs(self, mod, idx: np.ndarray) -> list:
        out = []
        for name, dtype, arr in self.s.inputs:
            x = mod.InferInput(name, [len(idx), *arr.shape[1:]], dtype)
            x.set_data_from_numpy(arr[idx])
            out.append(x)
        return out


class TritonGrpcUser(_TritonUser):
    protocol = "grpc"

    def make_client(self, cfg: dict):
        return tgrpc.InferenceServerClient(cfg["grpc_url"])

    def call(self, idx: np.ndarray) -> np.ndarray:
        r = self.client.infer(self.model, self._inputs(tgrpc, idx), outputs=[tgrpc.InferRequestedOutput(self.output)],
                              client_timeout=self.timeout_s)
        return r.as_numpy(self.output)


class TritonHttpUser(_TritonUser):
    protocol = "http"

    def make_client(self, cfg: dict):
        return thttp.InferenceServerClient(cfg["http_url"], connection_timeout=self.timeout_s,
                                           network_timeout=self.timeout_s)

    def call(self, idx: np.ndarray) -> np.ndarray:
        r = self.client.infer(self.model, self._inputs(thttp, idx), outputs=[thttp.InferRequestedOutput(self.output)])
        return r.as_numpy(self.output)

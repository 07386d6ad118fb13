"""Fuzz the served models over HTTP and gRPC (in the spirit of Triton's L0_input_validation and L0_http_fuzz).

Seeded random requests mutate a good request: shapes, dtypes, byte sizes, huge and empty batches,
NaN/Inf, extreme and negative ids, missing, extra and duplicate inputs; on HTTP also raw bodies
(garbage bytes, truncated or ill-typed JSON, binary-data headers that lie about sizes). Every
answer must be a well-formed error (HTTP 4xx with a JSON ``error``; gRPC INVALID_ARGUMENT or
similar with a message) or a correct prediction (equal to ONNX Runtime / the reference fusion);
the server never dies, and a good request is answered correctly after every case.
"""

import http.client
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from ctr_ensemble.export import onnx_export
from ctr_ensemble.layers.fusion import fuse

from .waits import wait_for

pytestmark = pytest.mark.integration
N_CASES = 150  # per protocol
MODELS = ("deepfm", "ctr_ensemble", "ctr_single_hop", "ctr_all_onnx")  # a member and the three served paths
DTYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_, "UINT8": np.uint8}
GRPC_ERRORS = {"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.UNIMPLEMENTED",
               "StatusCode.OUT_OF_RANGE", "StatusCode.RESOURCE_EXHAUSTED"}


class Serve:
    """``ctr-ensemble serve`` (supervised, HTTP behind its guard) as a child process on free ports."""

    def __init__(self, repo, workdir):
        from ctr_ensemble.serving.server import free_ports

        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.out = open(workdir / "serve.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctr_ensemble.cli", "serve", "--repository", str(repo), "--http-port",
             str(self.http_port), "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)],
            cwd=workdir, stdout=self.out, stderr=subprocess.STDOUT)
        def ready():
            assert self.proc.poll() is None, self.log()  # died while starting: its output says why
            return "Triton ready" in self.log()

        wait_for(ready, 240, "ctr-ensemble serve to print 'Triton ready'")

    http_url = property(lambda self: f"127.0.0.1:{self.http_port}")
    grpc_url = property(lambda self: f"127.0.0.1:{self.grpc_port}")

    def log(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def is_running(self) -> bool:
        """Alive and never restarted: a crash the supervisor repaired still counts as one."""
        return self.proc.poll() is None and "restarted tritonserver" not in self.log()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.out.close()


@pytest.fixture(scope="module")
def served(variants_repo, tmp_path_factory):
    """What users run: `ctr-ensemble serve` on the variants repository; the fuzz cases go through it."""
    s = Serve(variants_repo, tmp_path_factory.mktemp("serve"))
    yield s
    crashed = not s.is_running()
    s.stop()
    assert not crashed, s.log()[-3000:]


def _reference(repo, model, cat, num):
    run = lambda m: onnx_export.run_onnx(onnx_export.session(repo / m / "1" / "model.onnx"), {"cat_ids": cat, "num": num})[0]
    if model.startswith("ctr_"):  # the ensemble and its deployment variants: the reference fusion
        return fuse(torch.from_numpy(np.stack([run("deepfm"), run("dcnv2")], 1)))[0][:, 0].numpy()
    return run(model)


def _mutate(rng, cat, num, sizes):
    """One random request: list of (name, array, declared dtype) and whether it is well-formed."""
    n = int(rng.choice([0, 1, 3, 64, 256, 257, 1000]))
    c = np.resize(cat, (n, cat.shape[1])).copy() if n else cat[:0].copy()
    x = np.resize(num, (n, num.shape[1])).copy() if n else num[:0].copy()
    valid = 0 < n <= 256
    if n and rng.random() < 0.4:  # values: extreme ids and non-finite numerics are valid input
        mask = rng.random(c.shape) < 0.3
        c[mask] = rng.choice(np.array([-1, -(2**63), 2**63 - 1, 0, max(sizes), 2**40]), mask.sum())
        m2 = rng.random(x.shape) < 0.3
        x[m2] = rng.choice(np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0], dtype=np.float32), m2.sum())
    inputs = [["cat_ids", c, "INT64"], ["num", x, "FP32"]]
    kinds = ["none", "shape", "dtype", "missing", "extra", "duplicate", "rank", "mismatch"]
    kind = rng.choice(kinds, p=[0.3] + [0.1] * 7)
    if kind == "shape" and n:
        k = int(rng.integers(2))
        arr = inputs[k][1]
        inputs[k][1] = np.ascontiguousarray(arr[:, : max(arr.shape[1] - int(rng.integers(1, 3)), 1)])
        valid = False
    elif kind == "dtype":
        k = int(rng.integers(2))
        name = str(rng.choice([d for d in DTYPES if d != inputs[k][2]]))
        inputs[k][1], inputs[k][2] = inputs[k][1].astype(DTYPES[name]), name
        valid = False
    elif kind == "missing":
        inputs.pop(int(rng.integers(2)))
        valid = False
    elif kind == "extra":
        inputs.append(["bogus", x, "FP32"])
        valid = False
    elif kind == "duplicate":
        inputs.append(list(inputs[0]))
        valid = False
    elif kind == "rank":
        inputs[0][1] = inputs[0][1].reshape(-1)
        valid = False
    elif kind == "mismatch" and n > 1:  # the two inputs disagree on the batch size
        inputs[1][1] = inputs[1][1][:-1]
        valid = False
    return inputs, valid, kind


def _send(server, protocol, model, inputs):
    mod = thttp if protocol == "http" else tgrpc
    client = thttp.InferenceServerClient(server.http_url) if protocol == "http" else tgrpc.InferenceServerClient(server.grpc_url)
    try:
        reqs = []
        for name, arr, dtype in inputs:
            r = mod.InferInput(name, list(arr.shape), dtype)
            r.set_data_from_numpy(np.ascontiguousarray(arr))
            reqs.append(r)
        return client.infer(model, reqs).as_numpy("prob")
    finally:
        client.close()


def _good(server, repo, protocol, cat, num):
    for model in MODELS:
        out = _send(server, protocol, model, [("cat_ids", cat[:8], "INT64"), ("num", num[:8], "FP32")])
        np.testing.assert_allclose(out[:, 0], _reference(repo, model, cat[:8], num[:8]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fuzzed_requests_get_a_clean_error_or_a_correct_answer(served, tiny_repo, tiny_arrays, tiny_spec, protocol):
    server = served
    te = tiny_arrays["test"]
    cat, num = te.cat_ids[:64].copy(), te.num[:64].copy()
    rng = np.random.default_rng(2024 if protocol == "http" else 2025)
    tally = {"answered": 0, "rejected": 0}
    for i in range(N_CASES):
        model = MODELS[i % len(MODELS)]
        with np.errstate(all="ignore"):  # dtype mutations cast NaN to integers on purpose
            inputs, valid, kind = _mutate(rng, cat, num, tiny_spec.cat_sizes)
        try:
            out = _send(server, protocol, model, inputs)
        except InferenceServerException as e:
            status = str(e.status())
            assert (status.startswith("4") if protocol == "http" else status in GRPC_ERRORS), (kind, status, e.message())
            assert e.message(), kind
            assert not valid or inputs[0][1].shape[0] == 0, (kind, "a well-formed request was refused", e.message())
            tally["rejected"] += 1
        else:
            # Only well-formed requests may be answered, and then correctly.
            assert valid, (kind, [(n, a.shape, d) for n, a, d in inputs])
            ref = _reference(tiny_repo, model, inputs[0][1], inputs[1][1])
            np.testing.assert_allclose(out[:, 0], ref, atol=1e-5, rtol=0)
            tally["answered"] += 1
        if i % 25 == 0:
            _good(server, tiny_repo, protocol, cat, num)
    _good(server, tiny_repo, protocol, cat, num)
    assert server.is_running()
    print(f"\nfuzz {protocol}: {N_CASES} cases, {tally['answered']} answered correctly, {tally['rejected']} rejected cleanly")
    assert tally["answered"] > 10 and tally["rejected"] > 10  # both branches were exercised


RAW_BODIES = [
    b"", b"{", b"null", b"[]", b"\xff\xfe\x00garbage", b'{"inputs": 5}', b'{"inputs": [{}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "INT64", "data": "abc"}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "INT64", "data": [1, 2]}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [-1, 26], "datatype": "INT64", "data": []}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "NOPE", "data": [0]}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [10000000, 26], "datatype": "INT64", "data": [0]}]}',
    b'{"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "INT64", "parameters": {"binary_data_size": 4}}]}',
    json.dumps({"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "INT64", "data": ["x"] * 26}]}).encode(),
    b'{"inputs": [], "outputs": [{"name": "nope"}]}',
    b"A" * 200_000,
]


@pytest.mark.parametrize("guarded", [False, True], ids=["triton", "serve"])
def test_http_garbage_bodies_get_json_errors(server, served, tiny_repo, tiny_arrays, guarded):
    """Triton itself answers unparsable JSON with 500 (its choice; the body is still a JSON error) and the
    rest with 400; `serve`'s guard refuses unparsable JSON and impossible shapes with 400 before Triton parses
    them. Either way the server keeps serving."""
    server = served if guarded else server
    te = tiny_arrays["test"]
    rng = np.random.default_rng(7)
    bodies = RAW_BODIES + [bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8)) for _ in range(30)]
    host, port = server.http_url.split(":")
    statuses: dict[int, int] = {}
    for model in MODELS:
        for body in bodies:
            headers = {"Content-Type": "application/json"}
            if body.startswith(b'{"inputs": [{"name": "cat_ids", "shape": [1, 26], "datatype": "INT64", "parameters"'):
                headers["Inference-Header-Content-Length"] = str(len(body))  # binary part promised, none sent
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            conn.close()
            assert resp.status in (400, 404, 413, 500), (body[:80], resp.status, payload[:200])
            assert "error" in json.loads(payload), payload[:200]
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            assert server.is_running()
    _good(server, tiny_repo, "http", te.cat_ids[:64].copy(), te.num[:64].copy())
    print(f"\nhttp garbage ({'serve' if guarded else 'triton'}): {len(bodies) * len(MODELS)} bodies, JSON errors by "
          f"status {dict(sorted(statuses.items()))}")


HUGE_SHAPE = b'{"inputs": [{"name": "cat_ids", "shape": [1000000000, 26], "datatype": "INT64", "data": [0]}]}'


def test_known_triton_bug_huge_declared_json_shape_aborts_the_server(tiny_repo):
    """Triton 2.51 (nvidia-pytriton 0.7.0) aborts (std::bad_alloc) on an HTTP JSON request that declares a
    shape of ~200 GB, before checking it against the data. Not ours to fix: this test documents it (it
    fails once a Triton release rejects the request instead) and that our server wrapper notices the
    death. Mitigation (docs/reliability.md): restart policy + health checks, and no untrusted HTTP/JSON
    clients without a gateway that bounds request shapes."""
    from ctr_ensemble.serving.server import TritonServer

    with TritonServer(tiny_repo) as server:
        host, port = server.http_url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v2/models/deepfm/infer", body=HUGE_SHAPE, headers={"Content-Type": "application/json"})
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        conn.close()
        server._proc.wait(timeout=30)
        assert not server.is_running()


def test_serve_guard_refuses_the_huge_declared_shape_and_nothing_crashes(served, tiny_repo, tiny_arrays):
    """The request above, sent to `ctr-ensemble serve`: its HTTP guard refuses it with a JSON 400 naming the input
    and its shape, so tritonserver never parses it: no crash, no restart (``served`` asserts that at the end)."""
    host, port = served.http_url.split(":")
    for body, headers in [(HUGE_SHAPE, {}), (HUGE_SHAPE + b"\0" * 16, {"Inference-Header-Content-Length": str(len(HUGE_SHAPE))})]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v2/models/deepfm/infer", body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        err = json.loads(resp.read())["error"]
        conn.close()
        assert resp.status == 400 and "'cat_ids'" in err and "[1000000000, 26]" in err, err
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # chunked: no Content-Length to go by
    conn.request("POST", "/v2/models/deepfm/infer", body=iter([HUGE_SHAPE[:20], HUGE_SHAPE[20:]]), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    resp = conn.getresponse()
    assert resp.status == 400 and "[1000000000, 26]" in json.loads(resp.read())["error"]
    conn.close()
    te = tiny_arrays["test"]
    _good(served, tiny_repo, "http", te.cat_ids[:64].copy(), te.num[:64].copy())
    assert served.is_running()

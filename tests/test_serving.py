"""Integration: the real tritonserver on free ports, spoken to with tritonclient over HTTP and gRPC."""

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from ctr_ensemble.errors import CtrError
from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate
from ctr_ensemble.export import onnx_export
from ctr_ensemble.layers.fusion import fuse
from ctr_ensemble.serving.client import TritonScorer

pytestmark = pytest.mark.integration
PROTOCOLS = ["http", "grpc"]
MODELS = ["deepfm", "ctr_ensemble", "ctr_single_hop", "ctr_all_onnx"]  # a member and the three served paths


def _client(server, protocol):
    return thttp.InferenceServerClient(server.http_url) if protocol == "http" else tgrpc.InferenceServerClient(server.grpc_url)


def _infer(server, protocol, model, inputs):
    """inputs: list of (name, array, triton dtype)."""
    mod = thttp if protocol == "http" else tgrpc
    client = _client(server, protocol)
    reqs = []
    for name, arr, dtype in inputs:
        x = mod.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(arr)
        reqs.append(x)
    try:
        return client.infer(model, reqs).as_numpy("prob")
    finally:
        client.close()


def _onnx_probs(repo, model, cat, num):
    if model.startswith("ctr_"):  # the ensemble and its deployment variants: the reference fusion
        members = [onnx_export.run_onnx(onnx_export.session(repo / m / "1" / "model.onnx"), {"cat_ids": cat, "num": num})[0] for m in ("deepfm", "dcnv2")]
        return fuse(torch.from_numpy(np.stack(members, 1)))[0][:, 0].numpy()
    return onnx_export.run_onnx(onnx_export.session(repo / model / "1" / "model.onnx"), {"cat_ids": cat, "num": num})[0]


@pytest.fixture(scope="module")
def rows(tiny_arrays):
    te = tiny_arrays["test"]
    return te.cat_ids[:64].copy(), te.num[:64].copy()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", [*MODELS, "dcnv2"])
def test_served_predictions_match_onnx_and_reference_fusion(server, tiny_repo, rows, protocol, model):
    cat, num = rows
    served = _infer(server, protocol, model, [("cat_ids", cat, "INT64"), ("num", num, "FP32")])[:, 0]
    np.testing.assert_allclose(served, _onnx_probs(tiny_repo, model, cat, num), atol=1e-5, rtol=0)


def _assert_still_serving(server, tiny_repo, rows, protocol, model):
    cat, num = rows
    good = _infer(server, protocol, model, [("cat_ids", cat[:4], "INT64"), ("num", num[:4], "FP32")])[:, 0]
    np.testing.assert_allclose(good, _onnx_probs(tiny_repo, model, cat[:4], num[:4]), atol=1e-5, rtol=0)


BAD_CASES = {
    "wrong_shape": lambda c, n: [("cat_ids", c[:, :-1].copy(), "INT64"), ("num", n, "FP32")],
    "wrong_dtype": lambda c, n: [("cat_ids", c.astype(np.int32), "INT32"), ("num", n, "FP32")],
    "wrong_dtype_num": lambda c, n: [("cat_ids", c, "INT64"), ("num", n.astype(np.float64), "FP64")],
    "missing_input": lambda c, n: [("cat_ids", c, "INT64")],
    "extra_input": lambda c, n: [("cat_ids", c, "INT64"), ("num", n, "FP32"), ("bogus", n, "FP32")],
    "batch_over_max": lambda c, n: [("cat_ids", np.repeat(c, 5, 0)[:257], "INT64"), ("num", np.repeat(n, 5, 0)[:257], "FP32")],
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_requests_get_invalid_argument_and_server_keeps_serving(server, tiny_repo, rows, protocol, model, case):
    cat, num = rows
    with pytest.raises(InferenceServerException) as err:
        _infer(server, protocol, model, BAD_CASES[case](cat, num))
    status = str(err.value.status())
    assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (status, err.value.message())
    assert err.value.message()  # Triton's own explanation, e.g. "unexpected shape for input ..."
    _assert_still_serving(server, tiny_repo, rows, protocol, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_nan_and_out_of_range_ids_get_correct_answers(server, tiny_repo, tiny_spec, rows, protocol, model):
    cat, num = rows
    cat, num = cat.copy(), num.copy()
    cat[0, :] = -7
    cat[1, :] = 2**62
    cat[2, :] = np.asarray(tiny_spec.cat_sizes)
    num[3, :] = np.nan
    num[4, :5] = [np.inf, -np.inf, 1e38, -1e38, np.nan]
    served = _infer(server, protocol, model, [("cat_ids", cat, "INT64"), ("num", num, "FP32")])[:, 0]
    assert np.isfinite(served).all()
    np.testing.assert_allclose(served, _onnx_probs(tiny_repo, model, cat, num), atol=1e-5, rtol=0)
    oov = cat.copy()
    oov[:3] = 0
    np.testing.assert_allclose(served[:3], _onnx_probs(tiny_repo, model, oov, num)[:3], atol=1e-6, rtol=0)
    _assert_still_serving(server, tiny_repo, rows, protocol, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_empty_batch_is_rejected_as_invalid(server, tiny_repo, rows, protocol, model):
    """A request of 0 rows: Triton 2.51 refuses it before any model runs (HTTP 400 / gRPC INVALID_ARGUMENT,
    "input byte size mismatch": it expects at least one row's bytes), and keeps serving. TritonScorer never
    sends one (0 rows score to an empty array without a request)."""
    cat, num = rows
    with pytest.raises(InferenceServerException) as err:
        _infer(server, protocol, model, [("cat_ids", cat[:0], "INT64"), ("num", num[:0], "FP32")])
    assert str(err.value.status()) == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    assert "input byte size mismatch" in err.value.message() and f"for model '{model}'" in err.value.message()
    _assert_still_serving(server, tiny_repo, rows, protocol, model)
    empty = TritonScorer(server.http_url if protocol == "http" else server.grpc_url, protocol)
    assert empty.score(model, {"cat_ids": cat[:0], "num": num[:0]}).shape == (0,) and not empty.latencies_ms


def test_evaluate_all_backends_agree(server, tiny_repo, tiny_data):
    summary = evaluate(tiny_data / "test.tsv", tiny_repo, ["torch", "onnx", "triton_http", "triton_grpc"],
                       EvalTargets(server.http_url, server.grpc_url, batch_size=200), truth=tiny_data / "test.p.npy")
    assert summary["rows"] == 1500 and 0.5 < summary["oracle_auc"] <= 1
    for rows in [*summary["members"].values(), summary["ensemble"]]:
        assert set(rows) == {"torch", "onnx", "triton_http", "triton_grpc"}
        for r in rows.values():
            assert r["max_abs_diff"] <= 1e-5 and 0.5 < r["auc"] < 1
            assert r["ne_base"] == "train" and r["ne"] > 0 and r["calibration"] > 0 and 0 <= r["ece"] <= 1
    for b in ("triton_http", "triton_grpc"):
        assert summary["ensemble"][b]["fusion_max_abs_diff"] <= 1e-6


def test_scorer_reports_unreachable_server():
    from ctr_ensemble.errors import CtrError
    from ctr_ensemble.serving.server import free_port

    scorer = TritonScorer(f"127.0.0.1:{free_port()}", "http", timeout_s=2)
    with pytest.raises(CtrError, match="not reachable"):
        scorer.check_ready("ctr_ensemble")


@pytest.mark.parametrize("model", ["ctr_ensemble", "ctr_all_onnx"])
def test_grpc_client_calls_and_reused_requests_agree(server, tiny_repo, rows, model):
    cat, num = rows
    scorer = TritonScorer(server.grpc_url, "grpc")
    try:
        for n in (4, 64, 4):  # the cached request objects are refilled, also after another shape
            feeds = {"cat_ids": cat[:n], "num": num[:n]}
            want = _onnx_probs(tiny_repo, model, cat[:n], num[:n])
            for call in ("sync", "async", "stream"):
                np.testing.assert_allclose(scorer.infer_with(call, model, feeds)["prob"][:, 0], want, atol=1e-5, rtol=0)
        with pytest.raises(CtrError, match="failed"):  # an error answer on the stream, and the stream still serves
            scorer.infer_with("stream", model, {"cat_ids": cat[:4, :-1].copy(), "num": num[:4]})
        np.testing.assert_allclose(scorer.infer_with("stream", model, {"cat_ids": cat[:4], "num": num[:4]})["prob"][:, 0],
                                   _onnx_probs(tiny_repo, model, cat[:4], num[:4]), atol=1e-5, rtol=0)
    finally:
        scorer.close()
    with pytest.raises(CtrError, match="needs protocol grpc"):
        TritonScorer(server.http_url, "http").infer_with("stream", model, {"cat_ids": cat[:4], "num": num[:4]})


@pytest.mark.parametrize("model", ["ctr_ensemble", "ctr_single_hop", "ctr_all_onnx"])
def test_concurrent_requests_batched_together_each_get_their_own_answer(server, tiny_repo, tiny_arrays, model):
    """Dynamic batching merges concurrent requests (members, fusion, variants): every answer must still be its rows'."""
    from concurrent.futures import ThreadPoolExecutor

    te = tiny_arrays["test"]
    want = _onnx_probs(tiny_repo, model, te.cat_ids[:400], te.num[:400])

    def user(u):
        scorer, bad = TritonScorer(server.http_url if u % 2 else server.grpc_url, "http" if u % 2 else "grpc"), 0
        for i in range(12):
            s, n = (u * 37 + i * 11) % 300, 1 + (u + i) % 9  # different sizes, so a mix-up cannot go unseen
            got = scorer.infer(model, {"cat_ids": te.cat_ids[s:s + n], "num": te.num[s:s + n]})["prob"][:, 0]
            bad += int(not np.allclose(got, want[s:s + n], atol=1e-5, rtol=0))
        scorer.close()
        return bad

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(user, range(8))) == 0

"""serving.trace: Triton trace files parsed into a per-stage timeline, on a hand-written file and a real server's."""

import json

import pytest

from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving import trace
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer


def _ts(**kw):
    return [{"name": k, "ns": v} for k, v in kw.items()]


def test_breakdown_of_an_ensemble_request_names_every_stage_and_gap(tmp_path):
    us = 1000  # the file is in ns
    entries = [
        {"id": 1, "model_name": "ctr_ensemble", "model_version": 1},
        {"id": 1, "timestamps": _ts(HTTP_RECV_START=0, HTTP_RECV_END=20 * us, REQUEST_START=30 * us)},
        {"id": 2, "model_name": "deepfm", "parent_id": 1},
        {"id": 2, "timestamps": _ts(REQUEST_START=40 * us, QUEUE_START=41 * us, COMPUTE_START=45 * us, COMPUTE_INPUT_END=50 * us,
                                    COMPUTE_OUTPUT_START=150 * us, COMPUTE_END=160 * us, REQUEST_END=165 * us)},
        {"id": 3, "model_name": "dcnv2", "parent_id": 1},  # in parallel with deepfm: no gap between them
        {"id": 3, "timestamps": _ts(REQUEST_START=42 * us, QUEUE_START=43 * us, COMPUTE_START=44 * us, COMPUTE_INPUT_END=46 * us,
                                    COMPUTE_OUTPUT_START=170 * us, COMPUTE_END=175 * us, REQUEST_END=180 * us)},
        {"id": 4, "model_name": "fusion", "parent_id": 1},
        {"id": 4, "timestamps": _ts(REQUEST_START=230 * us, QUEUE_START=231 * us, COMPUTE_START=232 * us, COMPUTE_INPUT_END=240 * us,
                                    COMPUTE_OUTPUT_START=300 * us, COMPUTE_END=305 * us, REQUEST_END=310 * us)},
        {"id": 1, "timestamps": _ts(REQUEST_END=330 * us, HTTP_SEND_START=335 * us, HTTP_SEND_END=345 * us)},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(entries))
    [t] = trace.load(path)
    assert t.model == "ctr_ensemble" and t.protocol == "http" and [c.model for c in t.children] == ["deepfm", "dcnv2", "fusion"]
    b = trace.breakdown(t)
    assert b["recv"] == 20 and b["send"] == 10 and b["total"] == 300
    assert b["deepfm.queue"] == 4 and b["deepfm.infer"] == 100 and b["fusion.infer"] == 60
    assert b["dispatch"] == 10 and b["hops"] == 50 and b["collect"] == 20  # fusion starts 50 µs after dcnv2 ends
    [row] = [r for r in trace.summarize([t]) if r["stage"] == "hops"]
    assert row == {"target": "ctr_ensemble", "protocol": "http", "stage": "hops", "requests": 1, "median_us": 50.0, "p90_us": 50.0}


def test_unreadable_trace_file_is_a_clear_error(tmp_path):
    (tmp_path / "t.json").write_text("[{")
    with pytest.raises(CtrError, match="cannot read the Triton trace file"):
        trace.load(tmp_path / "t.json")


@pytest.mark.integration
def test_a_traced_server_writes_the_timeline_of_every_path(variants_repo, tiny_arrays, tmp_path):
    feeds = tiny_arrays["test"].feeds(slice(0, 1))
    models = ["ctr_ensemble", "ctr_single_hop", "ctr_all_onnx"]
    with TritonServer(variants_repo, extra_args=trace.trace_flags(tmp_path / "trace.json")) as server:
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            s = TritonScorer(url, proto)
            for m in models:
                for _ in range(3):
                    s.infer(m, feeds)
            s.close()
    traces = trace.load(tmp_path / "trace.json")  # written when the server shut down
    assert sorted({(t.model, t.protocol) for t in traces}) == sorted((m, p) for m in models for p in ("http", "grpc"))
    ens = next(t for t in traces if t.model == "ctr_ensemble")
    assert sorted(c.model for c in ens.children) == ["dcnv2", "deepfm", "fusion"]
    b = trace.breakdown(ens)
    assert {"recv", "deepfm.infer", "fusion.infer", "hops", "total"} <= set(b) and b["total"] > 0
    hop = trace.breakdown(next(t for t in traces if t.model == "ctr_single_hop"))
    assert "ctr_single_hop.infer" in hop and "hops" not in hop

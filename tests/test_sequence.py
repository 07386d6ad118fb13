"""Behaviour-sequence features: spec, encoder, masked embedding, InterFormer's sequence arch, export with a
dynamic sequence axis, and a served ensemble taking seq_ids (exactly max_len wide) / seq_len over HTTP and gRPC."""

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from ctr_ensemble import models
from ctr_ensemble.data.encode import Encoder
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.data.synth import SynthConfig, SynthWorld, generate
from ctr_ensemble.errors import CtrError
from ctr_ensemble.evaluation import check_export
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.layers.embedding import FeatureEmbedding
from ctr_ensemble.layers.fusion import fuse
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_CARDS, TINY_MODEL

MAX_LEN = 8


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqdata")
    cfg = SynthConfig(seed=5, cardinalities=TINY_CARDS, seq_max_len=MAX_LEN, seq_items=300,
                      splits={"train": 4000, "val": 1000, "test": 600})
    meta = generate(out, cfg)
    spec = fit(out / "train.parquet", min_count=2, seq_max_len=MAX_LEN)
    arrays = {s: encode_file(out / f"{s}.parquet", spec) for s in ("train", "val", "test")}
    return out, meta, spec, arrays


def _spec_with_history(tmp_path, histories, max_len=3, min_count=1):
    n = len(histories)
    table = pa.table({"label": pa.array([i % 2 for i in range(n)]), "c": pa.array(["a"] * n),
                      "x": pa.array([1.0] * n), "hist": pa.array(histories, pa.list_(pa.string()))})
    path = tmp_path / "h.parquet"
    pq.write_table(table, path)
    return fit(path, min_count=min_count, seq_max_len=max_len), path


def test_encoder_keeps_the_most_recent_items_left_aligned(tmp_path):
    hist = [["a", "b", "c", "d", "e"], [], None, ["b"], ["zzz", "a"]]
    spec, path = _spec_with_history(tmp_path, [h if h is not None else None for h in hist[:4]] + [["e", "a"]])
    assert spec.sequence.name == "hist" and spec.input_names == ("cat_ids", "num", "seq_ids", "seq_len")
    assert spec.input_dims["seq_ids"] == [3] and spec.input_dims["seq_len"] == [1]  # served width = max_len
    assert spec.row_elements == spec.n_cat + spec.n_num + 3 + 1
    assert spec.row_bytes == 8 * spec.n_cat + 4 * spec.n_num + 8 * 3 + 8
    vocab = {t: i + 1 for i, t in enumerate(spec.sequence.vocab)}
    ids, length = Encoder(spec).encode_sequence(pa.array(hist, pa.list_(pa.string())))
    assert ids.shape == (5, 3) and length[:, 0].tolist() == [3, 0, 0, 1, 2]
    assert ids[0].tolist() == [vocab["c"], vocab["d"], vocab["e"]]  # the oldest two dropped
    assert ids[1].tolist() == [0, 0, 0] and ids[3].tolist() == [vocab["b"], 0, 0]
    assert ids[4].tolist() == [0, vocab["a"], 0]  # "zzz" was never seen: OOV id 0, still counted
    # A sliced Arrow array (offset != 0) encodes the same rows.
    ids2, length2 = Encoder(spec).encode_sequence(pa.array(hist, pa.list_(pa.string())).slice(3))
    np.testing.assert_array_equal(ids2, ids[3:])
    np.testing.assert_array_equal(length2, length[3:])


def test_spec_v2_round_trip_and_v1_files_still_load(tmp_path):
    spec, _ = _spec_with_history(tmp_path, [["a"], ["a", "b"]])
    spec.save(tmp_path / "s.json")
    back = FeatureSpec.load(tmp_path / "s.json")
    assert back.sequence == spec.sequence and back.fingerprint() == spec.fingerprint()
    d = json.loads((tmp_path / "s.json").read_text())
    d.pop("sequence")
    d["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(d))
    assert FeatureSpec.load(tmp_path / "v1.json").sequence is None
    no_seq = fit(tmp_path / "h.parquet", min_count=1, use_sequence=False)
    assert no_seq.sequence is None and no_seq.input_names == ("cat_ids", "num")


def test_file_without_the_specs_sequence_is_rejected(tmp_path):
    spec, path = _spec_with_history(tmp_path, [["a"], ["b"]])
    pq.write_table(pq.read_table(path).drop(["hist"]), tmp_path / "nohist.parquet")
    with pytest.raises(CtrError, match="behaviour sequence 'hist'.*no sequence column"):
        encode_file(tmp_path / "nohist.parquet", spec)


def test_pooled_history_ignores_padding_and_has_an_empty_vector():
    torch.manual_seed(0)
    emb = FeatureEmbedding([5, 7], [0.0], [1.0], 4, seq_size=10)
    assert emb.n_fields == 4  # 2 categorical + 1 numeric + the pooled history
    cat, num = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1.0], [2.0]])
    seq = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    length = torch.tensor([[2], [0]])
    out = emb(cat, num, seq, length)
    garbage = seq.clone()
    garbage[:, 2:] = torch.tensor([[-5, 99], [2**40, -1]])
    garbage[1] = 9
    torch.testing.assert_close(out, emb(cat, num, garbage, length), rtol=0, atol=0)
    torch.testing.assert_close(out[0, -1], emb.seq_table.weight[[1, 2]].mean(0))
    torch.testing.assert_close(out[1, -1], emb.seq_empty)


def test_interformer_reads_the_sequence_through_a_mask(seq_data):
    _, _, spec, arrays = seq_data
    torch.manual_seed(0)
    model = models.build("interformer", models.make_config("interformer", TINY_MODEL["interformer"]), spec).eval()
    f = {k: torch.from_numpy(v) for k, v in arrays["test"].feeds(slice(0, 64)).items()}
    p, h = model(**f)
    pad = f["seq_ids"].clone()
    pos = torch.arange(pad.shape[1])[None, :]
    pad[pos >= f["seq_len"]] = 12345  # padding slots hold garbage: nothing may change
    p2, _ = model(**{**f, "seq_ids": pad})
    torch.testing.assert_close(p, p2, rtol=0, atol=1e-6)
    shorter, _ = model(**{**f, "seq_len": torch.zeros_like(f["seq_len"])})
    assert not torch.allclose(p, shorter)  # the history matters
    huge, _ = model(**{**f, "seq_len": torch.full_like(f["seq_len"], 2**40)})  # clamped to L, no failure
    assert torch.isfinite(huge).all()
    model.train()
    logit, _ = model.logits(f["cat_ids"], f["num"], f["seq_ids"], f["seq_len"])
    logit.sum().backward()
    assert model.embedding.seq_table.weight.grad.abs().sum() > 0 and model.recency.weight.grad.abs().sum() > 0


def test_synthetic_history_influences_p(seq_data):
    cfg = SynthConfig(seed=5, cardinalities=TINY_CARDS, seq_max_len=MAX_LEN, seq_items=300)
    world, flat = SynthWorld(cfg), SynthWorld(replace(cfg, seq_scale=0.0))
    logit = world._sample(np.random.default_rng(1), 3000)[3]
    logit_flat = flat._sample(np.random.default_rng(1), 3000)[3]  # same rows, no taste x target term
    assert np.std((logit - world.bias) - (logit_flat - flat.bias)) > 0.3
    out, meta, spec, arrays = seq_data
    assert meta["splits"]["train"]["file"] == "train.parquet"
    assert spec.fitted_on["sequence"]["rows_truncated"] > 0  # some histories exceed max_len
    tr = arrays["train"]
    assert tr.seq_ids.shape == (4000, MAX_LEN) and (tr.seq_len[:, 0] == 0).any()


def test_check_export_covers_sequence_lengths_for_a_user_checkpoint(seq_data, tmp_path):
    out, _, spec, arrays = seq_data
    ck = train_member("interformer", "interformer", models.make_config("interformer", TINY_MODEL["interformer"]),
                      spec, arrays["train"], arrays["val"], TrainConfig(epochs=1, max_steps=5, batch_size=256))
    path = checkpoint.save(ck, tmp_path / "if.pt")
    res = check_export.run(None, path, out / "test.parquet", None, rows=300)
    assert res["passed"], res
    assert {"seq_len_0", "seq_len_1", "seq_len_max", f"seq_width_{MAX_LEN // 2}"} <= set(res["cases"])


@pytest.mark.integration
def _raw_infer(url, feeds, protocol="http"):
    mod = thttp if protocol == "http" else tgrpc
    client = mod.InferenceServerClient(url)
    inputs = []
    for name, v in feeds.items():
        x = mod.InferInput(name, list(v.shape), "FP32" if name == "num" else "INT64")
        x.set_data_from_numpy(v)
        inputs.append(x)
    try:
        return client.infer("ctr_ensemble", inputs)
    finally:
        client.close()


def test_served_sequence_ensemble_matches_onnx_and_bounds_the_history_width(seq_data, tmp_path):
    """The ONNX graphs take any history width; the served configs take exactly max_len (the encoder's width):
    a shorter history is sent zero-padded (same answer as ONNX on the narrow rows), a wider one is refused."""
    _, _, spec, arrays = seq_data
    cks = []
    for arch in ("deepfm", "interformer"):
        ck = train_member(arch, arch, models.make_config(arch, TINY_MODEL[arch]), spec, arrays["train"],
                          arrays["val"], TrainConfig(epochs=1, max_steps=15, batch_size=256, seed=4))
        cks.append(checkpoint.load(checkpoint.save(ck, tmp_path / f"{arch}.pt")))
    repo = tmp_path / "repo"
    manifest = write_repository(cks, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu"),
                                parity_rows=arrays["val"].feeds(slice(0, 500)))
    assert all(m["parity_stress"]["prob_max_abs_diff"] <= 1e-5 for m in manifest["members"].values())
    assert manifest["limits"]["seq_max_len"] == MAX_LEN and manifest["limits"]["max_batch_size"] == 256
    for model in ("ctr_ensemble", *(ck.name for ck in cks)):
        cfg = (repo / model / "config.pbtxt").read_text()
        assert '"seq_ids"' in cfg and f"dims: {MAX_LEN}\n" in cfg and "dims: -1" not in cfg
    te = arrays["test"]
    stress = onnx_export.stress_rows(te.feeds(), spec, max_rows=200)
    narrow = {**te.feeds(slice(0, 200)), "seq_ids": np.ascontiguousarray(te.seq_ids[:200, :3]),
              "seq_len": np.minimum(te.seq_len[:200], 3)}
    padded = {**narrow, "seq_ids": np.pad(narrow["seq_ids"], ((0, 0), (0, MAX_LEN - 3)))}
    with TritonServer(repo) as server:
        for feeds, onnx_feeds in ((te.feeds(slice(0, 200)),) * 2, (stress,) * 2, (padded, narrow)):
            ref = {ck.name: onnx_export.run_onnx(onnx_export.session(repo / ck.name / "1" / "model.onnx"), onnx_feeds)[0]
                   for ck in cks}
            fused = fuse(torch.from_numpy(np.stack([ref[c.name] for c in cks], 1)))[0][:, 0].numpy()
            for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
                scorer = TritonScorer(url, protocol)
                for ck in cks:
                    np.testing.assert_allclose(scorer.score(ck.name, feeds, 64), ref[ck.name], atol=1e-5, rtol=0)
                np.testing.assert_allclose(scorer.score("ctr_ensemble", feeds, 64), fused, atol=1e-5, rtol=0)
                scorer.close()
        # A request without seq_len, one with a history wider than max_len (max_len + 1), and one not padded to
        # max_len are refused with Triton's message (HTTP 400, gRPC INVALID_ARGUMENT); the server keeps serving.
        four = te.feeds(slice(0, 4))
        wide = np.pad(four["seq_ids"], ((0, 0), (0, 1)), constant_values=1)
        for bad in ({k: v for k, v in four.items() if k != "seq_len"}, {**four, "seq_ids": wide},
                    {**four, "seq_ids": np.ascontiguousarray(four["seq_ids"][:, :3])}):
            for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
                with pytest.raises(InferenceServerException) as err:
                    _raw_infer(url, bad, protocol)
                assert str(err.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (protocol, err.value.status())
                assert "seq_len" in err.value.message() or "seq_ids" in err.value.message(), err.value.message()
        assert TritonScorer(server.http_url, "http").score("ctr_ensemble", te.feeds(slice(0, 8)), 8).shape == (8,)

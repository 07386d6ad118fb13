"""EMOFM (arXiv 2310.04482): the WM/HM/HMM variants and type-wise predictors."""

import numpy as np
import pytest
import torch

from ctr_ensemble import metrics, models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_MODEL

TYPE_FIELD = "C9"  # a low-cardinality field (a handful of ids), like the paper's interaction type


def _cfg(**over):
    return models.make_config("emofm", {**TINY_MODEL["emofm"], **over})


@pytest.mark.parametrize(
    "over", [{"variant": "wm"}, {"variant": "hm"}, {"variant": "hmm"}, {"variant": "hmm", "type_field": TYPE_FIELD}],
    ids=["wm", "hm", "hmm", "hmm-typewise"],
)
def test_variant_trains_and_exports_with_parity(over, tiny_spec, tiny_arrays, tmp_path):
    tr, va = tiny_arrays["train"], tiny_arrays["val"]
    ck = train_member("emofm", "emofm", _cfg(**over), tiny_spec, tr, va,
                      TrainConfig(epochs=1, batch_size=256, max_steps=12, seed=1))
    model = ck.build()
    assert ck.metrics["history"][0]["train_logloss"] < 0.7
    with torch.no_grad():  # mixer gates start at 0; open them so the export really carries the attention
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.7)
    path = onnx_export.export_member(model, tiny_spec, tmp_path / "m.onnx")
    sess = onnx_export.session(path)
    stress = onnx_export.stress_rows(va.feeds(), tiny_spec, seed=0, max_rows=256)
    for feeds in [va.feeds(slice(0, 256)), stress]:
        par = onnx_export.parity(model, sess, feeds)
        assert par["prob_max_abs_diff"] <= metrics.PARITY_TOL, par
        assert par["repr_max_abs_diff"] <= metrics.PARITY_TOL, par


def test_variants_differ_in_structure(tiny_spec):
    n_params = {v: sum(p.numel() for p in models.build("emofm", _cfg(variant=v), tiny_spec).parameters())
                for v in ("wm", "hm", "hmm")}
    assert n_params["wm"] != n_params["hm"] < n_params["hmm"]
    with pytest.raises(CtrError, match="unknown variant 'xm'"):
        models.build("emofm", _cfg(variant="xm"), tiny_spec)


def _typewise_model(spec):
    torch.manual_seed(0)
    model = models.build("emofm", _cfg(type_field=TYPE_FIELD), spec).eval()
    with torch.no_grad():  # distinct per-type predictors (they start at zero)
        model.type_head.weight.normal_(0, 1.0)
        model.type_head.bias.normal_(0, 1.0)
    return model, [f.name for f in spec.categorical].index(TYPE_FIELD)


def test_typewise_predictor_is_selected_by_the_type_id(tiny_spec, tiny_arrays):
    model, j = _typewise_model(tiny_spec)
    n_types = tiny_spec.categorical[j].size
    assert model.type_head.weight.shape == (n_types, model.repr_dim) and n_types >= 3
    with torch.no_grad():  # same embedding for types 1 and 2: repr is identical, only the predictor differs
        off = int(model.embedding.offsets[j])
        model.embedding.table.weight[off + 2] = model.embedding.table.weight[off + 1]
    cat = torch.from_numpy(tiny_arrays["test"].cat_ids[:16].copy())
    num = torch.from_numpy(tiny_arrays["test"].num[:16].copy())
    a, b = cat.clone(), cat.clone()
    a[:, j], b[:, j] = 1, 2
    with torch.no_grad():
        (pa, ha), (pb, hb) = model(a, num), model(b, num)
        torch.testing.assert_close(ha, hb)
        assert (pa - pb).abs().min() > 1e-6
        # Row by row, the logit is the shared head plus the predictor of that row's type.
        mixed = a.clone()
        mixed[::2, j] = 2
        logit, h = model.logits(mixed, num)
        t = mixed[:, j]
        want = model.head(h) + (h * model.type_head.weight[t]).sum(1, keepdim=True) + model.type_head.bias[t]
        torch.testing.assert_close(logit, want)


def test_out_of_range_type_ids_use_the_oov_predictor(tiny_spec, tiny_arrays):
    model, j = _typewise_model(tiny_spec)
    cat = torch.from_numpy(tiny_arrays["test"].cat_ids[:4].copy())
    num = torch.from_numpy(tiny_arrays["test"].num[:4].copy())
    oov = cat.clone()
    oov[:, j] = 0
    with torch.no_grad():
        want = model(oov, num)[0]
        for bad in (-1, tiny_spec.categorical[j].size, 2**62):
            x = cat.clone()
            x[:, j] = bad
            torch.testing.assert_close(model(x, num)[0], want)


def test_unknown_type_field_is_a_clear_error(tiny_spec):
    with pytest.raises(CtrError, match=r"type_field 'C99' is not a categorical field"):
        models.build("emofm", _cfg(type_field="C99"), tiny_spec)
    with pytest.raises(CtrError, match="not divisible"):
        models.build("emofm", _cfg(n_heads=3), tiny_spec)

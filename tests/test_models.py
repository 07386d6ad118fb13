import dataclasses

import numpy as np
import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.data.encode import Arrays
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models.predict import predict
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_MODEL


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_shapes_and_oov_and_nan_never_crash(arch, tiny_spec, tiny_arrays):
    torch.manual_seed(0)
    model = models.build(arch, models.make_config(arch, TINY_MODEL[arch]), tiny_spec).eval()
    te = tiny_arrays["test"]
    cat = torch.from_numpy(te.cat_ids[:8].copy())
    num = torch.from_numpy(te.num[:8].copy())
    p, h = model(cat, num)
    assert p.shape == (8, 1) and h.shape == (8, model.repr_dim)
    cat[0] = -1
    cat[1] = 2**62
    cat[2] = torch.tensor(tiny_spec.cat_sizes)  # one past each vocabulary
    num[3] = float("nan")
    num[4] = float("inf")
    num[5] = -1e30
    p2, h2 = model(cat, num)
    assert torch.isfinite(p2).all() and torch.isfinite(h2).all()
    # Out-of-range ids behave exactly like the OOV id 0.
    zero = cat.clone()
    zero[:3] = 0
    torch.testing.assert_close(model(zero, num)[0], p2)


def test_unknown_model_and_config_keys():
    with pytest.raises(CtrError, match="unknown model 'xdeepfm'"):
        models.make_config("xdeepfm")
    with pytest.raises(CtrError, match=r"unknown config keys \['hiden'\]"):
        models.make_config("deepfm", {"hiden": [8]})


def _toy(spec, n, seed):
    """A learnable toy task: the click logit follows the first id's parity plus the first numeric."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(1, 40, (n, spec.n_cat)).astype(np.int64)
    num = np.exp(rng.normal(1, 1, size=(n, spec.n_num))).astype(np.float32)
    logit = 3.0 * (2 * (cat[:, 0] % 2) - 1) + 1.5 * (np.log1p(num[:, 0]) - 1.2)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return Arrays(cat, num, y)


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_training_learns_a_toy_task_and_is_reproducible(arch, tiny_spec):
    tr, va = _toy(tiny_spec, 4000, 0), _toy(tiny_spec, 1000, 1)
    cfg = models.make_config(arch, TINY_MODEL[arch])
    a = train_member(arch, arch, cfg, tiny_spec, tr, va, TrainConfig(epochs=3, batch_size=128, lr=3e-3, patience=3, seed=5))
    b = train_member(arch, arch, cfg, tiny_spec, tr, va, TrainConfig(epochs=3, batch_size=128, lr=3e-3, patience=3, seed=5))
    hist = a.metrics["history"]
    assert hist[-1]["train_logloss"] < hist[0]["train_logloss"]
    assert a.metrics["val_auc"] > 0.75
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def test_checkpoint_roundtrip_and_corruption(tmp_path, tiny_checkpoints, tiny_arrays):
    ck = tiny_checkpoints[0]
    path = checkpoint.save(ck, tmp_path / "m.pt")
    back = checkpoint.load(path)
    assert back.arch == ck.arch and dataclasses.asdict(back.config) == dataclasses.asdict(ck.config)
    assert back.spec.fingerprint() == ck.spec.fingerprint()
    te = tiny_arrays["test"]
    np.testing.assert_array_equal(predict(back.build(), te.feeds()), predict(ck.build(), te.feeds()))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CtrError, match="checkpoint is corrupt"):
        checkpoint.load(path)
    (tmp_path / "m.pt.sha256").unlink()  # without the sidecar the damage is still caught by the reader
    path.write_bytes(bytes(data[:1000]))
    with pytest.raises(CtrError, match="not a readable checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CtrError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "o.pt")
    with pytest.raises(CtrError, match="not a ctr-ensemble checkpoint"):
        checkpoint.load(tmp_path / "o.pt")

"""Shared tiny, seeded fixtures: a small synthetic data set, two trained members, a repository, a server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.data.synth import DEFAULT_CARDINALITIES, SynthConfig, generate
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member

torch.set_num_threads(2)

# Small vocabularies keep the tiny members fast; the layout is still the full Criteo one.
TINY_CARDS = tuple(min(c, 300) for c in DEFAULT_CARDINALITIES)
# Tiny overrides per architecture (one line each); every registry member must have one.
TINY_MODEL = {
    "deepfm": {"embedding_dim": 4, "hidden": [16]},
    "dcnv2": {"embedding_dim": 4, "hidden": [16], "cross_layers": 2},
    "dcn": {"embedding_dim": 4, "hidden": [16], "cross_layers": 2},
    "pnn": {"embedding_dim": 4, "hidden": [16]},
    "fibinet": {"embedding_dim": 4, "hidden": [16]},
    "dhen": {"embedding_dim": 4, "hidden": [16], "n_layers": 2, "mlp_hidden": 16},
    "emofm": {"embedding_dim": 4, "hidden": [16], "field_hidden": [4]},
    "interformer": {"embedding_dim": 4, "hidden": [16], "n_layers": 1},
    "lr": {},  # nothing to shrink: one scalar weight per id
}
SPINE_MEMBERS = ("deepfm", "dcnv2")  # the two members of the shared tiny repository


def tiny_synth(seed: int = 3, train: int = 6000, val: int = 1500, test: int = 1500) -> SynthConfig:
    return SynthConfig(seed=seed, cardinalities=TINY_CARDS, splits={"train": train, "val": val, "test": test})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    generate(out, tiny_synth())
    return out


@pytest.fixture(scope="session")
def tiny_spec(tiny_data) -> FeatureSpec:
    return fit(tiny_data / "train.tsv", min_count=2)


@pytest.fixture(scope="session")
def tiny_arrays(tiny_data, tiny_spec):
    return {s: encode_file(tiny_data / f"{s}.tsv", tiny_spec) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def prepared(tiny_data, tmp_path_factory) -> Path:
    """The tiny train split prepared (``data prepare``) in several chunks by 2 worker processes, and val with its spec."""
    from ctr_ensemble.data.prepared import prepare as prep
    from ctr_ensemble.data.prepared.manifest import SPEC_FILE

    out = tmp_path_factory.mktemp("prepared")
    opts = prep.PrepareOptions(min_count=2, chunk_mb=0.25, workers=2)
    r = prep.prepare([tiny_data / "train.tsv"], out / "train", opts, progress=False)
    assert r.shards >= 4 and r.rows == 6000
    prep.prepare([tiny_data / "val.tsv"], out / "val", replace(opts, workers=1), spec=out / "train" / SPEC_FILE,
                 progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_spec, tiny_arrays) -> list[checkpoint.Checkpoint]:
    out = tmp_path_factory.mktemp("ckpt")
    cks = []
    for arch in SPINE_MEMBERS:
        over = TINY_MODEL[arch]
        ck = train_member(arch, arch, models.make_config(arch, over), tiny_spec, tiny_arrays["train"],
                          tiny_arrays["val"], TrainConfig(epochs=2, batch_size=256, seed=1))
        cks.append(checkpoint.load(checkpoint.save(ck, out / f"{arch}.pt")))
    return cks


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_checkpoints, tiny_arrays) -> Path:
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    val = tiny_arrays["val"]
    # fusion_kind pinned: "auto" would turn KIND_GPU on a CUDA host and the shared server would test another setup
    write_repository(tiny_checkpoints, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu"), parity_rows=val.feeds())
    return repo


@pytest.fixture(scope="session")
def variants_repo(tmp_path_factory, tiny_checkpoints, tiny_arrays) -> Path:
    """tiny_repo's members and rule with both deployment variants (ctr_single_hop, ctr_all_onnx). A repository of
    its own: every server a test starts on tiny_repo would otherwise load two more models (two more stubs)."""
    repo = tmp_path_factory.mktemp("variants") / "model_repository"
    write_repository(tiny_checkpoints, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu", variants=["single_hop", "all_onnx"]),
                     parity_rows=tiny_arrays["val"].feeds())
    return repo


@pytest.fixture(scope="session")
def server(variants_repo):
    """The shared server: the ensemble, its members and the three served paths (the members are tiny_repo's:
    the same checkpoints exported the same way, so tiny_repo's files are their reference)."""
    from ctr_ensemble.serving.server import TritonServer

    with TritonServer(variants_repo) as s:
        yield s


def small(cfg: SynthConfig, **kw) -> SynthConfig:
    return replace(cfg, **kw)

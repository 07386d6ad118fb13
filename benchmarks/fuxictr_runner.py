"""FuxiCTR reference runs for ``make bench-quality`` (runs inside ``.venv-fuxictr``, never imported by the project).

Usage: ``.venv-fuxictr/bin/python benchmarks/fuxictr_runner.py JOB.json`` (started by ``benchmarks/bench_quality.py``).

The job names one prepared dataset (``train/val/test.parquet``, the very files our members train
on), its fields and the training settings. The runner builds the dataset with FuxiCTR's own
pipeline (``FeatureProcessor`` + ``build_dataset``), prints ``READY {...}`` (or ``FAILED {"error": ...}``),
then reads one JSON request per stdin line, ``{"member": "deepfm", "seed": 1, "config": {...}, "train": {...}}``
(``config``: the model's sizes, tower dropout and batch norm; ``train``: FuxiCTR's training keys), trains FuxiCTR's model
of that member (``RankDataLoader``, ``BaseModel.fit``) and prints one line per request:

    RESULT {"member": "deepfm", "seed": 1, "test_auc": ..., "test_logloss": ..., "val_auc": ...,
            "epochs": 3, "train_rows": ..., "fit_seconds": ..., "samples_per_s": ..., "error": null}

with ``error`` set when that run failed. Requests one at a time let the caller interleave our runs
and FuxiCTR's, so a machine whose load drifts slows both alike. Test AUC/logloss come from
``ctr_ensemble.metrics`` (scikit-learn, probabilities clipped to [1e-7, 1 - 1e-7]) on
(label, prediction) pairs taken batch by batch, so both frameworks are scored by the same code.

FuxiCTR 2.3.x ships the library (layers, ``BaseModel``, data pipeline) on PyPI but not its
``model_zoo``; the five models below are composed from the library's own layers the way the
model zoo composes them (DeepFM: LR + FM + MLP logit sum; DCN: ``CrossNet`` ∥ MLP → Linear;
DCNv2: ``CrossNetV2`` ∥ MLP, "parallel"; PNN: inner products + embeddings → MLP; FiBiNET:
``SqueezeExcitation`` + two ``BilinearInteractionV2`` → MLP, + LR).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn

from fuxictr.datasets.criteo import CustomizedFeatureProcessor as CriteoProcessor
from fuxictr.features import FeatureMap
from fuxictr.preprocess import FeatureProcessor, build_dataset
from fuxictr.pytorch.dataloaders import RankDataLoader
from fuxictr.pytorch.layers import (BilinearInteractionV2, CrossNet, CrossNetV2, FactorizationMachine, FeatureEmbedding,
                                    InnerProductInteraction, LogisticRegression, MLP_Block, SqueezeExcitation)
from fuxictr.pytorch.models import BaseModel
from fuxictr.pytorch.torch_utils import seed_everything

# The project's metrics module needs only numpy + scikit-learn, both present in this venv.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctr_ensemble import metrics  # noqa: E402


class BenchFeatureProcessor(FeatureProcessor):
    """FeatureProcessor with the two numeric recipes of this benchmark (see ``feature_cols``)."""

    def signed_log1p(self, col_name):
        """sign(x)·log1p(|x|) as a polars expression (then StandardScaler, as our spec standardises it)."""
        x = pl.col(col_name).cast(pl.Float64)
        return x.sign() * x.abs().log1p()

    def convert_to_bucket(self, col_name):
        """FuxiCTR's Criteo recipe (``fuxictr.datasets.criteo``): x > 2 → floor(ln(x)²), else int(x); a categorical id."""
        return CriteoProcessor.convert_to_bucket(self, col_name).cast(pl.Utf8)


# The tower settings of the run being built (``net_dropout``, ``batch_norm`` of the request's config): set by
# ``build_model`` before the model's layers are made, read by ``mlp``.
TOWER = {"dropout": 0.0, "batch_norm": False}


def mlp(input_dim: int, hidden: list[int], output_dim: int | None = 1, output_activation=None) -> MLP_Block:
    """FuxiCTR's MLP_Block: ReLU, with the run's ``net_dropout`` and ``batch_norm``."""
    return MLP_Block(input_dim=input_dim, output_dim=output_dim, hidden_units=hidden, hidden_activations="ReLU",
                     output_activation=output_activation, dropout_rates=TOWER["dropout"],
                     batch_norm=TOWER["batch_norm"])


class _Model(BaseModel):
    """A FuxiCTR BaseModel built like the model zoo's: layers in ``__init__``, then ``_ready``."""

    def _ready(self, learning_rate: float, kwargs: dict) -> None:
        self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
        self.reset_parameters()
        self.model_to_device()


class DeepFM(_Model):
    """Guo et al. 2017: logit = LR(x) + FM(E) + MLP(flatten E)."""

    def __init__(self, feature_map, embedding_dim, hidden, learning_rate, **kwargs):
        super().__init__(feature_map, model_id="DeepFM", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        self.fm = FactorizationMachine(feature_map)
        self.mlp = mlp(feature_map.sum_emb_out_dim(), hidden)
        self._ready(learning_rate, kwargs)

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        e = self.embedding_layer(X)  # (B, F, D)
        logit = self.fm(X, e) + self.mlp(e.flatten(start_dim=1))
        return {"y_pred": self.output_activation(logit)}


class _CrossParallel(_Model):
    """DCN / DCNv2 "parallel": Linear([cross(x0) ‖ MLP(x0)]) with x0 the flattened embeddings."""

    def __init__(self, feature_map, model_id, make_cross, embedding_dim, hidden, learning_rate, **kwargs):
        super().__init__(feature_map, model_id=model_id, **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        d = feature_map.sum_emb_out_dim()
        self.crossnet = make_cross(d)
        self.dnn = mlp(d, hidden, output_dim=None)
        self.fc = nn.Linear(d + hidden[-1], 1)
        self._ready(learning_rate, kwargs)

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        x0 = self.embedding_layer(X, flatten_emb=True)  # (B, F·D)
        logit = self.fc(torch.cat([self.crossnet(x0), self.dnn(x0)], dim=-1))
        return {"y_pred": self.output_activation(logit)}


class DCN(_CrossParallel):
    def __init__(self, feature_map, cross_layers, **kwargs):
        super().__init__(feature_map, "DCN", lambda d: CrossNet(d, cross_layers), **kwargs)


class DCNv2(_CrossParallel):
    def __init__(self, feature_map, cross_layers, **kwargs):
        super().__init__(feature_map, "DCNv2", lambda d: CrossNetV2(d, cross_layers), **kwargs)


class PNN(_Model):
    """IPNN (Qu et al. 2016): MLP([flatten E ‖ all pairwise inner products])."""

    def __init__(self, feature_map, embedding_dim, hidden, learning_rate, **kwargs):
        super().__init__(feature_map, model_id="PNN", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        f = feature_map.num_fields
        self.inner_product_layer = InnerProductInteraction(f, output="inner_product")
        self.dnn = mlp(f * (f - 1) // 2 + f * embedding_dim, hidden, output_activation=self.output_activation)
        self._ready(learning_rate, kwargs)

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        e = self.embedding_layer(X)  # (B, F, D)
        return {"y_pred": self.dnn(torch.cat([e.flatten(start_dim=1), self.inner_product_layer(e)], dim=1))}


class FiBiNET(_Model):
    """Huang et al. 2019: LR(x) + MLP([Bilinear(E) ‖ Bilinear'(SENET(E))])."""

    def __init__(self, feature_map, embedding_dim, hidden, reduction_ratio, bilinear_type, learning_rate, **kwargs):
        super().__init__(feature_map, model_id="FiBiNET", **kwargs)
        self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
        f = feature_map.num_fields
        self.senet_layer = SqueezeExcitation(f, reduction_ratio, "ReLU")
        self.bilinear_interaction1 = BilinearInteractionV2(f, embedding_dim, bilinear_type)
        self.bilinear_interaction2 = BilinearInteractionV2(f, embedding_dim, bilinear_type)
        self.lr_layer = LogisticRegression(feature_map, use_bias=False)
        self.dnn = mlp(f * (f - 1) * embedding_dim, hidden)
        self._ready(learning_rate, kwargs)

    def forward(self, inputs):
        X = self.get_inputs(inputs)
        e = self.embedding_layer(X)  # (B, F, D)
        pq = torch.cat([self.bilinear_interaction1(e), self.bilinear_interaction2(self.senet_layer(e))], dim=1)
        return {"y_pred": self.output_activation(self.lr_layer(X) + self.dnn(pq.flatten(start_dim=1)))}


def build_model(member: str, cfg: dict, feature_map, common: dict) -> BaseModel:
    """FuxiCTR model for one of our members, with the sizes in ``cfg`` (the request's config)."""
    TOWER.update(dropout=float(cfg.get("dropout", 0.0)), batch_norm=bool(cfg.get("batch_norm", False)))
    base = dict(embedding_dim=cfg["embedding_dim"], hidden=list(cfg["hidden"]), **common)
    if member == "deepfm":
        return DeepFM(feature_map, **base)
    if member == "dcn":
        return DCN(feature_map, cross_layers=cfg["cross_layers"], **base)
    if member == "dcnv2":
        if cfg.get("low_rank", 0):
            raise ValueError("low-rank DCNv2 has no plain FuxiCTR counterpart (FuxiCTR's low rank is the mixture form)")
        return DCNv2(feature_map, cross_layers=cfg["cross_layers"], **base)
    if member == "pnn":
        return PNN(feature_map, **base)
    if member == "fibinet":
        return FiBiNET(feature_map, reduction_ratio=cfg["reduction_ratio"], bilinear_type=cfg["bilinear_type"], **base)
    raise ValueError(f"FuxiCTR has no model for member {member!r}")


def feature_cols(fields: dict, numeric: str, use_sequence: bool, seq_max_len: int) -> list[dict]:
    """FuxiCTR feature columns. ``numeric``: "bucket" (FuxiCTR's BARS Criteo recipe: log² buckets as categorical
    ids, missing = its own token) or "scaled" (sign·log1p then StandardScaler, a numeric field embedded as
    value × vector: the same transform as ours, but missing → 0 instead of a learned "missing" vector)."""
    cols = [{"name": n, "active": True, "dtype": "str", "type": "categorical"} for n in fields["categorical"]]
    for n in fields["numeric"]:
        if numeric == "bucket":
            cols.append({"name": n, "active": True, "dtype": "float", "type": "categorical", "fill_na": -1.0,
                         "preprocess": "convert_to_bucket"})
        elif numeric == "scaled":
            cols.append({"name": n, "active": True, "dtype": "float", "type": "numeric", "fill_na": 0.0,
                         "preprocess": "signed_log1p", "normalizer": "StandardScaler"})
        else:
            raise ValueError(f"numeric recipe must be bucket or scaled, got {numeric!r}")
    if use_sequence and fields.get("sequence"):
        # FuxiCTR's default sequence encoder: mean of the item embeddings (MaskedAveragePooling), one more field.
        # dtype "list", not "str": FuxiCTR 2.3.10 fills nulls of a "str" column with "" before it joins a Parquet
        # list column into "a^b^c", and polars refuses to cast a list to a string there.
        cols.append({"name": fields["sequence"], "active": True, "dtype": "list", "type": "sequence",
                     "splitter": "^", "max_len": seq_max_len, "padding": "pre"})
    return cols


def to_npz(parquet: str, feature_map_json: Path) -> str:
    """FuxiCTR's encoded parquet split → the .npz its ``NpzDataLoader`` reads (one array per column)."""
    import pandas as pd

    fm = json.loads(feature_map_json.read_text())
    df = pd.read_parquet(parquet)
    arrays = {}
    for col in df.columns:
        v = df[col].to_numpy()
        arrays[col] = np.stack(v) if v.dtype == object else v  # sequence columns: (N, max_len)
    out = parquet[: -len(".parquet")] + ".npz"
    np.savez(out, **arrays)
    assert set(fm["labels"]) <= set(arrays), "labels missing from the encoded split"
    return out


def score(model: BaseModel, gen) -> tuple[float | None, float]:
    """AUC and logloss over (label, prediction) pairs collected batch by batch (order-safe with Ray)."""
    model.eval()
    ys, ps = [], []
    with torch.no_grad():
        for batch in gen:
            ps.append(model.forward(batch)["y_pred"].cpu().numpy().reshape(-1))
            ys.append(model.get_labels(batch).cpu().numpy().reshape(-1))
    y, p = np.concatenate(ys), np.concatenate(ps)
    return metrics.auc(y, p), metrics.logloss(y, p), y, p


def build(job: dict) -> tuple[str, str, str]:
    """FuxiCTR's own preprocessing of the split files → encoded .npz paths (train, valid, test)."""
    work, data = Path(job["work_dir"]), Path(job["data_dir"])
    cols = feature_cols(job["fields"], job["numeric"], bool(job.get("use_sequence")), job.get("seq_max_len", 50))
    fp = BenchFeatureProcessor(feature_cols=cols, label_col={"name": "label", "dtype": "float"},
                               dataset_id=job["dataset"], data_root=str(work))
    paths = build_dataset(fp, train_data=str(data / "train.parquet"), valid_data=str(data / "val.parquet"),
                          test_data=str(data / "test.parquet"), data_format="parquet",
                          min_categr_count=job["min_count"])
    fm_json = work / job["dataset"] / "feature_map.json"
    return tuple(to_npz(p, fm_json) for p in paths)


def train_one(job: dict, paths: tuple[str, str, str], member: str, seed: int, cfg: dict, tr: dict) -> dict:
    """Train and score one FuxiCTR model; the timed fit follows a 2-step warm-up of a throwaway copy.

    ``tr``: lr, batch_size, epochs, early_stop_patience, reduce_lr_on_plateau, embedding_regularizer,
    net_regularizer (FuxiCTR's own keys and semantics)."""
    work = Path(job["work_dir"])
    feature_map = FeatureMap(job["dataset"], str(work / job["dataset"]))
    feature_map.load(str(work / job["dataset"] / "feature_map.json"), {"embedding_dim": cfg["embedding_dim"]})
    common = dict(learning_rate=tr["lr"], gpu=-1, optimizer="adam", loss="binary_crossentropy",
                  metrics=["AUC", "logloss"], monitor="AUC", monitor_mode="max",
                  embedding_regularizer=float(tr["embedding_regularizer"]), net_regularizer=float(tr["net_regularizer"]),
                  early_stop_patience=int(tr["early_stop_patience"]),
                  reduce_lr_on_plateau=bool(tr["reduce_lr_on_plateau"]),
                  model_root=str(work / "checkpoints" / f"{member}_{seed}"), verbose=0)
    # FuxiCTR's in-memory NpzDataLoader (a torch DataLoader, shuffled by the seeded torch RNG), in this
    # process like ours; its 2.3 default, the Ray parquet loader, starts a Ray Data job per pass (~5 s here).
    loader_args = dict(train_data=paths[0], valid_data=paths[1], test_data=paths[2], batch_size=tr["batch_size"],
                       data_format="npz", shuffle=True, num_workers=0)
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", **loader_args)
    warm = build_model(member, cfg, feature_map, common)
    batch = next(iter(train_gen))
    warm._max_gradient_norm = 10.0  # set by fit(); train_step reads it
    for _ in range(2):
        warm.train_step(batch)
    seed_everything(seed)
    model = build_model(member, cfg, feature_map, common)
    os.makedirs(model.model_dir, exist_ok=True)
    t0 = time.perf_counter()
    model.fit(train_gen, validation_data=valid_gen, epochs=tr["epochs"])
    fit_seconds = time.perf_counter() - t0
    epochs = model._epoch_index + 1
    val_auc = score(model, valid_gen)[0]
    test_gen = RankDataLoader(feature_map, stage="test", **loader_args)
    test_auc, test_logloss, y, p = score(model, test_gen)
    train_rate = float(np.mean(np.load(paths[0])[feature_map.labels[0]]))
    rows = train_gen.num_samples
    rec = dict(test_auc=test_auc, test_logloss=test_logloss, test_ne=metrics.normalized_entropy(y, p, train_rate),
               test_calibration=metrics.calibration(y, p), test_ece=metrics.expected_calibration_error(y, p),
               val_auc=val_auc, epochs=epochs, train_rows=rows,
               fit_seconds=fit_seconds, samples_per_s=rows * epochs / fit_seconds, test_rows=test_gen.num_samples,
               n_fields=feature_map.num_fields, error=None)
    if test_auc is None or not math.isfinite(test_logloss):
        rec["error"] = "non-finite test metrics"
    return rec


def serve(job: dict) -> None:
    """Build the dataset, say READY (or FAILED and why), then answer one JSON run request per stdin line."""
    torch.set_num_threads(job["threads"])
    try:
        t0 = time.perf_counter()
        paths = build(job)
        print("READY " + json.dumps({"prep_seconds": time.perf_counter() - t0}), flush=True)
    except Exception as e:  # the whole dataset is unusable: say why once, the parent records it per run
        traceback.print_exc(file=sys.stderr)
        print("FAILED " + json.dumps({"error": f"dataset build failed: {type(e).__name__}: {e}"}), flush=True)
        return
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        rec = {"member": req["member"], "seed": req["seed"]}
        try:
            rec.update(train_one(job, paths, req["member"], req["seed"], req["config"], req["train"]))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            rec["error"] = f"{type(e).__name__}: {e}"
        print("RESULT " + json.dumps(rec), flush=True)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: fuxictr_runner.py JOB.json  (then one JSON run request per stdin line)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        serve(job)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    main()

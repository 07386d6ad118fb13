"""Independent training of one member: BCE + the member's regularizers + Adam, early stopping on the val
metric (``TrainConfig.select``), the loop in ``loop.py``, the step in ``step.py``.

Training data is in-memory ``Arrays`` or a prepared folder (``prepared.shards.Prepared``); sparse embedding
updates, bf16 autocast, torch.compile and data parallelism over torchrun processes come with ``TrainStep``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ctr_ensemble import models
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.models.base import MemberConfig
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.training import distributed, loop
from ctr_ensemble.training.config import TrainConfig, check_options, run_identity, selection_score
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.history import write_history
from ctr_ensemble.training.step import TrainStep, evaluate_rows, val_metrics


def unique_names(names: list[str]) -> list[str]:
    """Member names for an ensemble: repeats get ``_2``, ``_3``, … (``deepfm, deepfm`` → ``deepfm, deepfm_2``)."""
    count: dict[str, int] = {}
    out = []
    for n in names:
        count[n] = count.get(n, 0) + 1
        out.append(n if count[n] == 1 else f"{n}_{count[n]}")
    return out


def train_member(
    name: str,
    arch: str,
    model_cfg: MemberConfig,
    spec: FeatureSpec,
    train,
    val,
    cfg: TrainConfig,
    history_csv: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    dist: Dist | None = None,
    on_epoch=None,
    lr_schedule: list[float] | None = None,
) -> Checkpoint:
    """Train a member from scratch and return the checkpoint of its best validation epoch.

    ``train``/``val`` are in-memory ``Arrays`` or ``shards.Prepared`` folders. Under torchrun pass
    ``dist = distributed.setup()``: each process trains on its own rows, gradients are averaged (DDP),
    every process gets the same validation AUC, and the caller saves the checkpoint on rank 0 only.
    ``on_epoch(epoch, history row)`` runs after each epoch (``loop.run``), e.g. a tuner's pruning check;
    ``lr_schedule`` fixes each epoch's lr (``loop.run``; a refit replays its validated run's)."""
    dist = dist or Dist(device=distributed.resolve_device(cfg.device))
    check_options(cfg, dist)
    torch.manual_seed(cfg.seed)
    model = models.build(arch, model_cfg, spec).to(dist.device)
    step = TrainStep(model, train, spec, cfg, dist)
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(batch):
        logit, y = step(batch)  # (B, 1), (B,)
        value = loss_fn(logit[:, 0].float(), y)
        parts = {"logloss": value.detach()}
        return step.regularized(value, parts), parts

    def evaluate():
        m = val_metrics(*evaluate_rows(model, val, spec, cfg.eval_batch_size, dist))
        return selection_score(m, cfg.select), m

    run_id = run_identity("member", spec, train, cfg, dist, name=name, arch=arch, model_config=asdict(model_cfg))
    res = loop.run(loop.Task(name, model, step.opt, loss, evaluate), len(train), cfg.loop(), state_path, resume, run_id,
                   batches=step.feed.batches, dist=dist, on_epoch=on_epoch,
                   lr_schedule=lr_schedule)
    if history_csv is not None and dist.is_main:
        write_history(res.history, history_csv, name)
    best_row = res.history[res.best_epoch - 1]
    return Checkpoint(
        name=name, arch=arch, config=model_cfg, spec=spec, state_dict=res.best,
        metrics={"best_epoch": res.best_epoch, "val_auc": best_row["val_auc"], "val_logloss": best_row["val_logloss"],
                 "select": cfg.select, "history": res.history,
                 "train_config": asdict(cfg), "processes": dist.world},
    )

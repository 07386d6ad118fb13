"""Collaborative ensemble training (CETNet, Liu et al., arXiv 2411.13700).

Members with their own embedding tables are trained jointly. Each gives a representation h_i
(B, H_i) and a probability p_i; the head (``layers.fusion.CollaborativeHead``) weights them per
sample with w = softmax(NE(p)/τ) and predicts from [w_1·h_1 ‖ … ‖ w_N·h_N] (or a weighted sum).

    loss = BCE(y, p_fused) + μ · Σ_i BCE(y, p_i) + λ · Σ_{i<j} [KL(p_i‖p_j) + KL(p_j‖p_i)]

with Bernoulli KL; for two Bernoullis the symmetric KL is (p_i − p_j)·(logit p_i − logit p_j),
which is how it is computed (stable from logits, no log of 0). Both sides get gradients
("mutual refinement"). N > 2 members work the same way. The paper has μ = 1; the default here is
``member_weight`` = 0.3, which beat μ = 1 in fused test AUC and logloss in all 6 runs of ``make experiments``'
ablations (synthetic and the Criteo sample, 3 seeds each; README, "make experiments").

Model selection (early stopping, reduce-LR-on-plateau, the epoch kept) is on the fused validation AUC
(``select="auc"``) or the fused validation logloss (``select="logloss"``). With ``freeze_members`` only the
head trains (the members keep the weights they start from, e.g. independently trained checkpoints); with
``detach_head`` the head reads the members' probabilities and representations detached, so the fused BCE
trains the head alone and the members learn from their own BCE + KL (no co-adaptation through the head).

The result is a collaborative checkpoint (``models.ensemble.CollabCheckpoint``; the model, its file format
and offline scoring live in ``models.ensemble``, below export). Training data, devices, sparse optimisers
and torchrun data parallelism work as for one member (``step.TrainStep``): DDP wraps the whole model
(members + head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.layers.fusion import HEAD_VARIANTS, CollaborativeHead
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.models.ensemble import CollabCheckpoint, CollaborativeModel
from ctr_ensemble.training import distributed, loop
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.mutual import MemberInit, build_members
from ctr_ensemble.training.config import TrainConfig, check_options, run_identity, selection_score, setting
from ctr_ensemble.training.history import write_history
from ctr_ensemble.training.step import TrainStep, score_rows, val_metrics


@dataclass
class HeadConfig:
    variant: str = setting("concat", "Head input: concat [w_i·h_i] or sum Σ w_i·P_i h_i.")
    hidden: list[int] = field(default_factory=lambda: [64])
    proj_dim: int = setting(64, "sum variant: the width the members' h_i are projected to.")
    tau: float = setting(1.0, "Temperature τ of softmax(NE(p)/τ) (the initial value with --learn-tau).")
    learn_tau: bool = setting(False, "Learn τ (as exp(log τ)) with the rest.")




@dataclass
class CollabConfig(TrainConfig):
    kl_weight: float = setting(0.1, "λ of the symmetric-KL term between member predictions.")
    member_weight: float = setting(0.3, "μ: weight of the members' own BCE terms (the paper's: 1).")
    # (TrainConfig.select: model selection on the fused val AUC or the fused val logloss)
    freeze_members: bool = setting(False, "Train the head only; the members keep their starting weights.")
    detach_head: bool = setting(False, "The head reads the members' outputs detached: its loss trains the head only, "
                                       "the members learn from their own BCE + KL.")
    head: HeadConfig = field(default_factory=HeadConfig)


def symmetric_kl(logits: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} KL(p_i‖p_j) + KL(p_j‖p_i) per row (B,) for member logits (B, N), Bernoulli predictions."""
    p = torch.sigmoid(logits)
    dp = p[:, :, None] - p[:, None, :]  # (B, N, N)
    dz = logits[:, :, None] - logits[:, None, :]
    return (dp * dz).triu(diagonal=1).sum((1, 2))


def collab_losses(fused_logit: torch.Tensor, member_logits: torch.Tensor, y: torch.Tensor, kl_weight: float,
                  member_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (batch means; ``member_bce`` unweighted). fused_logit (B, 1), member_logits (B, N),
    y (B,). ``member_weight`` 1 is the paper's formula; training passes ``CollabConfig.member_weight``."""
    fused_bce = F.binary_cross_entropy_with_logits(fused_logit[:, 0], y)
    member_bce = F.binary_cross_entropy_with_logits(member_logits, y[:, None].expand_as(member_logits), reduction="none").mean(0)
    kl = symmetric_kl(member_logits).mean()
    total = fused_bce + member_weight * member_bce.sum() + kl_weight * kl
    return total, {"loss": total, "fused_bce": fused_bce, "member_bce": member_bce.sum(), "sym_kl": kl}


def train_collab(
    members: list[MemberInit],
    spec: FeatureSpec,
    train,
    val,
    cfg: CollabConfig,
    history_csv: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    dist: Dist | None = None,
) -> CollabCheckpoint:
    """Train members + head jointly; returns the state of the epoch with the best fused val AUC (or logloss,
    ``cfg.select``). Members built from a ``MemberInit`` with a ``state_dict`` start from those weights
    (``mutual.members_from_checkpoints``): fine-tuning, or with ``cfg.freeze_members`` a head over fixed members.

    ``train``/``val`` are in-memory ``Arrays`` or ``shards.Prepared`` folders. Under torchrun pass
    ``dist = distributed.setup()`` (as ``member.train_member``): each process trains on its own rows,
    gradients are averaged (DDP around members + head), every process gets the same val AUC and returns the
    same checkpoint; the caller saves it on rank 0 only."""
    dist = dist or Dist(device=distributed.resolve_device(cfg.device))
    if len(members) < 2:
        raise CtrError(f"a collaborative ensemble needs at least 2 members, got {len(members)}")
    if cfg.head.variant not in HEAD_VARIANTS:
        raise CtrError(f"head variant must be one of {HEAD_VARIANTS}, got {cfg.head.variant!r}")
    if not cfg.head.tau >= 0 or (cfg.head.learn_tau and cfg.head.tau == 0):
        raise CtrError(f"tau must be > 0 (or 0 when fixed), got {cfg.head.tau}")
    if not cfg.kl_weight >= 0:
        raise CtrError(f"KL weight λ must be >= 0, got {cfg.kl_weight}")
    if not cfg.member_weight >= 0:
        raise CtrError(f"member weight μ must be >= 0, got {cfg.member_weight}")
    check_options(cfg, dist)
    names = [m.name for m in members]
    nets = build_members(members, spec, cfg.seed)
    head = CollaborativeHead([n.repr_dim for n in nets], **asdict(cfg.head))
    model = CollaborativeModel(nets, head, cfg.freeze_members, cfg.detach_head).to(dist.device)
    step = TrainStep(model, train, spec, cfg, dist, first=False)

    def loss(batch):
        (fused, member_logits, _), y = step(batch)
        total, parts = collab_losses(fused.float(), member_logits.float(), y, cfg.kl_weight, cfg.member_weight)
        if cfg.freeze_members:  # nothing of the members moves: their terms are only reported
            parts["loss"] = parts["fused_bce"]
            return parts["fused_bce"], parts
        return step.regularized(total, parts), parts

    def evaluate():
        n = len(names)
        y, s = score_rows(model, lambda **x: torch.cat(model(**x), 1), val, spec, cfg.eval_batch_size, dist,
                          (1 + 2 * n,))  # s (N_val, 1 + 2N): fused prob, weights, member probs
        fused, w, member_p = s[:, 0], s[:, 1 : 1 + n], s[:, 1 + n :]
        out = val_metrics(y, fused)
        for k, name in enumerate(names):
            out.update(val_metrics(y, member_p[:, k], f"_{name}"))
        if cfg.head.learn_tau:
            out["tau"] = float(head.tau().detach())
        out["mean_max_weight"] = float(w.max(1).mean()) if len(w) else 0.0
        return selection_score(out, cfg.select), out

    task_name = f"collab({', '.join(names)})"
    run_id = run_identity("collab", spec, train, cfg, dist,
                          members=[[m.name, m.arch, asdict(m.config), m.source] for m in members])
    res = loop.run(loop.Task(task_name, model, step.opt, loss, evaluate), len(train), cfg.loop(), state_path, resume,
                   run_id, batches=step.feed.batches, dist=dist)
    if history_csv is not None and dist.is_main:
        write_history(res.history, history_csv, "collaborative ensemble")
    model.load_state_dict(res.best)
    best_row = res.history[res.best_epoch - 1]
    member_cks = [
        Checkpoint(name=m.name, arch=m.arch, config=m.config, spec=spec, state_dict=net.state_dict(),
                   metrics={"best_epoch": res.best_epoch, "val_auc": best_row[f"val_auc_{m.name}"],
                            "collaborative": {"peers": [p for p in names if p != m.name]}})
        for m, net in zip(members, nets)
    ]
    return CollabCheckpoint(member_cks, head.config(), head.state_dict(), asdict(cfg),
                            {"best_epoch": res.best_epoch, "val_auc": best_row["val_auc"],
                             "val_logloss": best_row["val_logloss"], "select": cfg.select, "history": res.history,
                             "processes": dist.world})

"""Deep mutual learning for CTR models (Yılmaz & Aldemir, arXiv 2406.12087).

N ≥ 2 members (same or different architectures) learn together; member n minimises

    L_n = BCE(y, p_n) + w · 1/(N−1) · Σ_{i≠n} (p_i − p_n)²                      (paper eq. 3, w = 1)

with the peers' predictions p_i detached (targets, not paths for gradient), so the sum
Σ_n L_n has exactly the gradient of L_n for member n's parameters and one backward pass
steps every member in the same step. Two modes:

- ``scratch``: members start from random initialisations (the paper found no gain);
- ``finetune``: members start from independently trained checkpoints and train one more
  epoch at lr 7e-4 with exponential decay (lr → 1/10 in three epochs), the paper's
  winning setting (+0.25..0.66 % RelaImp on Criteo/Avazu).

The result is N ordinary member checkpoints (``checkpoint.save``), exported and served
exactly like independently trained ones. Training data, devices, sparse optimisers and torchrun data
parallelism work as for one member (``step.TrainStep``): DDP wraps the members together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ctr_ensemble import models
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member, MemberConfig
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training import distributed, loop
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.config import TrainConfig, check_options, run_identity, selection_score, setting
from ctr_ensemble.training.history import write_history
from ctr_ensemble.training.member import unique_names
from ctr_ensemble.training.step import TrainStep, score_rows, val_metrics

MODES = ("scratch", "finetune")
FINETUNE_LR = 7e-4
FINETUNE_DECAY = 0.1 ** (1 / 3)  # the paper's schedule: one tenth of the lr after three epochs


@dataclass
class MutualConfig(TrainConfig):
    mode: str = "scratch"  # scratch | finetune
    mutual_weight: float = setting(1.0, "Weight w of the mutual term (1 = the paper's; 0 = N independent trainings "
                                        "side by side).")

    @classmethod
    def finetune(cls, **overrides) -> MutualConfig:
        """The paper's fine-tuning setting: one epoch, lr 7e-4, exponential decay; ``overrides`` win."""
        return cls(**{"mode": "finetune", "epochs": 1, "lr": FINETUNE_LR, "lr_decay": FINETUNE_DECAY, **overrides})


@dataclass
class MemberInit:
    """One member to co-train: built from ``config``, starting from ``state_dict`` when fine-tuning."""

    name: str
    arch: str
    config: MemberConfig
    state_dict: dict[str, torch.Tensor] | None = None
    source: str | None = None  # checkpoint it starts from


def mutual_losses(logits: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total loss Σ_n L_n, per-member BCE (N,) and per-member mutual term (N,), batch means.

    logits (B, N) of the N members, y (B,) labels in {0, 1}.
    """
    n = logits.shape[1]
    if n < 2:
        raise ValueError(f"mutual learning needs at least 2 members, got {n}")
    bce = F.binary_cross_entropy_with_logits(logits, y[:, None].expand_as(logits), reduction="none").mean(0)  # (N,)
    p = torch.sigmoid(logits)  # (B, N)
    diff = p.detach()[:, None, :] - p[:, :, None]  # (B, n, i): peer i as a fixed target for member n
    off = 1.0 - torch.eye(n, dtype=p.dtype, device=p.device)
    mse = ((diff ** 2) * off).sum(2).mean(0) / (n - 1)  # (N,)
    return (bce + weight * mse).sum(), bce, mse


def members_from_archs(archs: list[str], overrides: dict[str, dict] | None = None) -> list[MemberInit]:
    """Fresh members for ``scratch`` mode; repeated architectures get ``_2``, ``_3`` names."""
    overrides = overrides or {}
    return [MemberInit(name, arch, models.make_config(arch, overrides.get(arch)))
            for arch, name in zip(archs, unique_names(archs))]


def members_from_checkpoints(paths: list[str | Path], spec: FeatureSpec | None = None) -> tuple[list[MemberInit], FeatureSpec]:
    """Load and check checkpoints for ``finetune`` mode, before any data is read or any step is taken.

    Raises CtrError for a missing or corrupt file, weights that do not fit their architecture, or a
    feature spec that differs between checkpoints or from ``spec`` (the spec the data is encoded with).
    """
    if len(paths) < 2:
        raise CtrError(f"mutual learning needs at least 2 member checkpoints, got {len(paths)}")
    cks = [checkpoint.load(p) for p in paths]
    ref_path, ref_spec = (None, spec) if spec is not None else (paths[0], cks[0].spec)
    for path, ck in zip(paths, cks):
        if ck.spec.fingerprint() != ref_spec.fingerprint():
            against = f"{ref_path}'s" if ref_path is not None else "the --spec"
            raise CtrError(f"{path}: its feature spec (fingerprint {ck.spec.fingerprint()[:12]}) differs from {against} "
                           f"({ref_spec.fingerprint()[:12]}); members fine-tuned together must share one feature encoding")
        ck.build()  # weights must fit the architecture; raises CtrError naming the checkpoint
    names = unique_names([ck.name for ck in cks])
    return [MemberInit(n, ck.arch, ck.config, ck.state_dict, ck.source) for n, ck in zip(names, cks)], ref_spec


def build_members(members: list[MemberInit], spec: FeatureSpec, seed: int) -> list[Member]:
    """The members' modules: seeded fresh initialisations (each member its own), then any starting weights."""
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise CtrError(f"member names must be unique, got {names}")
    torch.manual_seed(seed)
    nets = []
    for m in members:
        net = models.build(m.arch, m.config, spec)
        if m.state_dict is not None:
            net.load_state_dict(m.state_dict)
        nets.append(net)
    return nets


class Members(nn.ModuleList):
    """The co-trained members side by side; state_dict keys ``<k>.<member key>``."""

    def logits(self, cat_ids: torch.Tensor, num: torch.Tensor, seq_ids: torch.Tensor | None = None,
               seq_len: torch.Tensor | None = None) -> torch.Tensor:
        """Member logits (B, N); what the training step (``step.Logits``, wrapped by DDP) returns."""
        return torch.cat([m.logits(cat_ids, num, seq_ids, seq_len)[0] for m in self], dim=1)

    def probs(self, **feeds: torch.Tensor) -> torch.Tensor:
        """Member probabilities (B, N), each exactly as the member's own forward gives it."""
        return torch.cat([m(**feeds)[0] for m in self], dim=1)


def train_mutual(
    members: list[MemberInit],
    spec: FeatureSpec,
    train,
    val,
    cfg: MutualConfig,
    history_csv: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    dist: Dist | None = None,
) -> list[Checkpoint]:
    """Co-train ``members``; returns one checkpoint per member, from the epoch with the best mean val AUC.

    ``train``/``val`` are in-memory ``Arrays`` or ``shards.Prepared`` folders. Under torchrun pass
    ``dist = distributed.setup()`` (as ``member.train_member``): each process trains on its own rows, the
    gradients of all members are averaged in one DDP all-reduce, every process gets the same val AUCs and
    returns the same checkpoints; the caller saves them on rank 0 only."""
    dist = dist or Dist(device=distributed.resolve_device(cfg.device))
    if cfg.mode not in MODES:
        raise CtrError(f"mutual mode must be one of {MODES}, got {cfg.mode!r}")
    if len(members) < 2:
        raise CtrError(f"mutual learning needs at least 2 members, got {len(members)}")
    if cfg.mode == "finetune" and any(m.state_dict is None for m in members):
        raise CtrError("finetune mode needs every member to start from a checkpoint")
    if not cfg.mutual_weight >= 0:
        raise CtrError(f"mutual weight must be >= 0, got {cfg.mutual_weight}")
    check_options(cfg, dist)
    names = [m.name for m in members]
    nets = Members(build_members(members, spec, cfg.seed)).to(dist.device)
    step = TrainStep(nets, train, spec, cfg, dist, first=False)

    def loss(batch):
        logits, y = step(batch)  # (B, N), (B,)
        total, bce, mse = mutual_losses(logits.float(), y, cfg.mutual_weight)
        parts = {"loss": total}
        for k, name in enumerate(names):
            parts[f"bce_{name}"], parts[f"mutual_{name}"] = bce[k], mse[k]
        return step.regularized(total, parts), parts

    def evaluate():
        y, p = score_rows(nets, nets.probs, val, spec, cfg.eval_batch_size, dist, (len(names),))  # p (N_val, N)
        out = {}
        for k, name in enumerate(names):
            out.update(val_metrics(y, p[:, k], f"_{name}"))
        mean = {"val_auc": sum(out[f"val_auc_{n}"] for n in names) / len(names),
                "val_logloss": sum(out[f"val_logloss_{n}"] for n in names) / len(names)}
        return selection_score(mean, cfg.select), {**mean, **out}

    task_name = f"mutual[{cfg.mode}]({', '.join(names)})"
    run_id = run_identity("mutual", spec, train, cfg, dist,
                          members=[[m.name, m.arch, asdict(m.config), m.source] for m in members])
    res = loop.run(loop.Task(task_name, nets, step.opt, loss, evaluate), len(train), cfg.loop(), state_path, resume,
                   run_id, batches=step.feed.batches, dist=dist)
    if history_csv is not None and dist.is_main:
        write_history(res.history, history_csv, f"mutual learning ({cfg.mode})")
    best_row = res.history[res.best_epoch - 1]
    out = []
    for k, m in enumerate(members):
        prefix = f"{k}."
        state = {key[len(prefix):]: v for key, v in res.best.items() if key.startswith(prefix)}
        out.append(Checkpoint(
            name=m.name, arch=m.arch, config=m.config, spec=spec, state_dict=state,
            metrics={"best_epoch": res.best_epoch, "val_auc": best_row[f"val_auc_{m.name}"],
                     "val_logloss": best_row[f"val_logloss_{m.name}"], "select": cfg.select, "history": res.history,
                     "train_config": asdict(cfg), "processes": dist.world,
                     "mutual": {"mode": cfg.mode, "weight": cfg.mutual_weight, "peers": [p for p in names if p != m.name],
                                "init_from": m.source}},
        ))
    return out

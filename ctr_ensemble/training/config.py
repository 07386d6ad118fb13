"""How a run is configured: ``TrainConfig`` (every trainer takes it whole; each field, with its help, is an
option of every training command), the checks every trainer makes before building anything, the score
model selection maximises, and the identity a resume state must match."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.loop import LoopConfig


def setting(default, help: str):
    """A config dataclass field with its help text: the one declaration the command-line options are generated
    from (``cli/options.py``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How a member (or a set of members) is trained; every trainer takes it whole, every training command
    offers each field as ``--field-name``."""

    epochs: int = setting(100, "The most epochs; early stopping on the val metric (--select) normally ends training "
                               "first (loop.py).")
    batch_size: int = setting(512, "Global batch size (split over torchrun processes).")
    lr: float = setting(2e-3, "Adam learning rate.")
    weight_decay: float = setting(0.0, "Adam's coupled L2 on every parameter (0 = off; the members' "
                                       "embedding_regularizer / net_regularizer, set with --set, are the usual "
                                       "regularizers).")
    patience: int = setting(2, "Epochs in a row without a better val metric that stop training (FuxiCTR's "
                               "early_stop_patience; the best epoch's weights are kept).")
    plateau_factor: float = setting(0.1, "Learning-rate factor after each epoch without a better val metric "
                                         "(reduce-LR-on-plateau, FuxiCTR's default; 1 = off).")
    min_lr: float = setting(1e-6, "Reduce-LR-on-plateau never goes below this.")
    seed: int = setting(42, "Seed of the weights' initialisation and of the row order.")
    eval_batch_size: int = setting(16384, "Rows per batch when scoring the validation data.")
    max_steps: int = setting(0, "Stop after this many optimiser steps (0 = no limit); for smoke checks.")
    lr_decay: float = setting(1.0, "Learning-rate factor per epoch, applied every step (1 = constant).")
    save_every: int = setting(0, "Optimiser steps between saved training states (0 = at the end of each epoch only).")
    optimizer: str = setting("adam", "adam (dense, every row each step) | sparse_adam | sparse_adagrad (sparse "
                                     "embedding updates; not on NCCL; see Optimizers).")
    emb_lr: float = setting(0.0, "Learning rate of the embedding tables with a sparse optimizer (0 = 5 x --lr).")
    embedding_reg_rows: str = setting("auto", "Embedding regularizer over: all (every table row each step, "
                                              "FuxiCTR's semantics), batch (the rows the batch looked up; for sparse "
                                              "optimizers and huge tables), auto (all with adam, batch with sparse "
                                              "ones) (regularize.py).")
    amp: str = setting("none", "none | bf16: autocast the training forward to bfloat16 (for GPUs; slow on CPUs "
                               "without bf16 units).")
    compile: bool = setting(False, "torch.compile the training forward (dense --optimizer adam only).")
    device: str = setting("auto", "auto (CUDA if torch sees it) | cpu | cuda.")
    shuffle: str = setting("auto", "auto (a full permutation for in-memory rows, block shuffle for prepared shards) "
                                   "| full | block.")
    block_rows: int = setting(8192, "Block shuffle: rows read contiguously.")
    buffer_rows: int = setting(262144, "Block shuffle: rows shuffled together.")
    streams: int = setting(0, "Row streams (0 = one per process); --streams N on one process reproduces an "
                              "N-process run's batches.")
    prefetch: int = setting(0, "Batches built ahead by a thread (>= 1 on CUDA).")
    select: str = setting("auc", "Validation metric for model selection, early stopping and reduce-LR-on-plateau: "
                                 "auc (highest) or logloss (lowest; the loop maximises its negative).")

    def loop(self) -> LoopConfig:
        return LoopConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                          max_steps=self.max_steps, lr_decay=self.lr_decay, save_every=self.save_every,
                          plateau_factor=self.plateau_factor, min_lr=self.min_lr)


# Embedding tables (nn.Embedding) get sparse gradients with the sparse optimizers: a step touches only
# the rows in the batch instead of the whole table; everything else keeps Adam (+ weight decay).
OPTIMIZERS = ("adam", "sparse_adam", "sparse_adagrad")


AMP = ("none", "bf16")


SELECT = ("auc", "logloss")


def selection_score(metrics_: dict, select: str, suffix: str = "") -> float:
    """The loop's score (higher is better) of validation ``metrics_`` (``val_metrics``): AUC or −logloss."""
    return metrics_[f"val_auc{suffix}"] if select == "auc" else -metrics_[f"val_logloss{suffix}"]


def check_options(cfg: TrainConfig, dist: Dist) -> None:
    """Refuse option combinations that cannot work, before anything is built (every trainer)."""
    if cfg.amp not in AMP:
        raise CtrError(f"amp must be one of {', '.join(AMP)}, got {cfg.amp!r}")
    if cfg.select not in SELECT:
        raise CtrError(f"select must be one of {', '.join(SELECT)} (the validation metric that picks the best epoch), "
                       f"got {cfg.select!r}")
    if dist.backend == "nccl" and cfg.optimizer != "adam":
        raise CtrError(f"--optimizer {cfg.optimizer}: NCCL cannot all-reduce sparse gradients "
                       "(pytorch/pytorch#22400); use --optimizer adam for multi-GPU runs")
    if cfg.compile and cfg.optimizer != "adam":
        raise CtrError(f"--compile works with --optimizer adam only: torch.compile (inductor) cannot produce the "
                       f"sparse embedding gradients of {cfg.optimizer}")


def run_identity(trainer: str, spec: FeatureSpec, train, cfg: TrainConfig, dist: Dist, **what) -> dict:
    """What a resume state must match (``loop.run``'s ``run_id``): the trainer, ``what`` it trains, the data
    and every setting."""
    return {"trainer": trainer, **what, "spec": spec.fingerprint(), "train_rows": len(train), "train_config": asdict(cfg),
            "processes": dist.world}

"""The epoch/batch loop every trainer shares: shuffling, NaN guard, evaluation, early stopping, resume.

A trainer describes *what* to optimise as a ``Task`` (one module holding everything trained,
its optimiser, a loss over a batch of row indices, an evaluation); ``run`` does the rest:

- shuffles rows each epoch with its own seeded generator and walks them in batches;
- refuses a non-finite loss *before* the optimiser step, naming epoch, step and batch, so the
  weights and the last resume state stay clean;
- evaluates after each epoch, keeps the best state (highest score) and stops after
  ``patience`` epochs without improvement;
- with a ``state_path``, writes a resume state atomically every ``save_every`` steps and at
  each epoch end (weights, optimiser, scheduler, RNG states, position in the epoch, best so
  far, history). ``resume=True`` continues from it and reaches the same weights as an
  uninterrupted run with the same seed (same thread count assumed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ctr_ensemble.errors import CtrError
from ctr_ensemble.training import checkpoint

STATE_FORMAT = "ctr-ensemble/train-state"
STATE_VERSION = 1


@dataclass
class LoopConfig:
    epochs: int = 8
    batch_size: int = 512
    patience: int = 1  # epochs without a better score before stopping
    seed: int = 42
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit)
    lr_decay: float = 1.0  # learning-rate factor per epoch, applied smoothly every step (1 = constant)
    save_every: int = 0  # steps between resume states (0 = at epoch ends only)


@dataclass
class Task:
    """What one trainer optimises."""

    name: str
    module: nn.Module  # everything that is trained; its state_dict is what resume restores
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # row ids → (loss, named parts)
    evaluate: Callable[[], tuple[float, dict[str, float]]]  # → (score to maximise, metrics for the history)


@dataclass
class LoopResult:
    best: dict[str, torch.Tensor]  # module state_dict of the best epoch
    best_epoch: int
    best_score: float
    history: list[dict]
    steps: int


def _check_finite(task: Task, loss: torch.Tensor, parts: dict[str, torch.Tensor], epoch: int, step: int,
                  batch: int, idx: torch.Tensor) -> None:
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = [k for k, v in parts.items() if not math.isfinite(float(v.detach()))]
    raise CtrError(
        f"{task.name}: loss is {value} at epoch {epoch}, step {step} (batch {batch} of the epoch, "
        f"{len(idx)} rows, first row index {int(idx[0])})"
        + (f"; non-finite parts: {', '.join(bad)}" if bad else "")
        + ". Training stopped before this step was applied; lower the learning rate or check the inputs/checkpoints."
    )


def _load_state(path: Path, run_id: dict) -> dict:
    state = checkpoint.read_verified(path, "training state", STATE_FORMAT, STATE_VERSION)
    if state.get("run") != run_id:
        old, new = state.get("run") or {}, run_id
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CtrError(f"{path}: the saved training state belongs to a different run (differs in: {', '.join(diff)}); "
                       "resume with the same data, members and settings, or delete the state file to start over")
    return state


def run(task: Task, n_rows: int, cfg: LoopConfig, state_path: str | Path | None = None, resume: bool = False,
        run_id: dict | None = None) -> LoopResult:
    """Train ``task`` over ``n_rows`` rows; see the module doc. ``run_id`` identifies the run in the resume state."""
    if n_rows <= 0:
        raise CtrError(f"{task.name}: no training rows")
    run_id = dict(run_id or {})
    state_path = Path(state_path) if state_path is not None else None
    sched = None
    if cfg.lr_decay != 1.0:
        if not 0.0 < cfg.lr_decay <= 1.0:
            raise CtrError(f"lr_decay must be in (0, 1], got {cfg.lr_decay}")
        per_epoch = math.ceil(n_rows / cfg.batch_size)
        sched = torch.optim.lr_scheduler.ExponentialLR(task.optimizer, gamma=cfg.lr_decay ** (1.0 / per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_score, best_epoch, bad_epochs = None, -math.inf, 0, 0
    history: list[dict] = []
    steps, start_epoch, start_pos = 0, 1, 0
    totals: dict[str, float] = {}
    seen = 0
    epoch_gen_state = None
    if state_path is not None and state_path.exists():
        if not resume:
            raise CtrError(f"{state_path}: an unfinished run's training state is here; pass --resume to continue it "
                           "or delete the file to start over")
        st = _load_state(state_path, run_id)
        task.module.load_state_dict(st["module"])
        task.optimizer.load_state_dict(st["optimizer"])
        if sched is not None:
            sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        best, best_score, best_epoch, bad_epochs = st["best"], st["best_score"], st["best_epoch"], st["bad_epochs"]
        history, steps, start_epoch, start_pos = st["history"], st["steps"], st["epoch"], st["pos"]
        totals, seen, epoch_gen_state = st["totals"], st["seen"], st["epoch_gen_state"]
        if st["done"]:
            tqdm.write(f"{task.name}: the saved run had already finished; using its result")
            return LoopResult(best, best_epoch, best_score, history, steps)
        tqdm.write(f"{task.name}: resuming at epoch {start_epoch}, step {steps} (row {start_pos} of the epoch)")
    elif resume:
        tqdm.write(f"{task.name}: no training state at {state_path}; starting from scratch")

    def save(epoch: int, pos: int, done: bool = False) -> None:
        if state_path is None:
            return
        checkpoint.write_atomic({
            "format": STATE_FORMAT, "version": STATE_VERSION, "run": run_id, "done": done,
            "epoch": epoch, "pos": pos, "steps": steps, "epoch_gen_state": epoch_gen_state,
            "torch_rng": torch.get_rng_state(), "module": task.module.state_dict(),
            "optimizer": task.optimizer.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
            "best": best, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": history, "totals": totals, "seen": seen,
        }, state_path)

    stopped = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        if epoch == start_epoch and epoch_gen_state is not None:
            gen.set_state(epoch_gen_state)  # resuming: replay this epoch's shuffle, then skip what was done
        else:
            start_pos, totals, seen = 0, {}, 0
            epoch_gen_state = gen.get_state()
        order = torch.randperm(n_rows, generator=gen)
        task.module.train()
        t0 = time.perf_counter()
        starts = range(start_pos, n_rows, cfg.batch_size)
        bar = tqdm(starts, desc=f"{task.name} epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for s in bar:
            idx = order[s : s + cfg.batch_size]
            loss, parts = task.loss(idx)
            _check_finite(task, loss, parts, epoch, steps + 1, s // cfg.batch_size + 1, idx)
            task.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            task.optimizer.step()
            if sched is not None:
                sched.step()
            steps += 1
            seen += len(idx)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * len(idx)
            bar.set_postfix({k: f"{v / seen:.4f}" for k, v in list(totals.items())[:3]})
            if cfg.max_steps and steps >= cfg.max_steps:
                stopped = True
                break
            if cfg.save_every and steps % cfg.save_every == 0:
                save(epoch, s + len(idx))
        bar.close()
        score, metrics = task.evaluate()
        row = {"epoch": epoch, **{f"train_{k}": v / max(seen, 1) for k, v in totals.items()}, **metrics,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        tqdm.write(f"{task.name} epoch {epoch}: " + " ".join(
            f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds") and isinstance(v, float))
            + f" ({row['seconds']:.1f}s)")
        if score > best_score or best is None:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best = copy.deepcopy(task.module.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs > cfg.patience:
                tqdm.write(f"{task.name}: early stop, best score {best_score:.4f} at epoch {best_epoch}")
                stopped = True
        if stopped:
            break
        totals, seen, epoch_gen_state = {}, 0, gen.get_state()
        save(epoch + 1, 0)
    save(len(history) + 1, 0, done=True)
    return LoopResult(best, best_epoch, best_score, history, steps)


def clear_state(state_path: str | Path | None) -> None:
    """Remove the resume state once the run's outputs are safely written."""
    if state_path is not None:
        checkpoint.remove(state_path)

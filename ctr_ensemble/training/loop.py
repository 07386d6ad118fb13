"""The epoch/batch loop every trainer shares: shuffling, NaN guard, evaluation, early stopping, resume.

A trainer describes *what* to optimise as a ``Task`` (one module holding everything trained,
its optimiser, a loss over a batch of row indices, an evaluation); ``run`` does the rest:

- shuffles rows each epoch with its own seeded generator and walks them in batches, or, given a
  ``loader.Batches`` (prepared shards, DDP), walks its batches: then ``Task.loss`` gets
  ``(feeds, labels)`` instead of row ids;
- refuses a non-finite loss *before* the optimiser step, naming epoch, step and batch, so the
  weights and the last resume state stay clean; likewise a non-finite gradient after backward
  (a finite loss can still back-propagate NaN), naming the first parameter that has one;
- evaluates after each epoch, keeps the best state (highest score); an epoch without a better
  score multiplies every learning rate by ``plateau_factor`` (reduce-LR-on-plateau, floor
  ``min_lr``), and ``patience`` such epochs in a row stop the run (FuxiCTR's
  ``early_stop_patience`` and ``reduce_lr_on_plateau``); the best state is what the run returns;
- after each epoch calls ``on_epoch(epoch, history row)`` (a tuner's pruner raises there);
- with a ``state_path``, writes a resume state atomically every ``save_every`` steps and at
  each epoch end (weights, optimiser, scheduler, RNG states, position in the epoch, best so
  far, history). ``resume=True`` continues from it and reaches the same weights as an
  uninterrupted run with the same seed (same thread count assumed).

Under torchrun (``dist``) every rank runs this loop on its own batches; the forward/backward pass runs
under ``distributed.collective`` (a dead or silent peer becomes a one-line error), epoch totals are
summed over ranks, only rank 0 prints and writes the resume state (every rank reads it on resume, so
it must be on storage they share).
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

from ctr_ensemble import files
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training import distributed
from ctr_ensemble.training.distributed import Dist

STATE_FORMAT = "ctr-ensemble/train-state"
STATE_VERSION = 1


@dataclass
class LoopConfig:
    epochs: int = 100  # the most epochs; early stopping normally ends the run first
    batch_size: int = 512
    patience: int = 2  # epochs in a row without a better score that stop the run (FuxiCTR early_stop_patience)
    seed: int = 42
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit)
    lr_decay: float = 1.0  # learning-rate factor per epoch, applied smoothly every step (1 = constant)
    save_every: int = 0  # steps between resume states (0 = at epoch ends only)
    plateau_factor: float = 0.1  # lr factor after an epoch without a better score (1 = off; FuxiCTR's 0.1)
    min_lr: float = 1e-6  # reduce-LR-on-plateau never goes below this


@dataclass
class Task:
    """What one trainer optimises."""

    name: str
    module: nn.Module  # everything that is trained; its state_dict is what resume restores
    optimizer: torch.optim.Optimizer
    # row ids (or a loader batch (feeds, labels)) → (loss, named parts)
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    evaluate: Callable[[], tuple[float, dict[str, float]]]  # → (score to maximise, metrics for the history)


@dataclass
class LoopResult:
    best: dict[str, torch.Tensor]  # module state_dict of the best epoch
    best_epoch: int
    best_score: float
    history: list[dict]
    steps: int


def _check_finite(task: Task, loss: torch.Tensor, parts: dict[str, torch.Tensor], epoch: int, step: int,
                  batch: int, rows: int, first_row: int | None) -> None:
    value = float(loss.detach())
    if math.isfinite(value):
        return
    bad = [k for k, v in parts.items() if not math.isfinite(float(v.detach()))]
    where = f", first row index {first_row}" if first_row is not None else ""
    raise CtrError(
        f"{task.name}: loss is {value} at epoch {epoch}, step {step} (batch {batch} of the epoch, {rows} rows{where})"
        + (f"; non-finite parts: {', '.join(bad)}" if bad else "")
        + ". Training stopped before this step was applied; lower the learning rate or check the inputs/checkpoints."
    )


def _check_grads(task: Task, epoch: int, step: int, batch: int, rows: int) -> None:
    """NaN or inf in any gradient (sparse ones: their values) is refused. Fast path: one fused L2 norm per
    gradient (0.15 ns per element on one CPU core; max-|g| or isfinite() cost 20x that), finite unless some
    entry is NaN/inf or the squares overflow float32; only then every gradient is checked entry by entry."""
    values = [p.grad._values() if p.grad.is_sparse else p.grad for p in task.module.parameters() if p.grad is not None]
    if not values or bool(torch.stack(torch._foreach_norm(values)).isfinite().all()):
        return
    for name, p in task.module.named_parameters():
        g = p.grad
        if g is not None and not bool((g._values() if g.is_sparse else g).isfinite().all()):
            raise CtrError(f"{task.name}: non-finite gradient at epoch {epoch}, step {step} (batch {batch} of the epoch, "
                           f"{rows} rows), first in {name}. Training stopped before this step was applied; lower the "
                           "learning rate or check the inputs.")


def _load_state(path: Path, run_id: dict) -> dict:
    state = checkpoint.read_verified(path, "training state", STATE_FORMAT, STATE_VERSION)
    if state.get("run") != run_id:
        old, new = state.get("run") or {}, run_id
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CtrError(f"{path}: the saved training state belongs to a different run (differs in: {', '.join(diff)}); "
                       "resume with the same data, members and settings, or delete the state file to start over")
    return state


def _scale_lr(optimizers: list[torch.optim.Optimizer], factor: float, floor: float) -> float:
    """Multiply every param group's lr by ``factor`` (not below ``floor``); returns the first group's new lr."""
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = max(g["lr"] * factor, floor)
    return optimizers[0].param_groups[0]["lr"]


def _lr(optimizers: list[torch.optim.Optimizer]) -> float:
    return optimizers[0].param_groups[0]["lr"]


def run(task: Task, n_rows: int, cfg: LoopConfig, state_path: str | Path | None = None, resume: bool = False,
        run_id: dict | None = None, batches=None, dist: Dist | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, lr_schedule: list[float] | None = None) -> LoopResult:
    """Train ``task`` over ``n_rows`` rows (or the epochs of ``batches``, a ``loader.Batches``); see the module
    doc. ``run_id`` identifies the run in the resume state. ``on_epoch(epoch, row)`` runs after each epoch's
    evaluation with that epoch's history row (what it raises propagates: a pruned trial stops the run).
    ``lr_schedule``: the first param group's lr of every epoch, e.g. an earlier run's history ``lr`` column
    (a refit replays the reductions its validation decided); every group keeps its ratio to the first, and
    reduce-LR-on-plateau is off."""
    if lr_schedule is not None and (len(lr_schedule) < cfg.epochs or cfg.lr_decay != 1.0):
        raise CtrError(f"an lr schedule needs one lr per epoch ({len(lr_schedule)} for {cfg.epochs} epochs) and "
                       f"lr_decay 1 (got {cfg.lr_decay})")
    if n_rows <= 0:
        raise CtrError(f"{task.name}: no training rows")
    if cfg.patience < 1:
        raise CtrError(f"patience must be >= 1 (epochs without a better validation score before stopping), "
                       f"got {cfg.patience}")
    if not 0.0 < cfg.plateau_factor <= 1.0:
        raise CtrError(f"plateau_factor must be in (0, 1] (1 = no reduce-LR-on-plateau), got {cfg.plateau_factor}")
    dist = dist or Dist()
    main = dist.is_main
    run_id = dict(run_id or {})
    state_path = Path(state_path) if state_path is not None else None
    per_epoch = len(batches) if batches is not None else math.ceil(n_rows / cfg.batch_size)
    # A set of optimisers (sparse tables + dense Adam, ``step.Optimizers``) gets one scheduler each.
    inner = getattr(task.optimizer, "opts", [task.optimizer])
    scheds = []
    if cfg.lr_decay != 1.0:
        if not 0.0 < cfg.lr_decay <= 1.0:
            raise CtrError(f"lr_decay must be in (0, 1], got {cfg.lr_decay}")
        scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=cfg.lr_decay ** (1.0 / per_epoch)) for o in inner]
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
        saved = st["scheduler"] if isinstance(st["scheduler"], list) else [st["scheduler"]] * bool(st["scheduler"])
        for sched, sd in zip(scheds, saved):
            sched.load_state_dict(sd)
        torch.set_rng_state(st["torch_rng"])
        best, best_score, best_epoch, bad_epochs = st["best"], st["best_score"], st["best_epoch"], st["bad_epochs"]
        history, steps, start_epoch, start_pos = st["history"], st["steps"], st["epoch"], st["pos"]
        totals, seen, epoch_gen_state = st["totals"], st["seen"], st["epoch_gen_state"]
        if st["done"]:
            if main:
                tqdm.write(f"{task.name}: the saved run had already finished; using its result")
            return LoopResult(best, best_epoch, best_score, history, steps)
        if main:
            tqdm.write(f"{task.name}: resuming at epoch {start_epoch}, step {steps} (row {start_pos} of the epoch)")
    elif resume and main:
        tqdm.write(f"{task.name}: no training state at {state_path}; starting from scratch")

    def save(epoch: int, pos: int, done: bool = False) -> None:
        if state_path is None or not main:
            return
        checkpoint.write_verified(state_path, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "run": run_id, "done": done,
            "epoch": epoch, "pos": pos, "steps": steps, "epoch_gen_state": epoch_gen_state,
            "torch_rng": torch.get_rng_state(), "module": task.module.state_dict(),
            "optimizer": task.optimizer.state_dict(), "scheduler": [s.state_dict() for s in scheds] or None,
            "best": best, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "history": history, "totals": totals, "seen": seen,
        })

    def epoch_batches(epoch: int, start: int):
        """(row offset in the epoch, rows, first row index or None, what Task.loss gets) from ``start``."""
        if batches is not None:  # its order is a function of (seed, epoch): a resume skips what was done
            pos = 0
            for b in batches.epoch(epoch):
                n = len(b[1])
                if pos >= start:
                    yield pos, n, None, b
                pos += n
            return
        order = torch.randperm(n_rows, generator=gen)
        for s in range(start, n_rows, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            yield s, len(idx), int(idx[0]), idx

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.module.modules())
    stopped = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        if epoch == start_epoch and epoch_gen_state is not None:
            gen.set_state(epoch_gen_state)  # resuming: replay this epoch's shuffle, then skip what was done
        else:
            start_pos, totals, seen = 0, {}, 0
            epoch_gen_state = gen.get_state()
        task.module.train()
        if lr_schedule is not None:
            _scale_lr(inner, lr_schedule[epoch - 1] / _lr(inner), 0.0)
        t0 = time.perf_counter()
        local_batch = cfg.batch_size // dist.world
        best_desc = f", best {best_score:.4f}@{best_epoch}, wait {bad_epochs}/{cfg.patience}" if best is not None else ""
        bar = tqdm(epoch_batches(epoch, start_pos), total=per_epoch - start_pos // local_batch,
                   desc=f"{task.name} epoch {epoch}/{cfg.epochs} (lr {_lr(inner):.2g}{best_desc})", unit="batch",
                   leave=False, disable=not main)
        for s, n, first, batch in bar:
            if n < 2 and has_bn:  # BatchNorm cannot normalise one row in training mode: a 1-row tail batch sits out
                continue
            with distributed.collective(dist, f"training step {steps + 1} (DDP forward/backward)"):
                loss, parts = task.loss(batch)
                _check_finite(task, loss, parts, epoch, steps + 1, s // local_batch + 1, n, first)
                task.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                _check_grads(task, epoch, steps + 1, s // local_batch + 1, n)
            task.optimizer.step()
            for sched in scheds:
                sched.step()
            steps += 1
            seen += n
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) * n
            if steps % 10 == 0 or not dist.active:
                bar.set_postfix({k: f"{v / seen:.4f}" for k, v in list(totals.items())[:3]})
            if cfg.max_steps and steps >= cfg.max_steps:
                stopped = True
                break
            if cfg.save_every and steps % cfg.save_every == 0:
                save(epoch, s + n)
        bar.close()
        train_seconds = time.perf_counter() - t0
        keys = sorted(totals)
        summed = distributed.all_sum([totals[k] for k in keys] + [float(seen)], dist)
        epoch_totals, epoch_seen = dict(zip(keys, summed[:-1])), summed[-1]
        score, metrics = task.evaluate()
        row = {"epoch": epoch, **{f"train_{k}": v / max(epoch_seen, 1) for k, v in epoch_totals.items()}, **metrics,
               "seconds": time.perf_counter() - t0, "samples_per_s": epoch_seen / max(train_seconds, 1e-9)}
        row["lr"] = _lr(inner)
        improved = score > best_score or best is None
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best = copy.deepcopy(task.module.state_dict())
        else:
            bad_epochs += 1
        history.append(row)
        if main:
            tqdm.write(f"{task.name} epoch {epoch}/{cfg.epochs}: " + " ".join(
                f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds", "samples_per_s", "lr")
                and isinstance(v, float)) + f" lr={row['lr']:.2g} ({row['seconds']:.1f}s, "
                f"{row['samples_per_s']:,.0f} samples/s) " + ("new best" if improved else
                f"best {best_score:.4f}@{best_epoch}, {bad_epochs}/{cfg.patience} without improvement"))
        if not improved:
            if bad_epochs >= cfg.patience:
                if main:
                    tqdm.write(f"{task.name}: early stop, best score {best_score:.4f} at epoch {best_epoch} "
                               f"(weights of that epoch restored)")
                stopped = True
            elif cfg.plateau_factor < 1.0 and _lr(inner) > cfg.min_lr and lr_schedule is None:
                new_lr = _scale_lr(inner, cfg.plateau_factor, cfg.min_lr)
                if main:
                    tqdm.write(f"{task.name}: no better score, learning rate reduced to {new_lr:.2g}")
        if on_epoch is not None:
            on_epoch(epoch, row)
        if stopped:
            break
        totals, seen, epoch_gen_state = {}, 0, gen.get_state()
        save(epoch + 1, 0)
    save(len(history) + 1, 0, done=True)
    return LoopResult(best, best_epoch, best_score, history, steps)


def clear_state(state_path: str | Path | None) -> None:
    """Remove the resume state once the run's outputs are safely written."""
    if state_path is not None:
        files.remove(state_path)


def write_once(dist: Dist, state_path: str | Path | None, write) -> None:
    """A run's outputs written once, by rank 0 (``write()``), then its resume state removed; the other ranks
    wait for it, so none exits before the files exist."""
    if dist.is_main:
        write()
        clear_state(state_path)
    distributed.barrier(dist, "waiting for rank 0 to write the outputs")

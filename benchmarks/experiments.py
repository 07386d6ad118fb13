"""``make experiments``: independent vs mutual vs collaborative training, in one comparable report.

On one data set and one train/val/test split, for every seed:

1. RQ1/RQ2 (arXiv 2406.12087): each member architecture trained independently (copies with
   different seeds), mutually from scratch (copies co-trained), and mutually fine-tuned (the
   independent copies + one epoch at lr 7e-4, exponential decay). A control,
   ``independent+1epoch``, fine-tunes the same copies the same way with mutual weight 0, so a
   gain can be told apart from "one more epoch".
2. RQ3: mutual fine-tuning among copies of one architecture vs among different architectures.
3. RQ4: N = 2..5 copies of one architecture fine-tuned together.
4. Ensembles of the collaborative pair (default DHEN + InterFormer, the CETNet paper's): the
   independently trained members fused by the fitted rule (``fusion_fit.fit`` on the validation
   split's member probabilities, what ``export --fit-fusion`` serves), by mean and by
   negation-entropy weights with τ swept, and the collaborative ensemble (arXiv 2411.13700)
   trained jointly on the same architectures, each against the best single member and the
   collaborative one against the fitted ensemble (issue 13's bar). With serving on (default), both
   repositories are exported and run in the real tritonserver; the member and ensemble predictions
   scored are the ones Triton returned over HTTP (the fitted rule and the τ sweep apply the
   reference fusion, the code the fusion model runs, to the served member probabilities; the
   served τ = 1 ensemble is checked against it).
5. ``--collab-variants``: more collaborative runs per seed, each one setting changed
   (``COLLAB_VARIANTS``: model selection, KL weight, member-loss weight, head, fine-tuning from the
   independent members, a head over frozen members trained on the training rows or on half of
   the validation rows); ``--only ensembles`` skips 1-3.

AUC and logloss come from ``ctr_ensemble.metrics`` (scikit-learn) on the test split.
RelaImp = (AUC − 0.5)/(AUC_base − 0.5) − 1, averaged over paired runs: a member against the
independent copy it started from (or, from scratch, the independent copy with the same index),
an ensemble against the best single member of the same seed.

Writes ``<out>/results.json`` (keys: dataset, seeds, commit, date, rows), ``results.md``, ``runs.csv``
(every run of every seed), ``details.json`` (settings, timings, served parity, fitted rules, commit)
and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # per-batch bars off; the outer progress bar below stays on

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ctr_ensemble import metrics, models  # noqa: E402
from ctr_ensemble.data.encode import Arrays, encode_file  # noqa: E402
from ctr_ensemble.data.fit import fit  # noqa: E402
from ctr_ensemble.data.spec import FeatureSpec  # noqa: E402
from ctr_ensemble.data.synth import SynthConfig, generate  # noqa: E402
from ctr_ensemble.errors import CtrError  # noqa: E402
from ctr_ensemble.export import fusion_fit  # noqa: E402
from ctr_ensemble.layers.fusion import fuse  # noqa: E402
from ctr_ensemble.models import ensemble  # noqa: E402
from ctr_ensemble.training import collab, mutual  # noqa: E402
from ctr_ensemble.models.checkpoint import Checkpoint  # noqa: E402
from ctr_ensemble.models.predict import predict  # noqa: E402
from ctr_ensemble.training.config import TrainConfig  # noqa: E402
from ctr_ensemble.training.member import train_member, unique_names  # noqa: E402

# Small members for the quick default (2 CPU cores, < 20 minutes for everything); --full uses the registry defaults.
QUICK_MODELS = {
    "deepfm": {"embedding_dim": 8, "hidden": [64, 32]},
    "dcn": {"embedding_dim": 8, "hidden": [64, 32], "cross_layers": 2},
    "pnn": {"embedding_dim": 8, "hidden": [64, 32]},
    "fibinet": {"embedding_dim": 8, "hidden": [64, 32]},
    "dcnv2": {"embedding_dim": 8, "hidden": [64, 32], "cross_layers": 2},
    "dhen": {"embedding_dim": 8, "hidden": [64, 32], "n_layers": 2, "mlp_hidden": 64, "n_tokens": 8},
    "interformer": {"embedding_dim": 8, "hidden": [64, 32], "n_layers": 1, "n_tokens": 8},
    "emofm": {"embedding_dim": 8, "hidden": [64, 32], "field_hidden": [8]},
}
REAL = {  # --dataset NAME: files under --data-root, read with the project's readers
    "criteo": ("criteo_kaggle_sample", "criteo"),
    "avazu": ("avazu_kaggle_sample", "avazu"),
}


@dataclass
class Setting:
    synth_rows: dict = field(default_factory=lambda: {"train": 60_000, "val": 10_000, "test": 20_000})
    archs: list = field(default_factory=lambda: ["deepfm", "dcn"])  # RQ1 / RQ3 members
    copies: int = 2  # independent copies per architecture co-trained in RQ1 (the paper: 4)
    rq4_arch: str = "deepfm"
    rq4_max: int = 5
    collab_members: list = field(default_factory=lambda: ["dhen", "interformer"])
    taus: list = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    epochs: int = 100  # independent / from-scratch / collaborative training: until early stopping (the product's)
    patience: int = 2  # epochs without a better val AUC that stop training (lr × 0.1 after each such epoch)
    batch_size: int = 512
    lr: float = 2e-3
    mutual_weight: float = 1.0
    kl_weight: float = 0.1
    tau: float = 1.0
    small_models: bool = True
    min_count: int = 10
    collab_variants: list = field(default_factory=list)  # names in COLLAB_VARIANTS


QUICK = Setting()
FULL = Setting(synth_rows={"train": 300_000, "val": 37_500, "test": 37_500}, archs=["deepfm", "dcn", "pnn", "fibinet"],
               copies=4, small_models=False)

# --collab-variants: one setting of the collaborative run changed (CollabConfig fields; "head": HeadConfig fields).
# "init": "independent" starts the members from this seed's independently trained members; "rows": "val-halves" trains
# on one half of the validation split (a seeded half) and selects on the other, the test split untouched.
COLLAB_VARIANTS = {
    "select-logloss": ({"select": "logloss"}, "model selection / early stopping on the fused val logloss"),
    "kl0": ({"kl_weight": 0.0}, "KL weight λ = 0"),
    "kl1": ({"kl_weight": 1.0}, "KL weight λ = 1"),
    "mw0": ({"member_weight": 0.0}, "member-loss weight μ = 0 (fused BCE + KL only)"),
    "mw1": ({"member_weight": 1.0}, "member-loss weight μ = 1 (the paper's; the default before)"),
    "mw3": ({"member_weight": 3.0}, "member-loss weight μ = 3"),
    "linear-head": ({"head": {"hidden": []}}, "linear head (no hidden layer)"),
    "detach": ({"detach_head": True}, "the head's loss does not reach the members (they learn from their BCE + KL)"),
    "finetune": ({"init": "independent", "lr": mutual.FINETUNE_LR, "epochs": 3, "lr_decay": mutual.FINETUNE_DECAY,
                  "plateau_factor": 1.0},
                 "members start from the independent ones; joint fine-tuning at lr 7e-4 → 1/10 in 3 epochs"),
    "frozen": ({"init": "independent", "freeze_members": True},
               "head only, over the frozen independent members, trained on the training rows"),
    "frozen-heldout": ({"init": "independent", "freeze_members": True, "rows": "val-halves"},
                       "head only, over the frozen independent members, trained on half of the val rows, "
                       "selected on the other half"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", *REAL], help="synthetic (generated) or a real sample")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="where the real samples live")
    p.add_argument("--seeds", default="0,1,2", help="comma list; at least 3 for mean ± std")
    p.add_argument("--full", action="store_true", help="the full setting: 300k rows, 4 architectures × 4 copies, default model sizes, 8 epochs")
    p.add_argument("--archs", help="override the RQ1/RQ3 architectures (comma list)")
    p.add_argument("--collab-members", help="override the collaborative pair (comma list, N >= 2)")
    p.add_argument("--epochs", type=int, help="override the independent/from-scratch epochs")
    p.add_argument("--train-rows", type=int, help="synthetic: override the train rows (val/test scale with it)")
    p.add_argument("--only", choices=["ensembles"], help="ensembles: only the collaborative pair (independent members, "
                   "fusions, collaborative runs); no RQ1-RQ4")
    p.add_argument("--collab-variants", default="", help=f"comma list of extra collaborative runs per seed, or all: "
                   f"{', '.join(COLLAB_VARIANTS)}")
    p.add_argument("--no-serve", action="store_true", help="score ensembles with PyTorch instead of through Triton")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran ~10x slower, spinning on each other)")
    p.add_argument("--out", type=Path, default=Path("artifacts/experiments"))
    p.add_argument("--report-only", action="store_true", help="rebuild results/plots from <out>/runs.csv and details.json without training")
    return p.parse_args()


def setting_from(args) -> Setting:
    s = FULL if args.full else QUICK
    if args.archs:
        s = replace(s, archs=args.archs.split(","))
    if args.collab_members:
        s = replace(s, collab_members=args.collab_members.split(","))
    if args.epochs:
        s = replace(s, epochs=args.epochs)
    if args.train_rows:
        n = args.train_rows
        s = replace(s, synth_rows={"train": n, "val": n // 6, "test": n // 3})
    if args.dataset != "synthetic":
        s = replace(s, min_count=2)  # the real samples have a few thousand rows
    if args.only == "ensembles":
        s = replace(s, archs=[], copies=0, rq4_max=1)
    variants = [v for v in args.collab_variants.split(",") if v]
    if variants == ["all"]:
        variants = list(COLLAB_VARIANTS)
    for v in variants:
        if v not in COLLAB_VARIANTS:
            raise CtrError(f"--collab-variants: unknown variant {v!r}; known: {', '.join(COLLAB_VARIANTS)}")
    s = replace(s, collab_variants=variants)
    for a in {*s.archs, *s.collab_members, *([s.rq4_arch] if s.archs else [])}:
        models.entry(a)
    return s


def load_data(args, s: Setting, out: Path) -> tuple[FeatureSpec, Arrays, Arrays, Arrays, dict]:
    if args.dataset == "synthetic":
        d = out / "data"
        if not (d / "meta.json").is_file():
            generate(d, SynthConfig(splits=s.synth_rows))
        files, fmt = {k: d / f"{k}.tsv" for k in ("train", "val", "test")}, "criteo"
        meta = json.loads((d / "meta.json").read_text())
        info = {"source": "synthetic (ctr_ensemble.data.synth, seed 7)", "oracle_auc_test": meta["splits"]["test"]["oracle_auc"]}
    else:
        folder, fmt = REAL[args.dataset]
        d = args.data_root / folder
        files = {"train": d / "train.csv", "val": d / "dev.csv", "test": d / "test.csv"}
        for f in files.values():
            if not f.is_file():
                raise CtrError(f"{f}: not found; --data-root must point at the shared data folder")
        info = {"source": str(d.resolve())}
    spec = fit(files["train"], min_count=s.min_count, fmt=fmt)
    arrays = [encode_file(files[k], spec, fmt=fmt) for k in ("train", "val", "test")]
    info.update({k: len(a) for k, a in zip(("train_rows", "val_rows", "test_rows"), arrays)})
    return spec, *arrays, info


def _curve(row: dict) -> dict:
    """A training-history row's validation metrics and lr (what the training-curve plot reads)."""
    return {k: v for k, v in row.items() if k == "epoch" or k == "lr" or k.startswith("val_")}


class Experiment:
    """All runs of one seed; ``records`` gets one entry per (run, member) scored on test."""

    def __init__(self, s: Setting, spec, train, val, test, serve: bool, workdir: Path):
        self.s, self.spec, self.train, self.val, self.test = s, spec, train, val, test
        self.serve, self.workdir = serve, workdir
        self.records: list[dict] = []
        self.details: dict = {"served": []}

    def cfg(self, arch: str):
        return models.make_config(arch, QUICK_MODELS.get(arch) if self.s.small_models else None)

    def score(self, p: np.ndarray) -> tuple[float, float]:
        return metrics.auc(self.test.label, p), metrics.logloss(self.test.label, p)

    def record(self, seed, regime, members, model, p, base_auc=None):
        auc, ll = self.score(p)
        self.records.append({"seed": seed, "regime": regime, "members": list(members), "model": model, "auc": auc,
                             "logloss": ll, "base_auc": base_auc})
        return auc

    def independent(self, seed: int, arch: str, k: int) -> tuple[Checkpoint, float]:
        cfg = TrainConfig(epochs=self.s.epochs, batch_size=self.s.batch_size, lr=self.s.lr, patience=self.s.patience,
                          seed=1000 * seed + 37 * k + 1)
        ck = train_member(f"{arch}_{k + 1}", arch, self.cfg(arch), self.spec, self.train, self.val, cfg)
        if k == 0 and arch in self.s.collab_members:  # the collaborative pair's independent counterparts
            self.details.setdefault("independent_epochs", []).append(
                {"seed": seed, "arch": arch, "best_epoch": ck.metrics["best_epoch"], "epochs": len(ck.metrics["history"]),
                 "history": [_curve(h) for h in ck.metrics["history"]]})
        return ck, self.score(predict(ck.build(), self.test.feeds()))[0]

    def cotrain(self, seed, regime, inits: list[mutual.MemberInit], cfg: mutual.MutualConfig, bases: list[float]):
        cks = mutual.train_mutual(inits, self.spec, self.train, self.val, replace(cfg, seed=1000 * seed + 7))
        archs = [m.arch for m in inits]
        for ck, base in zip(cks, bases):
            self.record(seed, regime, archs, ck.arch, predict(ck.build(), self.test.feeds()), base)

    def needed(self) -> dict[str, int]:
        """Independent copies to train per architecture and seed."""
        s = self.s
        need = {a: s.copies for a in s.archs}
        if s.archs:
            need[s.rq4_arch] = max(need.get(s.rq4_arch, 0), s.rq4_max)
        for a in s.collab_members:
            need[a] = max(need.get(a, 0), 1)
        return need

    def run_seed(self, seed: int, bar) -> None:
        s = self.s
        need = self.needed()
        pre: dict[str, list[tuple[Checkpoint, float]]] = {}
        for arch, n in need.items():
            pre[arch] = []
            for k in range(n):
                bar.set_description(f"seed {seed}: independent {arch} #{k + 1}")
                pre[arch].append(self.independent(seed, arch, k))
                bar.update(1)
        for arch in need:
            for ck, auc in pre[arch][: s.copies if arch in s.archs else 1]:
                self.records.append({"seed": seed, "regime": "independent", "members": [arch], "model": arch, "auc": auc,
                                     "logloss": self.score(predict(ck.build(), self.test.feeds()))[1],
                                     "base_auc": auc})

        def inits(cks):
            return [mutual.MemberInit(ck.name, ck.arch, ck.config, ck.state_dict) for ck in cks]

        scratch = mutual.MutualConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, patience=s.patience,
                                      mutual_weight=s.mutual_weight)
        tune = mutual.MutualConfig.finetune(batch_size=s.batch_size, mutual_weight=s.mutual_weight)
        for arch in s.archs:  # RQ1 / RQ2
            cks, bases = [c for c, _ in pre[arch][: s.copies]], [a for _, a in pre[arch][: s.copies]]
            bar.set_description(f"seed {seed}: {arch}×{s.copies} mutual from scratch")
            self.cotrain(seed, "mutual-scratch", mutual.members_from_archs([arch] * s.copies, {arch: asdict(self.cfg(arch))}),
                         scratch, bases)
            bar.update(1)
            bar.set_description(f"seed {seed}: {arch}×{s.copies} mutual fine-tune")
            self.cotrain(seed, "mutual-finetune", inits(cks), tune, bases)
            bar.update(1)
            bar.set_description(f"seed {seed}: {arch}×{s.copies} one more epoch alone (control)")
            self.cotrain(seed, "independent+1epoch", inits(cks), replace(tune, mutual_weight=0.0), bases)
            bar.update(1)
        if len(s.archs) > 1:  # RQ3: one pretrained copy of each architecture, fine-tuned together
            bar.set_description(f"seed {seed}: {'+'.join(s.archs)} mutual fine-tune")
            self.cotrain(seed, "mutual-finetune-diff-arch", inits([pre[a][0][0] for a in s.archs]), tune,
                         [pre[a][0][1] for a in s.archs])
            bar.update(1)
        for n in range(2, s.rq4_max + 1) if s.archs else ():  # RQ4
            if s.rq4_arch in s.archs and n == s.copies:
                continue  # the RQ1 run is this one
            bar.set_description(f"seed {seed}: {s.rq4_arch}×{n} mutual fine-tune")
            self.cotrain(seed, "mutual-finetune", inits([c for c, _ in pre[s.rq4_arch][:n]]), tune,
                         [a for _, a in pre[s.rq4_arch][:n]])
            bar.update(1)
        self.ensembles(seed, [pre[a][0][0] for a in s.collab_members], bar)

    def collab_config(self, seed: int, overrides: dict) -> collab.CollabConfig:
        s = self.s
        head = {"tau": s.tau, **overrides.get("head", {})}
        fields = {k: v for k, v in overrides.items() if k not in ("head", "init", "rows")}
        base = {"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.lr, "patience": s.patience, "kl_weight": s.kl_weight}
        return collab.CollabConfig(**{**base, **fields}, seed=1000 * seed + 11, head=collab.HeadConfig(**head))

    def train_collab(self, seed: int, cks: list[Checkpoint], overrides: dict) -> ensemble.CollabCheckpoint:
        """One collaborative run: fresh members, or (``init``) this seed's independent members as the start."""
        archs = [c.arch for c in cks]
        if overrides.get("init") == "independent":
            members = [mutual.MemberInit(c.name, c.arch, c.config, c.state_dict) for c in cks]
        else:
            members = mutual.members_from_archs(archs, {a: asdict(self.cfg(a)) for a in archs})
        train, val = self.train, self.val
        if overrides.get("rows") == "val-halves":  # the head learns on rows the members never saw
            order = np.random.default_rng(1000 * seed + 13).permutation(len(val))
            half = len(val) // 2
            train, val = val.take(np.sort(order[:half])), val.take(np.sort(order[half:]))
        return collab.train_collab(members, self.spec, train, val, self.collab_config(seed, overrides))

    def ensembles(self, seed: int, cks: list[Checkpoint], bar) -> None:
        s = self.s
        archs = [c.arch for c in cks]
        names = unique_names(archs)
        cks = [replace(c, name=n) for c, n in zip(cks, names)]
        bar.set_description(f"seed {seed}: collaborative {'+'.join(names)}")
        cc = self.train_collab(seed, cks, {})
        bar.update(1)
        bar.set_description(f"seed {seed}: scoring ensembles" + (" through Triton" if self.serve else ""))
        te = self.test
        if self.serve:
            member_p, ne1, collab_p, collab_members, parity = self.served(seed, cks, cc)
        else:
            member_p = {c.name: predict(c.build(), te.feeds()) for c in cks}
            fused, _, mp = ensemble.predict_collab(cc.build(), te.feeds())
            collab_p, collab_members, ne1, parity = fused, {n: mp[:, i] for i, n in enumerate(names)}, None, None
        aucs = {n: self.score(p)[0] for n, p in member_p.items()}
        best = max(aucs, key=aucs.get)
        self.record(seed, "best-single-member", archs, best, member_p[best], aucs[best])
        probs = torch.from_numpy(np.stack([member_p[n] for n in names], 1).astype(np.float32))
        # the fitted rule: fitted on the validation split's member probabilities (PyTorch), applied to the served ones
        val_p = np.stack([predict(c.build(), self.val.feeds()) for c in cks], 1).astype(np.float32)
        rule, fit = fusion_fit.fit(names, val_p, self.val.label.astype(np.int64))
        self.record(seed, "ensemble-fitted", archs, "ensemble", fusion_fit.fused(rule, probs.numpy()), aucs[best])
        self.details.setdefault("fitted", []).append({"seed": seed, "chosen": fit["chosen"], "rule": fit["rule"],
                                                      "val_logloss": fit["val_logloss"]})
        self.record(seed, "ensemble-mean", archs, "ensemble", fuse(probs, "mean")[0][:, 0].numpy(), aucs[best])
        for tau in s.taus:
            fused = fuse(probs, "negation_entropy", tau)[0][:, 0].numpy()
            self.record(seed, f"ensemble-ne(tau={tau:g})", archs, "ensemble", fused, aucs[best])
            if tau == 1.0 and ne1 is not None:
                parity["ne_tau1_served_vs_reference"] = float(np.max(np.abs(ne1 - fused)))
        self.record(seed, "ensemble-collaborative", archs, "ensemble", collab_p, aucs[best])
        for n in names:  # the collaborative members on their own, against their independent counterparts
            self.record(seed, "collaborative-member", archs, n, collab_members[n], aucs[n])
        self.collab_epochs(seed, "ensemble-collaborative", cc)
        if parity is not None:
            self.details["served"].append({"seed": seed, **parity})
        for v in s.collab_variants:  # PyTorch-scored: the served path is the default run's, checked above
            bar.set_description(f"seed {seed}: collaborative [{v}]")
            vc = self.train_collab(seed, cks, COLLAB_VARIANTS[v][0])
            fused, _, mp = ensemble.predict_collab(vc.build(), te.feeds())
            self.record(seed, f"ensemble-collaborative[{v}]", archs, "ensemble", fused, aucs[best])
            for i, n in enumerate(names):
                self.record(seed, f"collaborative-member[{v}]", archs, n, mp[:, i], aucs[n])
            self.collab_epochs(seed, f"ensemble-collaborative[{v}]", vc)
            bar.update(1)

    def collab_epochs(self, seed: int, regime: str, cc: ensemble.CollabCheckpoint) -> None:
        self.details.setdefault("collab_epochs", []).append(
            {"seed": seed, "regime": regime, "best_epoch": cc.metrics["best_epoch"], "epochs": len(cc.metrics["history"]),
             "val_auc": cc.metrics["val_auc"], "val_logloss": cc.metrics["val_logloss"],
             "history": [_curve(h) for h in cc.metrics["history"]]})

    def served(self, seed: int, cks: list[Checkpoint], cc: ensemble.CollabCheckpoint):
        """Both ensembles exported and served by the real tritonserver; returns what Triton answered over HTTP."""
        from ctr_ensemble.export.repository import ENSEMBLE_NAME, RepoOptions, write_repository
        from ctr_ensemble.layers.fusion import COLLABORATIVE
        from ctr_ensemble.serving.client import TritonScorer
        from ctr_ensemble.serving.server import TritonServer

        te, va = self.test, self.val
        rows = va.feeds(slice(0, 2048))
        out = {}
        for kind in ("independent", "collaborative"):
            repo = self.workdir / f"repo_{kind}"
            if kind == "independent":
                write_repository(cks, repo, RepoOptions(fusion_mode="negation_entropy", tau=1.0, fusion_kind="cpu"), parity_rows=rows)
            else:
                write_repository([], repo, RepoOptions(fusion_mode=COLLABORATIVE, fusion_kind="cpu"), parity_rows=rows, collab=cc)
            with TritonServer(repo) as server:
                scorer = TritonScorer(server.http_url, "http")
                scorer.check_ready(ENSEMBLE_NAME)
                out[kind] = {n: scorer.score(n, te.feeds()) for n in [c.name for c in cks] + [ENSEMBLE_NAME]}
                scorer.close()
        ref, _, ref_members = ensemble.predict_collab(cc.build(), te.feeds())
        names = [c.name for c in cks]
        parity = {
            "members_served_vs_torch": max(float(np.max(np.abs(out["independent"][c.name] - predict(c.build(), te.feeds()))))
                                           for c in cks),
            "collaborative_served_vs_torch": float(np.max(np.abs(out["collaborative"][ENSEMBLE_NAME] - ref))),
            "collaborative_members_served_vs_torch": float(np.max(np.abs(
                np.stack([out["collaborative"][n] for n in names], 1) - ref_members))),
        }
        return ({n: out["independent"][n] for n in names}, out["independent"][ENSEMBLE_NAME],
                out["collaborative"][ENSEMBLE_NAME], {n: out["collaborative"][n] for n in names}, parity)

    def n_steps(self) -> int:
        s = self.s
        rq4 = sum(1 for n in range(2, s.rq4_max + 1) if not (s.rq4_arch in s.archs and n == s.copies)) if s.archs else 0
        return sum(self.needed().values()) + 3 * len(s.archs) + (len(s.archs) > 1) + rq4 + 1 + len(s.collab_variants)


def _sd(x: np.ndarray) -> float:
    """Sample standard deviation (0 for a single value)."""
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def aggregate(records: list[dict]) -> list[dict]:
    """Rows of results.json. The best single member can differ between seeds: its row is named after
    the member that was best most often, and its AUC is the mean of each seed's best."""
    best = [r for r in records if r["regime"] == "best-single-member"]
    if best:
        names = [r["model"] for r in best]
        most = max(set(names), key=names.count)
        records = [{**r, "model": most} if r["regime"] == "best-single-member" else r for r in records]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["regime"], tuple(r["members"]), r["model"])].append(r)
    rows = []
    for (regime, members, model), rs in groups.items():
        auc = np.array([r["auc"] for r in rs])
        rel = [(r["auc"] - 0.5) / (r["base_auc"] - 0.5) - 1 for r in rs if r["base_auc"] is not None]
        ll = np.array([r["logloss"] for r in rs])
        rows.append({"regime": regime, "members": list(members), "model": model, "auc_mean": float(auc.mean()),
                     "auc_std": _sd(auc), "logloss_mean": float(ll.mean()), "logloss_std": _sd(ll),
                     "relaimp": float(np.mean(rel)) if rel else None})
    return rows


def _find(rows, regime, members, model):
    return next((r for r in rows if r["regime"] == regime and r["members"] == members and r["model"] == model), None)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(rows: list[dict], s: Setting, out: Path, title: str, details: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    if s.archs:
        paths += rq_plots(rows, s, out, title)
    paths.append(ensemble_plot(rows, s, out, title))
    paths.append(collab_plot(rows, s, out, title))
    curves = curves_plot(details, s, out, title)
    return paths + ([curves] if curves is not None else [])


def rq_plots(rows: list[dict], s: Setting, out: Path, title: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    # 1. RQ1/RQ2: independent vs control vs mutual from scratch vs mutual fine-tuned, per architecture
    regimes = ["independent", "independent+1epoch", "mutual-scratch", "mutual-finetune"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(regimes)
    for j, reg in enumerate(regimes):
        vals = [_find(rows, reg, [a] if reg == "independent" else [a] * s.copies, a) for a in s.archs]
        ax.bar(np.arange(len(s.archs)) + j * width, [v["auc_mean"] for v in vals], width, yerr=[v["auc_std"] for v in vals],
               label=reg, capsize=3)
    lo = min(r["auc_mean"] - r["auc_std"] for r in rows if r["model"] in s.archs and r["regime"] in regimes)
    hi = max(r["auc_mean"] + r["auc_std"] for r in rows if r["model"] in s.archs and r["regime"] in regimes)
    ax.set_ylim(lo - 0.002, hi + 0.002)
    ax.set_xticks(np.arange(len(s.archs)) + 0.4 - width / 2, s.archs)
    ax.set_ylabel("test AUC (mean ± std over seeds × copies)")
    ax.set_title(f"RQ1/RQ2: mutual learning vs independent ({title})", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "rq1_mutual_vs_independent.png"))
    # 2. RQ3: same-architecture copies vs different architectures (RelaImp of fine-tuning)
    if len(s.archs) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        same = [_find(rows, "mutual-finetune", [a] * s.copies, a)["relaimp"] * 100 for a in s.archs]
        diff = [_find(rows, "mutual-finetune-diff-arch", s.archs, a)["relaimp"] * 100 for a in s.archs]
        x = np.arange(len(s.archs))
        ax.bar(x - 0.2, same, 0.4, label=f"same architecture ({s.copies} copies together)")
        ax.bar(x + 0.2, diff, 0.4, label=f"different architectures ({' + '.join(s.archs)})")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, s.archs)
        ax.set_ylabel("RelaImp vs its pretrained self (%)")
        ax.set_title(f"RQ3: mutual fine-tuning partners ({title})", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "rq3_same_vs_different.png"))
    # 3. RQ4: number of co-trained members
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ns = list(range(2, s.rq4_max + 1))
    vals = [_find(rows, "mutual-finetune", [s.rq4_arch] * n, s.rq4_arch) for n in ns]
    ctl = _find(rows, "independent+1epoch", [s.rq4_arch] * s.copies, s.rq4_arch)
    ax.errorbar(ns, [v["relaimp"] * 100 for v in vals], fmt="o-", label="mutual fine-tune")
    if ctl is not None:
        ax.axhline(ctl["relaimp"] * 100, color="tab:gray", ls="--", label="one more epoch alone (control)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(ns)
    ax.set_xlabel(f"co-trained {s.rq4_arch} copies N")
    ax.set_ylabel("RelaImp vs pretrained (%)")
    ax.set_title(f"RQ4: number of members ({title})", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "rq4_members.png"))
    return paths


def ensemble_plot(rows: list[dict], s: Setting, out: Path, title: str) -> Path:
    """Mean vs NE fusion (τ swept) vs fitted vs collaborative vs the best single member (test AUC)."""
    import matplotlib.pyplot as plt

    names = s.collab_members
    fig, ax = plt.subplots(figsize=(7, 3.8))
    best = next(r for r in rows if r["regime"] == "best-single-member")
    ne = [_find(rows, f"ensemble-ne(tau={t:g})", names, "ensemble") for t in s.taus]
    xs = [max(t, 0.03) for t in s.taus]  # τ = 0 (argmax) drawn at the left edge of the log axis
    ax.errorbar(xs, [v["auc_mean"] for v in ne], yerr=[v["auc_std"] for v in ne], fmt="o-", capsize=3, label="NE fusion (τ)")
    for reg, style, color, lab in (("ensemble-mean", "--", "tab:orange", "mean fusion"),
                                   ("ensemble-fitted", "-.", "tab:red", "fitted fusion"),
                                   ("ensemble-collaborative", "-", "tab:green", "collaborative ensemble")):
        r = _find(rows, reg, names, "ensemble")
        if r is not None:
            ax.axhline(r["auc_mean"], ls=style, color=color, label=lab)
    ax.axhline(best["auc_mean"], ls=":", color="k", label="best single member")
    ax.set_xscale("log")
    ax.set_xlabel("τ (leftmost point: τ = 0, most confident member)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"Ensembles of {' + '.join(names)} ({title})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out / "ensembles.png")


def collab_items(s: Setting, members: bool = True) -> list[tuple[str, str, list[str], str]]:
    """(label, regime, members, model) of the collaborative comparison: the independent members, their fusions, the
    collaborative ensemble and its members, then every variant (with its members when ``members``)."""
    names = s.collab_members
    out = [(f"independent {a}", "independent", [a], a) for a in names]
    out += [(lab, reg, names, "ensemble") for reg, lab in (("ensemble-fitted", "independent + fitted fusion"),
                                                           ("ensemble-ne(tau=1)", "independent + NE τ = 1"),
                                                           ("ensemble-mean", "independent + mean"))]
    for tag, v in [("", None), *((f" [{v}]", v) for v in s.collab_variants)]:
        suffix = f"[{v}]" if v else ""
        out.append((f"collaborative{tag} (fused)", f"ensemble-collaborative{suffix}", names, "ensemble"))
        if members or not v:
            out += [(f"collaborative{tag} member {n}", f"collaborative-member{suffix}", names, n) for n in unique_names(names)]
    return out


def curves_plot(details: dict, s: Setting, out: Path, title: str) -> Path | None:
    """Validation AUC per epoch, every seed: the default collaborative run (fused and its members) against the
    independently trained members; a marker where the lr was cut (reduce-LR-on-plateau)."""
    import matplotlib.pyplot as plt

    runs = [e for e in details.get("collab_epochs", []) if e["regime"] == "ensemble-collaborative" and e.get("history")]
    ind = [e for e in details.get("independent_epochs", []) if e.get("history")]
    if not runs:
        return None
    seeds = [e["seed"] for e in runs]
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), squeeze=False)
    names = unique_names(s.collab_members)
    for ax, run in zip(axes[0], runs):
        h = run["history"]
        ep = [r["epoch"] for r in h]
        ax.plot(ep, [r["val_auc"] for r in h], "o-", color="tab:green", label="collaborative (fused)")
        for n, style in zip(names, ("s--", "^:", "v-.", "d--")):
            ax.plot(ep, [r[f"val_auc_{n}"] for r in h], style, color="tab:olive", ms=4, label=f"collaborative member {n}")
        for e, style in zip([e for e in ind if e["seed"] == run["seed"]], ("s--", "^:", "v-.", "d--")):
            hi = e["history"]
            ax.plot([r["epoch"] for r in hi], [r["val_auc"] for r in hi], style, color="tab:blue", ms=4,
                    label=f"independent {e['arch']}")
        for curve, color in [(h, "tab:green"), *((e["history"], "tab:blue") for e in ind if e["seed"] == run["seed"])]:
            cuts = [b["epoch"] for a, b in zip(curve, curve[1:]) if b["lr"] < a["lr"]]
            ax.plot(cuts, [next(r["val_auc"] for r in curve if r["epoch"] == c) for c in cuts], "x", color=color, ms=9)
        ax.set_title(f"seed {run['seed']}", fontsize=8)
        ax.set_xlabel("epoch (x: first epoch at a cut lr)", fontsize=7)
    axes[0][0].set_ylabel("val AUC")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"Validation AUC per epoch: collaborative vs independent ({title})", fontsize=9)
    return _save(fig, out / "collab_curves.png")


def collab_plot(rows: list[dict], s: Setting, out: Path, title: str) -> Path:
    """Test AUC and logloss (mean ± std over seeds) of the collaborative ensemble against independent training + fusions."""
    import matplotlib.pyplot as plt

    items = [(lab, r) for lab, *k in collab_items(s, members=False) if (r := _find(rows, *k)) is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.32 * len(items)), sharey=True)
    y = np.arange(len(items))[::-1]
    colors = ["tab:red" if "fitted" in lab else "tab:green" if lab.startswith("collaborative") else "tab:blue"
              for lab, _ in items]
    for ax, key, xlabel in ((axes[0], "auc", "test AUC (higher is better)"), (axes[1], "logloss", "test logloss (lower is better)")):
        ax.barh(y, [r[f"{key}_mean"] for _, r in items], xerr=[r[f"{key}_std"] for _, r in items], color=colors,
                alpha=0.7, capsize=3)
        lo = min(r[f"{key}_mean"] - r[f"{key}_std"] for _, r in items)
        hi = max(r[f"{key}_mean"] + r[f"{key}_std"] for _, r in items)
        ax.set_xlim(lo - 0.1 * (hi - lo) - 1e-4, hi + 0.1 * (hi - lo) + 1e-4)
        fit = next(r for lab, r in items if "fitted" in lab)
        ax.axvline(fit[f"{key}_mean"], color="tab:red", ls="--", lw=0.8)
        ax.set_xlabel(xlabel, fontsize=8)
    axes[0].set_yticks(y, [lab for lab, _ in items], fontsize=7)
    fig.suptitle(f"Collaborative vs independent + fitted fusion, {' + '.join(s.collab_members)} ({title})", fontsize=9)
    return _save(fig, out / "collab_vs_fitted.png")


def paired_checks(records: list[dict], s: Setting) -> list[str]:
    """Differences on paired runs (same pretrained copies, same data order), where seed-to-seed noise cancels."""
    def auc_of(regime, members, model):  # keyed by (seed, k-th such run of that seed)
        out, count = {}, defaultdict(int)
        for r in records:
            if r["regime"] == regime and r["members"] == members and (model is None or r["model"] == model):
                out[(r["seed"], count[r["seed"]])] = r["auc"]
                count[r["seed"]] += 1
        return out

    lines = []
    for arch in s.archs:
        copies = [arch] * s.copies
        for a, b, what in (("mutual-finetune", "independent+1epoch", "mutual fine-tune − one more epoch alone"),
                           ("mutual-scratch", "independent", "mutual from scratch − independent")):
            x, y = auc_of(a, copies, arch), auc_of(b, copies if b != "independent" else [arch], arch)
            d = np.array([x[k] - y[k] for k in x if k in y])
            if len(d):
                lines.append(f"- {arch}: {what}: ΔAUC {d.mean():+.5f} (sd {d.std(ddof=1) if len(d) > 1 else 0:.5f}), "
                             f"positive in {(d > 0).sum()}/{len(d)} paired runs")
    names = s.collab_members
    ens = {reg: auc_of(reg, names, "ensemble")
           for reg in ("ensemble-collaborative", "ensemble-fitted", "ensemble-mean", "ensemble-ne(tau=1)")}
    best = auc_of("best-single-member", names, None)
    for reg, other, label in (("ensemble-collaborative", best, "best single member"),
                              ("ensemble-collaborative", ens["ensemble-fitted"], "fitted fusion"),
                              ("ensemble-collaborative", ens["ensemble-mean"], "mean fusion"),
                              ("ensemble-fitted", best, "best single member"),
                              ("ensemble-ne(tau=1)", ens["ensemble-mean"], "mean fusion")):
        d = np.array([ens[reg][k] - other[k] for k in ens[reg] if k in other])
        if len(d):
            lines.append(f"- {reg} − {label}: ΔAUC {d.mean():+.5f}, positive in {(d > 0).sum()}/{len(d)} seeds")
    return lines


def per_seed(records: list[dict], regime: str, members: list[str], model: str) -> dict[int, tuple[float, float]]:
    return {r["seed"]: (r["auc"], r["logloss"]) for r in records
            if r["regime"] == regime and r["members"] == members and r["model"] == model}


def collab_section(records: list[dict], s: Setting, seeds: list[int], details: dict) -> list[str]:
    """The collaborative ensemble against the same architectures trained independently + fused (issue 13's bar):
    mean ± std and every seed, paired differences against the fitted fusion, the fitted rules and the epochs."""
    names = s.collab_members
    fitted = per_seed(records, "ensemble-fitted", names, "ensemble")
    lines = [f"## Collaborative ensemble vs independent training + fitted fusion ({' + '.join(names)})", "",
             "Test split. AUC and logloss: mean ± sample std over seeds; Δ vs fitted: the paired (same seed) difference "
             "against the fitted fusion of the independently trained members, mean over seeds, with the count of seeds "
             "where the row is at least as good (AUC ≥, logloss ≤). Per seed: AUC / logloss.", "",
             "| | AUC | logloss | Δ AUC vs fitted | Δ logloss vs fitted | "
             + " | ".join(f"seed {x}" for x in seeds) + " |",
             "|---|---|---|---|---|" + "---|" * len(seeds)]
    for lab, reg, members, model in collab_items(s):
        ps = per_seed(records, reg, members, model)
        if not ps:
            continue
        auc, ll = np.array([v[0] for v in ps.values()]), np.array([v[1] for v in ps.values()])
        common = [k for k in ps if k in fitted]
        if reg == "ensemble-fitted" or not common:
            d_auc = d_ll = "–"
        else:
            da = np.array([ps[k][0] - fitted[k][0] for k in common])
            dl = np.array([ps[k][1] - fitted[k][1] for k in common])
            d_auc = f"{da.mean():+.4f} ({(da >= 0).sum()}/{len(da)})"
            d_ll = f"{dl.mean():+.4f} ({(dl <= 0).sum()}/{len(dl)})"
        cells = [f"{ps[x][0]:.4f} / {ps[x][1]:.4f}" if x in ps else "–" for x in seeds]
        bold = "**" if lab in ("independent + fitted fusion", "collaborative (fused)") else ""
        lines.append(f"| {bold}{lab}{bold} | {auc.mean():.4f} ± {_sd(auc):.4f} | {ll.mean():.4f} ± {_sd(ll):.4f} | {d_auc} "
                     f"| {d_ll} | " + " | ".join(cells) + " |")
    if s.collab_variants:
        lines += ["", "Variants (one setting changed against the default collaborative run):", ""]
        lines += [f"- `{v}`: {COLLAB_VARIANTS[v][1]}" for v in s.collab_variants]
    if details.get("fitted"):
        lines += ["", "Fitted rule per seed (chosen on validation logloss): " + "; ".join(
            f"seed {f['seed']}: {f['chosen']} (τ {f['rule']['tau']:.3g}, priors "
            f"{', '.join(f'{a:.3g}' for a in f['rule']['priors'])}, {f['rule']['space']} space)" for f in details["fitted"])]
    if details.get("independent_epochs"):
        lines += ["", "Independent members, best epoch / epochs run (per seed): " + "; ".join(
            f"{a}: " + ", ".join(f"{e['best_epoch']}/{e['epochs']}" for e in details["independent_epochs"] if e["arch"] == a)
            for a in names)]
    if details.get("collab_epochs"):
        lines += ["", "Collaborative runs, best epoch / epochs run (per seed): " + "; ".join(
            f"{reg.replace('ensemble-collaborative', 'collaborative')}: "
            + ", ".join(f"{e['best_epoch']}/{e['epochs']}" for e in details["collab_epochs"] if e["regime"] == reg)
            for reg in dict.fromkeys(e["regime"] for e in details["collab_epochs"]))]
    return lines




def markdown(rows: list[dict], dataset: str, seeds: list[int], details: dict, pngs, paired: list[str],
             collab_lines: list[str], command: str) -> str:
    info, seconds, served = details["data"], details["seconds_total"], details["served"]
    lines = [f"# Training together: {dataset}", "",
             f"Commit {details.get('commit', 'unknown')}, {details.get('date', 'date unknown')}: `{command}`", "",
             f"Seeds {seeds}; data {json.dumps(info)}; {seconds / 60:.1f} min on {platform.machine()} "
             f"({os.cpu_count()} CPUs, torch threads {details.get('threads', torch.get_num_threads())}); training until "
             f"early stopping (at most {details['setting']['epochs']} epochs, patience {details['setting']['patience']}, "
             f"lr × 0.1 on a plateau).", "", *collab_lines, "", "## Every regime", "",
             "| regime | members | model | AUC mean ± std | logloss mean ± std | RelaImp |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['relaimp'] * 100:+.3f} %" if r["relaimp"] is not None else "–"
        lines.append(f"| {r['regime']} | {','.join(r['members'])} | {r['model']} | {r['auc_mean']:.4f} ± {r['auc_std']:.4f} "
                     f"| {r['logloss_mean']:.4f} ± {r.get('logloss_std', 0.0):.4f} | {rel} |")
    if served:
        worst = {k: max(s[k] for s in served) for k in served[0] if k != "seed"}
        lines += ["", "Served through the real tritonserver (HTTP); worst max |Δ| over seeds: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())]
    lines += ["", "Paired differences (test AUC):", "", *paired] if paired else []
    lines += ["", *[f"![{p.stem}]({p.name})" for p in pngs]]
    return "\n".join(lines) + "\n"


def read_runs(out: Path) -> tuple[list[dict], dict]:
    details = json.loads((out / "details.json").read_text())
    with open(out / "runs.csv") as f:
        records = [{"seed": int(r["seed"]), "regime": r["regime"], "members": r["members"].split(","), "model": r["model"],
                    "auc": float(r["auc"]), "logloss": float(r["logloss"]),
                    "base_auc": float(r["base_auc"]) if r["base_auc"] else None} for r in csv.DictReader(f)]
    return records, details


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        records, details = read_runs(out)
        s, dataset = Setting(**details["setting"]), details["dataset"]
        seeds = sorted({r["seed"] for r in records})
    else:
        s, dataset = setting_from(args), args.dataset
        seeds = [int(x) for x in args.seeds.split(",")]
        stamp = common.stamp()
        t0 = time.perf_counter()
        spec, train, val, test, info = load_data(args, s, out)
        exp = Experiment(s, spec, train, val, test, serve=not args.no_serve, workdir=out / "work")
        timings = {}
        with tqdm(total=exp.n_steps() * len(seeds), desc="experiments", unit="run", disable=False, file=sys.stdout) as bar:
            for seed in seeds:
                t = time.perf_counter()
                exp.run_seed(seed, bar)
                timings[seed] = time.perf_counter() - t
                tqdm.write(f"seed {seed} done in {timings[seed]:.0f}s")
        records = exp.records
        with open(out / "runs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows({**r, "members": ",".join(r["members"])} for r in records)
        details = {"dataset": dataset, "setting": asdict(s), "data": info, "seconds_total": time.perf_counter() - t0,
                   "seconds_per_seed": timings, "served": exp.details["served"], "full": args.full, "threads": args.threads,
                   **{k: exp.details.get(k, []) for k in ("fitted", "independent_epochs", "collab_epochs")},
                   "command": " ".join(["benchmarks/experiments.py", *sys.argv[1:]]), **stamp}
        (out / "details.json").write_text(json.dumps(details, indent=2))
    rows = aggregate(records)
    (out / "results.json").write_text(json.dumps({"dataset": dataset, "seeds": seeds, "commit": details.get("commit"),
                                                  "date": details.get("date"), "rows": rows}, indent=2))
    pngs = plots(rows, s, out, f"{dataset}, {len(seeds)} seeds", details)
    seconds = details["seconds_total"]
    (out / "results.md").write_text(markdown(rows, dataset, seeds, details, pngs, paired_checks(records, s),
                                             collab_section(records, s, seeds, details),
                                             details.get("command", "benchmarks/experiments.py")))
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, runs.csv, details.json, {', '.join(p.name for p in pngs)} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CtrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Training throughput and quality at scale: `make bench-train`.

A. Every registry member (default config) trained from the prepared shards of `make bench-data`
   (5 M synthetic Criteo-layout rows: 26 categorical + 13 numeric fields) through the real loader
   (block shuffle from memmaps), the real optimiser set-up and step: dense Adam vs sparse Adam, batch 4096. samples/s (wall), samples per CPU-second, peak RSS of the process.
B. DCNv2 at the issue's reference shape (26 fields × 100 k ids × emb 16, cross ×3 + MLP 400³) at batch
   4096 and 16384: the plain-PyTorch baseline (``baseline_dcnv2.py``: dense Adam, random data in memory),
   this package's DCNv2 on the same shape and in-memory data (dense Adam, sparse Adam), and the same
   model config end to end from the prepared shards.
C. Quality: DeepFM val AUC after training on a smaller synthetic set (prepared shards) with dense Adam,
   sparse Adam and sparse Adagrad (both with the lazy coupled L2 of ``step.Optimizers``), same batch
   size and epochs, several seeds.

D. FuxiCTR on the same data: the quality set exported to Parquet (``bench_quality.export_parquet``),
   FuxiCTR 2.3's DeepFM and DCNv2 through ``bench_quality``'s runner (its own venv ``.venv-fuxictr``,
   ``make bench-quality`` builds it) and ours on the same files, same batch, epochs, lr and weight decay;
   samples/s = rows × epochs / (training + per-epoch validation time) for both, as the runner measures it.

Each measurement runs in its own process (peak memory per configuration). GPU rows are measured only
when torch sees a GPU. Writes ``<out>/train.csv``, ``train_quality.csv``, ``train_fuxictr.csv``,
``train.md`` and ``train.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, md_table, stamp  # noqa: E402

MEMBERS = ("deepfm", "dcnv2", "dcn", "pnn", "fibinet", "dhen", "emofm", "interformer")
REF = {"cross_layers": 3, "hidden": [400, 400, 400], "embedding_dim": 16}  # the DCNv2 shape
SPARSE = {"optimizer": "sparse_adam"}  # emb lr 5 × lr; the embedding regularizer on the batch's rows (auto)
# The members' embedding regularizer (default λ 0.01) over every table row each step vs the batch's rows only.
REG_VARIANTS = (("dense Adam, no regularizer", {"optimizer": "adam"}, {"embedding_regularizer": 0.0}),
                ("dense Adam, emb. reg. all rows", {"optimizer": "adam", "embedding_reg_rows": "all"}, {}),
                ("dense Adam, emb. reg. batch rows", {"optimizer": "adam", "embedding_reg_rows": "batch"}, {}),
                ("sparse Adam, no regularizer", SPARSE, {"embedding_regularizer": 0.0}),
                ("sparse Adam, emb. reg. batch rows", SPARSE, {}))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("artifacts/bench/data"))
    p.add_argument("--out", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0, help="timed training per configuration")
    p.add_argument("--members", default=",".join(MEMBERS))
    p.add_argument("--quality-rows", type=int, default=250_000)
    p.add_argument("--quality-epochs", type=int, default=2)
    p.add_argument("--quality-batch", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of sections to skip: members, reference, regularizer, "
                                              "quality, fuxictr")
    p.add_argument("--fuxictr-python", type=Path, default=Path(".venv-fuxictr/bin/python"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------- child side
def _time_steps(step, batch: int, seconds: float, max_steps: int = 60, sync=lambda: None) -> dict:
    for _ in range(3):
        step()
    sync()
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while n < max_steps and time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"steps": n, "samples_per_s": n * batch / wall, "samples_per_cpu_s": n * batch / cpu}


def child(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    if job["kind"] == "baseline":
        from baseline_dcnv2 import run

        out = run(job["batch"], job["seconds"], device=job.get("device", "cpu"))
    elif job["kind"] == "quality":
        out = quality_run(job)
    elif job["kind"] == "parquet":
        out = parquet_run(job)
    else:
        out = member_run(job, torch)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _reference_spec(ids: int = 100_000, fields: int = 26):
    from ctr_ensemble.data.spec import CategoricalField, FeatureSpec

    return FeatureSpec(categorical=[CategoricalField(f"C{i + 1}", [str(k) for k in range(ids - 1)]) for i in range(fields)],
                       numeric=[])


def member_run(job: dict, torch) -> dict:
    import numpy as np

    from ctr_ensemble import models
    from ctr_ensemble.data.encode import Arrays
    from ctr_ensemble.data.prepared.shards import Prepared
    from ctr_ensemble.training import loader
    from ctr_ensemble.training.regularize import Regularizer
    from ctr_ensemble.training.config import TrainConfig
    from ctr_ensemble.training.step import Logits, Optimizers

    if job["data"] == "memory":  # the reference shape, random rows already in memory
        spec = _reference_spec()
        rng = np.random.default_rng(0)
        n = job["batch"] * 8
        data = Arrays(rng.integers(1, 100_000, (n, 26)), np.zeros((n, 0), np.float32),
                      rng.integers(0, 2, n).astype(np.float32))
        shuffle = "full"
    else:
        data = Prepared(job["data"])
        spec = data.spec
        shuffle = "block"
    # device "cuda": batches pinned and copied ahead by the loader's thread (``prefetch``), as ``train`` does there
    dev = torch.device(job.get("device", "cpu"))
    model = models.build(job["arch"], models.make_config(job["arch"], job.get("config")), spec).to(dev)
    cfg = TrainConfig(batch_size=job["batch"], **job["train"])
    opts = Optimizers(model, cfg)
    reg = Regularizer(model, cfg.embedding_reg_rows, cfg.optimizer != "adam")  # the members' penalty, as trainers add it
    step_module = torch.compile(Logits(model)) if cfg.compile else Logits(model)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    batches = loader.Batches(data, spec.input_names, loader.LoaderConfig(
        batch_size=job["batch"], shuffle=shuffle, prefetch=job.get("prefetch", 0)), device=dev)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    state = {"it": batches.epoch(1), "epoch": 1}

    def step() -> None:
        try:
            x, y = next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = batches.epoch(state["epoch"])
            x, y = next(state["it"])
        with amp:
            logit = step_module(**x)
        loss = loss_fn(logit[:, 0].float(), y)
        pen = reg.penalty()
        if pen is not None:
            loss = loss + pen
        opts.zero_grad()
        loss.backward()
        opts.step()

    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    out = _time_steps(step, job["batch"], job["seconds"], job.get("max_steps", 60), sync)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def quality_run(job: dict) -> dict:
    from ctr_ensemble import models
    from ctr_ensemble.data.prepared.shards import Prepared
    from ctr_ensemble.training.config import TrainConfig
    from ctr_ensemble.training.member import train_member

    tr, va = Prepared(job["train_dir"]), Prepared(job["val_dir"])
    cfg = TrainConfig(epochs=job["epochs"], batch_size=job["batch"], seed=job["seed"], patience=job["epochs"],
                      **job["train"])
    ck = train_member(job["arch"], job["arch"], models.make_config(job["arch"]), tr.spec, tr, va, cfg)
    h = ck.metrics["history"]
    return {"val_auc": ck.metrics["val_auc"], "best_epoch": ck.metrics["best_epoch"],
            "val_auc_per_epoch": [r["val_auc"] for r in h],
            "samples_per_s": statistics.mean(r["samples_per_s"] for r in h)}


def parquet_run(job: dict) -> dict:
    """Ours on the FuxiCTR comparison's Parquet files, timed as the FuxiCTR runner times its fit."""
    from ctr_ensemble import models
    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.data.fit import fit
    from ctr_ensemble.training.config import TrainConfig
    from ctr_ensemble.training.member import train_member

    d = Path(job["dir"])
    spec = fit(d / "train.parquet", min_count=job["min_count"])
    tr, va = encode_file(d / "train.parquet", spec), encode_file(d / "val.parquet", spec)
    cfg = TrainConfig(epochs=job["epochs"], batch_size=job["batch"], seed=job["seed"], patience=job["epochs"],
                      **job["train"])
    ck = train_member(job["arch"], job["arch"], models.make_config(job["arch"]), spec, tr, va, cfg)
    h = ck.metrics["history"]
    return {"val_auc": ck.metrics["val_auc"], "samples_per_s": len(tr) * len(h) / sum(r["seconds"] for r in h)}


# ---------------------------------------------------------------------------------------------- parent side
def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_bench_data(args) -> tuple[Path, Path]:
    d = args.data / "prepared"
    if not (d / "train" / "manifest.json").is_file():
        sys.exit(f"{d}/train: no prepared data; run `make bench-data` first")
    return d / "train", d / "val"


def ensure_quality_data(args, val_rows: int = 50_000, workers: int = 1) -> tuple[Path, Path]:
    from ctr_ensemble.data.prepared.prepare import PrepareOptions, prepare
    from ctr_ensemble.data.synth import SynthConfig, generate

    d = args.data / (f"quality_{args.quality_rows}" + (f"_{val_rows}" if val_rows != 50_000 else ""))
    if not (d / "prepared" / "val" / "manifest.json").is_file():
        generate(d / "raw", SynthConfig(seed=11, splits={"train": args.quality_rows, "val": val_rows}))
        opts = PrepareOptions(min_count=2, workers=workers)
        prepare([d / "raw" / "train.tsv"], d / "prepared" / "train", opts)
        prepare([d / "raw" / "val.tsv"], d / "prepared" / "val", opts, spec=d / "prepared" / "train" / "feature_spec.json")
    return d / "prepared" / "train", d / "prepared" / "val"


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    load0 = load_average()
    rows: list[dict] = []
    common = {"threads": args.threads, "seconds": args.seconds}
    if "members" not in skip:
        train_dir, _ = ensure_bench_data(args)
        for arch in args.members.split(","):
            for label, train in (("dense Adam", {"optimizer": "adam"}), ("sparse Adam", SPARSE)):
                r = run_child({**common, "kind": "member", "arch": arch, "data": str(train_dir), "batch": 4096,
                               "train": train})
                rows.append({"section": "A: members from prepared shards", "model": arch, "optimizer": label,
                             "batch": 4096, **r})
                print(rows[-1])
        # The two options that need hardware to pay off: bf16 autocast (bf16 units) and torch.compile.
        for label, train in (("dense Adam + torch.compile", {"optimizer": "adam", "compile": True}),
                             ("sparse Adam + bf16 autocast", {**SPARSE, "amp": "bf16"})):
            r = run_child({**common, "kind": "member", "arch": "dcnv2", "data": str(train_dir), "batch": 4096,
                           "train": train})
            rows.append({"section": "A: members from prepared shards", "model": "dcnv2", "optimizer": label,
                         "batch": 4096, **r})
            print(rows[-1])
    if "reference" not in skip:
        train_dir, _ = ensure_bench_data(args)
        for batch in (4096, 16384):
            r = run_child({**common, "kind": "baseline", "batch": batch})
            rows.append({"section": "B: DCNv2 reference shape", "model": "plain PyTorch DCNv2 (baseline)",
                         "optimizer": "dense Adam", "batch": batch, "data": "random, in memory", **r})
            print(rows[-1])
            for label, train in (("dense Adam", {"optimizer": "adam"}), ("sparse Adam", SPARSE)):
                r = run_child({**common, "kind": "member", "arch": "dcnv2", "config": REF, "data": "memory",
                               "batch": batch, "train": train})
                rows.append({"section": "B: DCNv2 reference shape", "model": "ctr-ensemble dcnv2", "optimizer": label,
                             "batch": batch, "data": "random, in memory", **r})
                print(rows[-1])
            r = run_child({**common, "kind": "member", "arch": "dcnv2", "config": REF, "data": str(train_dir),
                           "batch": batch, "train": SPARSE})
            rows.append({"section": "B: DCNv2 reference shape", "model": "ctr-ensemble dcnv2",
                         "optimizer": "sparse Adam", "batch": batch, "data": "prepared shards (5 M rows)", **r})
            print(rows[-1])
    if "regularizer" not in skip:  # in memory: needs no bench-data
        for label, train, config in REG_VARIANTS:
            r = run_child({**common, "kind": "member", "arch": "dcnv2", "config": {**REF, **config}, "data": "memory",
                           "batch": 4096, "train": train})
            rows.append({"section": "R: embedding regularizer cost, DCNv2 reference shape", "model": "ctr-ensemble dcnv2",
                         "optimizer": label, "batch": 4096, "data": "random, in memory", **r})
            print(rows[-1])
    quality: list[dict] = []
    if "quality" not in skip:
        qtr, qva = ensure_quality_data(args)
        variants = (("dense Adam (emb. reg. all rows)", {"optimizer": "adam", "embedding_reg_rows": "all"}),
                    ("dense Adam (emb. reg. batch rows)", {"optimizer": "adam", "embedding_reg_rows": "batch"}),
                    ("sparse Adam (emb lr 5x, emb. reg. batch rows)", SPARSE),
                    ("sparse Adagrad (emb lr 0.05, emb. reg. batch rows)", {"optimizer": "sparse_adagrad", "emb_lr": 0.05}))
        for label, train in variants:
            for seed in range(args.seeds):
                r = run_child({"kind": "quality", "threads": args.threads, "arch": "deepfm", "train_dir": str(qtr),
                               "val_dir": str(qva), "epochs": args.quality_epochs, "batch": args.quality_batch,
                               "seed": seed, "train": train})
                quality.append({"optimizer": label, "seed": seed, **r})
                print(quality[-1])
    fuxi: list[dict] = []
    if "fuxictr" not in skip:
        fuxi = fuxictr_section(args)
    report(args, rows, quality, fuxi, machine(), load0, load_average(), torch.cuda.is_available())


def fuxictr_section(args) -> list[dict]:
    """FuxiCTR's and our DeepFM/DCNv2 on the same Parquet files (see the module doc, D)."""
    import bench_quality as bq

    base = args.data / f"quality_{args.quality_rows}"
    ensure_quality_data(args)
    pq_dir = base / "parquet"
    rows, fields = {}, {}
    for split, src in (("train", "train"), ("val", "val"), ("test", "val")):  # the runner wants a test split
        rows[split], fields = bq.export_parquet(base / "raw" / f"{src}.tsv", pq_dir / f"{split}.parquet")
    prep = bq.Prepared("synth", pq_dir, rows, fields, "bench-train quality set")
    epochs, batch = args.quality_epochs, args.quality_batch
    cfg = bq.BenchConfig(epochs=epochs, batch_size=batch, patience=epochs, threads=args.threads,
                         min_count={"synth": 2}, fuxictr_python=args.fuxictr_python, out=args.out / "train_fuxictr")
    worker = bq.FuxiCTRWorker(prep, cfg, seq_max_len=0)
    worker.start()
    out = []
    try:
        for arch in ("deepfm", "dcnv2"):
            r = worker.run(arch, 0)
            out.append({"framework": f"FuxiCTR {_fuxictr_version(args)}", "model": arch, "optimizer": "Adam + L2",
                        **{k: r.get(k) for k in ("val_auc", "samples_per_s")}, "error": r.get("error") or ""})
            print(out[-1])
            for label, train in (("dense Adam", {"optimizer": "adam"}), ("sparse Adam", SPARSE)):
                r = run_child({"kind": "parquet", "threads": args.threads, "arch": arch, "dir": str(pq_dir),
                               "min_count": 2, "epochs": epochs, "batch": batch, "seed": 0, "train": train})
                out.append({"framework": "ctr-ensemble", "model": arch, "optimizer": label, **r})
                print(out[-1])
    finally:
        worker.close()
    return out


def _fuxictr_version(args) -> str:
    req = Path("benchmarks/requirements-fuxictr.txt")
    pins = [ln for ln in req.read_text().splitlines() if ln.startswith("fuxictr==")] if req.is_file() else []
    return pins[0].split("==")[1] if pins else "?"


def report(args, rows, quality, fuxi, mach, load0, load1, cuda: bool) -> None:
    cols = ["section", "model", "optimizer", "batch", "data", "samples_per_s", "samples_per_cpu_s", "peak_rss_mb",
            "params", "steps", "error"]
    with open(args.out / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    qcols = ["optimizer", "seed", "val_auc", "best_epoch", "val_auc_per_epoch", "samples_per_s", "error"]
    with open(args.out / "train_quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=qcols, extrasaction="ignore")
        w.writeheader()
        w.writerows(quality)
    fcols = ["framework", "model", "optimizer", "val_auc", "samples_per_s", "error"]
    with open(args.out / "train_fuxictr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fcols, extrasaction="ignore")
        w.writeheader()
        w.writerows(fuxi)
    summary = []
    for label in dict.fromkeys(q["optimizer"] for q in quality):
        aucs = [q["val_auc"] for q in quality if q["optimizer"] == label and "val_auc" in q]
        if aucs:
            summary.append({"optimizer": label, "seeds": len(aucs), "mean val AUC": statistics.mean(aucs),
                            "std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                            "min": min(aucs), "max": max(aucs)})
    gpu = ("GPU rows: not measured. No GPU was lent to this task (torch.cuda.is_available() is False here); "
           "the CUDA path (pinned memory, prefetch thread, non_blocking copies) is exercised only by a test that "
           "skips without CUDA." if not cuda else "GPU present: see rows with device cuda.")
    st = stamp()
    md = ["# bench-train", "", f"- commit {st['commit']}, {st['date']}; "
          f"command: `{' '.join(['python', *sys.argv])}`", f"- machine: {mach}", f"- torch threads: {args.threads}; load average "
          f"{load0} at start, {load1} at the end (the 2 cores are shared with other jobs: samples per CPU-second "
          "is the steadier figure)", f"- timed window: {args.seconds:g}s per row after 3 warm-up steps; each row in "
          "its own process (peak RSS = that process, memmapped shard pages included)", f"- {gpu}",
          "", "## Throughput", "",
          md_table([{k: r.get(k, "") for k in cols} for r in rows], cols[:-2] + ["error"]), ""]
    if summary:
        md += ["## Quality: DeepFM val AUC by optimiser (same data, batch, epochs; best epoch)", "",
               f"{args.quality_rows:,} train / 50,000 val synthetic rows (prepared shards), batch "
               f"{args.quality_batch}, {args.quality_epochs} epochs, seeds 0..{args.seeds - 1}.", "",
               md_table(summary, ["optimizer", "seeds", "mean val AUC", "std", "min", "max"]), ""]
    if fuxi:
        md += ["## FuxiCTR on the same data (CPU)", "",
               f"{args.quality_rows:,} train / 50,000 val rows as Parquet, batch {args.quality_batch}, "
               f"{args.quality_epochs} epochs, lr 2e-3, L2 1e-4, seed 0, default member configs; samples/s = rows × "
               "epochs / (training + per-epoch validation), in both.", "",
               md_table(fuxi, fcols), ""]
    (args.out / "train.md").write_text("\n".join(md))
    plot(args, rows)
    print("\n".join(md))


def plot(args, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "samples_per_s" in r]
    if not ok:
        return
    labels = [f"{r['model']} | {r['optimizer']} | b{r['batch']}" for r in ok]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(ok) + 1.2))
    y = range(len(ok))
    ax.barh([i + 0.2 for i in y], [r["samples_per_cpu_s"] for r in ok], height=0.4, label="samples per CPU-second")
    ax.barh([i - 0.2 for i in y], [r["samples_per_s"] for r in ok], height=0.4, label="samples/s (wall)")
    ax.set_yticks(list(y), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.legend(fontsize=7)
    ax.set_title("training throughput (CPU)")
    fig.tight_layout()
    fig.savefig(args.out / "train.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

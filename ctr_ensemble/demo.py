"""``make demo``: the whole pipeline on the embedded synthetic default.

generate data → fit the feature encoding → train the members → fit the fusion rule on the
validation split → export to ONNX → assemble the Triton repository → start the real Triton
server → score the test split through PyTorch, ONNX Runtime, Triton HTTP and Triton gRPC →
summary → stop the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from ctr_ensemble import models
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit as fit_spec
from ctr_ensemble.data.synth import SynthConfig, generate
from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate, render_table
from ctr_ensemble.export import fusion_fit
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member, unique_names

ENSEMBLE_SLACK = 0.0005
ORACLE_GAP = 0.02


def checks(summary: dict) -> list[tuple[str, bool, str]]:
    """The demo's expectations, each as (name, passed, detail)."""
    out = []
    diffs = [(f"{m}/{b}", r["max_abs_diff"]) for m, rows in summary["members"].items() for b, r in rows.items()]
    diffs += [(f"ensemble/{b}", r["max_abs_diff"]) for b, r in summary["ensemble"].items()]
    worst = max(diffs, key=lambda kv: kv[1])
    out.append(("parity", worst[1] <= PARITY_TOL, f"worst max_abs_diff {worst[1]:.2e} ({worst[0]}) <= {PARITY_TOL:g}"))
    best_member = max(r["auc"] for rows in summary["members"].values() for r in rows.values())
    ens = min(r["auc"] for r in summary["ensemble"].values())
    out.append(("ensemble", ens >= best_member - ENSEMBLE_SLACK,
                f"ensemble AUC {ens:.4f} >= best member {best_member:.4f} - {ENSEMBLE_SLACK}"))
    served = [r["auc"] for rows in [*summary["members"].values(), summary["ensemble"]]
              for b, r in rows.items() if b.startswith("triton")]
    if summary.get("oracle_auc") is not None and served:
        gap = summary["oracle_auc"] - max(served)
        out.append(("oracle", gap <= ORACLE_GAP, f"best served AUC {max(served):.4f} is {gap:.4f} below oracle {summary['oracle_auc']:.4f} (<= {ORACLE_GAP})"))
    return out


def run_demo(members: list[str], out: Path, repository: Path, train_rows: int = 300_000, epochs: int = 8,
             seed: int = 42, seq_max_len: int = 0) -> bool:
    console = Console()
    t_start = time.perf_counter()
    for arch in members:
        models.entry(arch)  # fail fast on an unknown name
    torch.manual_seed(seed)
    out = Path(out)
    data_dir = out / "data"
    layout = "Parquet with a behaviour sequence" if seq_max_len else "Criteo TSV layout"
    console.rule(f"1/6 synthetic data ({layout}, true p known)")
    meta = generate(data_dir, SynthConfig(splits={"train": train_rows, "val": train_rows // 8, "test": train_rows // 8},
                                          seq_max_len=seq_max_len))
    console.print(f"oracle AUC on test: {meta['splits']['test']['oracle_auc']:.4f}")
    files = {split: data_dir / m["file"] for split, m in meta["splits"].items()}

    console.rule("2/6 feature encoding (fitted on train only)")
    spec = fit_spec(files["train"], seq_max_len=max(seq_max_len, 1))
    spec.save(out / "feature_spec.json")
    train = encode_file(files["train"], spec)
    val = encode_file(files["val"], spec)

    console.rule(f"3/6 training {', '.join(members)}")
    cks = []
    for arch, name in zip(members, unique_names(members)):
        ck = train_member(name, arch, models.make_config(arch), spec, train, val,
                          TrainConfig(epochs=epochs, seed=seed + len(cks)),
                          history_csv=out / "members" / f"{name}.history.csv")
        path = checkpoint.save(ck, out / "members" / f"{name}.pt")
        cks.append(checkpoint.load(path))
        console.print(f"{name}: best val AUC {ck.metrics['val_auc']:.4f} (epoch {ck.metrics['best_epoch']}) → {path}")

    console.rule("4/6 fusion fitted on the validation split, ONNX export + Triton model repository")
    rule, fit = fusion_fit.fit_for_export(cks, val, encode_file(files["test"], spec),
                                          sources={"val": files["val"], "test": files["test"]})
    console.print(fusion_fit.render(fit["report"]), soft_wrap=True, highlight=False)
    console.print(f"fitted fusion: {rule.describe()}; kept: {fit['chosen']}")
    opt = RepoOptions().with_rule(rule)
    manifest = write_repository(cks, repository, opt, parity_rows=val.feeds(slice(0, 4096)), fusion_fit=fit)
    for n, m in manifest["members"].items():
        console.print(f"{repository}/{n}: ONNX parity max|Δ| {m['parity']['prob_max_abs_diff']:.2e} "
                      f"(OOV/NaN stress rows {m['parity_stress']['prob_max_abs_diff']:.2e})")

    console.rule("5/6 Triton server (local tritonserver from nvidia-pytriton)")
    with TritonServer(repository) as server:
        console.print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}")
        console.rule("6/6 scoring the test split: torch, onnx, triton_http, triton_grpc")
        summary = evaluate(files["test"], repository, ["torch", "onnx", "triton_http", "triton_grpc"],
                           EvalTargets(server.http_url, server.grpc_url), truth=data_dir / "test.p.npy")
    summary["fusion_fit"] = {k: fit[k] for k in ("chosen", "rule", "report")}
    summary["checks"] = [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks(summary)]
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(render_table(summary))
    for c in summary["checks"]:
        console.print(f"[{'green' if c['passed'] else 'red'}]{'PASS' if c['passed'] else 'FAIL'}[/] {c['name']}: {c['detail']}")
    console.print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f}s)")
    return all(c["passed"] for c in summary["checks"])

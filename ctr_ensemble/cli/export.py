"""``ctr-ensemble export``, ``check-repo``, ``check-export``: members to ONNX and a Triton repository, and the checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.cli.app import app, parse_sets
from ctr_ensemble.cli.options import format_option
from ctr_ensemble.errors import CtrError


@app.command("export")
def export_cmd(
    checkpoint_: list[Path] = typer.Option([], "--checkpoint", help="Member checkpoint (.pt); repeat for each member."),
    collab: Optional[Path] = typer.Option(None, help="A collaborative checkpoint (train-collab) instead of --checkpoint: "
                                                     "serves its members and trained head (fusion mode collaborative)."),
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository to (re)write atomically."),
    from_repository: Optional[Path] = typer.Option(None, help="Instead of checkpoints: copy this exported repository "
                                                   "and rewrite only its configs with the options below (no re-export)."),
    parity_data: Optional[Path] = typer.Option(None, help="Labelled file whose rows are used for the ONNX parity check."),
    parity_rows: int = typer.Option(4096, help="Rows of --parity-data to check."),
    fusion_mode: str = typer.Option("negation_entropy", help="negation_entropy, mean, or fitted (with --from-repository of "
                                    "a --fit-fusion export; collaborative comes with --collab)."),
    tau: float = typer.Option(1.0, help="Temperature of the confidence softmax."),
    fit_fusion: Optional[Path] = typer.Option(None, help="Validation file: fit τ, a prior per member and the averaging space "
                                              "on it (min logloss; never worse than the best member there) and serve "
                                              "that fitted rule (overrides --fusion-mode/--tau)."),
    fusion_space: str = typer.Option("auto", help="With --fit-fusion: prob, logit, or auto (fit both, keep the lower "
                                     "validation logloss)."),
    fusion_report_data: Optional[Path] = typer.Option(None, help="With --fit-fusion: a test file the fit report also scores."),
    fusion_kind: str = typer.Option("auto", help="Fusion instance kind: auto (GPU if torch sees one), cpu, gpu."),
    max_batch_size: int = typer.Option(1024, help="Rows per request (and per dynamic batch); more is refused with "
                                       "400/INVALID_ARGUMENT. Sets the request-size bound in repository.json."),
    instances: int = typer.Option(1, help="Instances per member."),
    intra_op_threads: int = typer.Option(1, help="ONNX Runtime threads per member instance."),
    max_queue_delay_us: int = typer.Option(0, help="Dynamic batching queue delay per member (µs): 0 batches only what "
                                           "queued anyway (docs/serving-speed.md)."),
    preferred_batch_size: list[int] = typer.Option([], help="Preferred batch size of each member's dynamic batcher; "
                                                   "repeat for several (make model-analyzer suggests them)."),
    dynamic_batching: bool = typer.Option(True, help="Dynamic batching on the members."),
    production: bool = typer.Option(False, help="Configs for the NGC container (docker-compose.yml): members on KIND_GPU "
                                    "with the CUDA execution provider, fusion on KIND_GPU. Needs a GPU to load."),
    variants: str = typer.Option("", help="Deployment variants to write beside the ensemble, comma-separated: single_hop "
                                 "(members + fusion in one Python model), all_onnx (members + fusion as one ONNX graph). "
                                 "Served as ctr_single_hop / ctr_all_onnx with the ensemble's inputs and outputs."),
    fmt: str = format_option(),
) -> None:
    """Export members to ONNX (parity-checked) and write the Triton model repository."""
    from dataclasses import replace

    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.export.repository import RepoOptions, manifest_rule, reconfigure_repository, write_repository
    from ctr_ensemble.models import checkpoint

    opt = RepoOptions(max_batch_size=max_batch_size, instances=instances, intra_op_threads=intra_op_threads,
                      dynamic_batching=dynamic_batching, max_queue_delay_us=max_queue_delay_us,
                      preferred_batch_sizes=list(preferred_batch_size), fusion_mode=fusion_mode,
                      tau=tau, fusion_kind=fusion_kind, production=production,
                      variants=[v.strip() for v in variants.split(",") if v.strip()])
    if sum((bool(checkpoint_), from_repository is not None, collab is not None)) != 1:
        raise CtrError("give exactly one of: --checkpoint (one per member), --collab (a collaborative checkpoint) "
                       "or --from-repository")
    if fit_fusion is not None and (from_repository is not None or collab is not None):
        raise CtrError("--fit-fusion fits a rule over member checkpoints (--checkpoint); a collaborative checkpoint brings "
                       "its trained head, and --from-repository --fusion-mode fitted reuses a fitted export's rule")
    if from_repository is not None:
        manifest = reconfigure_repository(from_repository, repository, opt)
        typer.echo(f"{repository}: configs of {from_repository} rewritten ({', '.join(manifest['members'])}; "
                   f"fusion {opt.fusion_mode} on {manifest['fusion']['kind']}{', production' if production else ''})")
        typer.echo(_variants(repository, manifest))
        typer.echo(_bounds(manifest))
        return
    cc = None
    if collab is not None:
        from ctr_ensemble.layers.fusion import COLLABORATIVE
        from ctr_ensemble.models import ensemble

        cc = ensemble.load(collab)
        cks, opt = cc.members, replace(opt, fusion_mode=COLLABORATIVE)
    else:
        cks = [checkpoint.load(p) for p in checkpoint_]
    fit = None
    if fit_fusion is not None:
        from ctr_ensemble.export import fusion_fit

        rule, fit = fusion_fit.fit_files(cks, fit_fusion, fusion_report_data, fusion_space, fmt)
        opt = opt.with_rule(rule)
    rows = None
    if parity_data is not None:
        arr = encode_file(parity_data, cks[0].spec, fmt=fmt)
        rows = arr.feeds(slice(0, parity_rows))
    manifest = write_repository(cks, repository, opt, parity_rows=rows, collab=cc, fusion_fit=fit)
    for n, m in manifest["members"].items():
        par = m.get("parity")
        extra = f", ONNX parity max|Δ| {max(par['prob_max_abs_diff'], m['parity_stress']['prob_max_abs_diff']):.2e}" if par else ""
        typer.echo(f"{repository}/{n}: {m['arch']}{extra}")
    f = manifest["fusion"]
    extra = f", fused parity max|Δ| {f['parity']['prob_max_abs_diff']:.2e}" if "parity" in f else ""
    if fit is not None:
        typer.echo(fusion_fit.render(fit["report"]))
        extra += f"; fitted on {fit_fusion} ({fit['rows']:,} rows), kept: {fit['chosen']}"
    rule_desc = f"{f['mode']} (tau={f['tau']})" if cc is not None else manifest_rule(manifest).describe()
    typer.echo(f"{repository}/ctr_ensemble: fusion {rule_desc} on {f['kind']}{extra}")
    typer.echo(_variants(repository, manifest))
    typer.echo(_bounds(manifest))


def _variants(repository: Path, manifest: dict) -> str:
    parts = [f"{repository}/{e['model']}" + (f" (parity max|Δ| {e['parity']['prob_max_abs_diff']:.2e})" if "parity" in e else "")
             for e in manifest.get("variants", {}).values()]
    return f"variants: {', '.join(parts)}" if parts else "variants: none (--variants single_hop,all_onnx adds them)"


def _bounds(manifest: dict) -> str:
    lim = manifest["limits"]
    seq = f", history exactly {lim['seq_max_len']} items wide" if lim["seq_max_len"] else ""
    return (f"requests: at most {lim['max_batch_size']} rows{seq}; body limit {lim['max_request_bytes']:,} bytes "
            f"(TRITON_MAX_REQUEST_BYTES and the gateway, docs/serving.md \"Request bounds\")")


@app.command("check-repo")
def check_repo_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository to validate."),
) -> None:
    """Validate a model repository without starting Triton: configs, ONNX files (checksum, checker,
    inputs/outputs vs config), Python models, ensemble wiring, feature specs. Exit 2 on any problem."""
    from ctr_ensemble.export import validate

    validate.check(repository)
    typer.echo(f"{repository}: OK ({len(list(Path(repository).glob('*/config.pbtxt')))} models)")


@app.command("check-export")
def check_export_cmd(
    model: Optional[str] = typer.Option(None, help="Architecture: build from its default config, train a few steps on generated data."),
    checkpoint_: Optional[Path] = typer.Option(None, "--checkpoint", help="Check your own checkpoint instead of --model."),
    data: Optional[Path] = typer.Option(None, help="Rows to compare on (any supported format, detected); default: generated."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE for --model; repeatable."),
    rows: int = typer.Option(4096, help="Rows to compare (each also as an OOV/NaN copy)."),
    steps: int = typer.Option(30, help="Training steps before export (with --model)."),
    seed: int = typer.Option(0, help="Seed of the generated data and of the few training steps."),
    sequence: bool = typer.Option(True, help="With --model: generated data has a behaviour sequence (checks lengths 0, 1, max)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Export a member to ONNX and compare ONNX Runtime with PyTorch; exit 1 if max |Δ| > 1e-5."""
    from ctr_ensemble.evaluation import check_export

    if (model is None) == (checkpoint_ is None):
        raise CtrError("give exactly one of --model NAME or --checkpoint PATH")
    if model is not None:
        from ctr_ensemble import models

        models.entry(model)
    res = check_export.run(model, checkpoint_, data, parse_sets(set_), rows=rows, steps=steps, seed=seed, sequence=sequence)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        for part in res["cases"]:
            r = res[part]
            typer.echo(f"{res['model']} {part:12s} rows={r['rows']:5d}  prob max|Δ|={r['prob_max_abs_diff']:.3e}  "
                       f"repr max|Δ|={r['repr_max_abs_diff']:.3e}")
        verdict = "PASS" if res["passed"] else "FAIL"
        typer.echo(f"{verdict}: max abs diff {res['max_abs_diff']:.3e} (tolerance {res['tolerance']:g})")
    if not res["passed"]:
        raise typer.Exit(1)

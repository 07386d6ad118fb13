"""``ctr-ensemble loadtest`` and ``soak``: Locust load tests that measure latency and the served AUC."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.cli.app import app, split_list
from ctr_ensemble.cli.options import Ports, config_options, format_option


@app.command("loadtest")
@config_options(Ports, dest="ports")
def loadtest_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Model repository (served, or the base of the sweep's variants)."),
    data: Path = typer.Option(Path("artifacts/demo/data/test.tsv"), help="Held-out labelled file whose rows are sent."),
    model: str = typer.Option("ctr_ensemble", help="Model to load-test (without --sweep)."),
    protocol: Optional[str] = typer.Option(None, help="Comma list: grpc, http (default both; with --sweep the sweep's)."),
    users: Optional[str] = typer.Option(None, help="Concurrent users, comma list (default 4; with --sweep the sweep's)."),
    spawn_rate: float = typer.Option(0.0, help="Users started per second (0 = all at once)."),
    duration: Optional[float] = typer.Option(None, help="Seconds per run (default 20; sweep 6)."),
    warmup: Optional[float] = typer.Option(None, help="Seconds dropped from the start of each run (default 3; sweep 1.5)."),
    rows_per_request: Optional[int] = typer.Option(None, help="Rows per request (default 64)."),
    max_rows: Optional[int] = typer.Option(None, help="Held-out rows cycled through (default 8192)."),
    url: Optional[str] = typer.Option(None, help="Host of a running Triton (no server is started); needs --repository for the offline reference."),
    admin_key: Optional[str] = typer.Option(None, envvar="TRITON_ADMIN_KEY", help="Admin key of the running server (perf_analyzer reads the model config)."),
    sweep: bool = typer.Option(False, "--sweep", help="Run the default list of deployment variants (or --sweep-config)."),
    sweep_config: Optional[Path] = typer.Option(None, help="YAML sweep: variants and settings (implies --sweep)."),
    perf_analyzer: bool = typer.Option(True, help="Also measure each run with perf_analyzer."),
    perf_analyzer_bin: Optional[Path] = typer.Option(None, "--perf-analyzer-bin", help="perf_analyzer binary (default: .venv-perf, $PERF_ANALYZER, PATH)."),
    locustfile: Optional[Path] = typer.Option(None, help="Locust file (default loadtest/locustfile.py)."),
    out: Path = typer.Option(Path("artifacts/loadtest"), help="Output folder for latency_vs_auc.{csv,md,png}."),
    prepare_only: Optional[Path] = typer.Option(None, help="Only write rows.npz + config.json for the docker-compose "
                                                "locust services into this folder (URLs triton:8000/8001) and exit."),
    fmt: str = format_option(),
    ports: dict = None,
) -> None:
    """Locust (headless) against Triton: throughput, p50/p95/p99, errors, served vs offline AUC; --sweep over variants."""
    import dataclasses

    from rich.console import Console

    from ctr_ensemble.loadtest import perf, report, sweep as lt

    protocols = split_list(protocol) if protocol else None
    user_list = [int(u) for u in split_list(users)] if users else None
    if prepare_only is not None:
        _prepare_compose(repository, data, model, rows_per_request or 64, max_rows or 8192, prepare_only, fmt)
        return
    if sweep or sweep_config:
        cfg = lt.load_sweep(sweep_config) if sweep_config else lt.default_sweep()
    else:
        cfg = lt.SweepConfig(variants=[lt.Variant(model, model)], users=[4], duration_s=20.0, warmup_s=3.0)
    over = {"protocols": protocols, "users": user_list, "duration_s": duration, "warmup_s": warmup, "spawn_rate": spawn_rate or None,
            "rows_per_request": rows_per_request, "max_rows": max_rows, "perf_analyzer": perf_analyzer or None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if not perf_analyzer:
        cfg.perf_analyzer = False
    target = None
    if url is not None:
        target = lt.Target(url, **ports, repository=repository, admin_key=admin_key)
    console = Console(width=None if sys.stdout.isatty() else 200)
    binary = perf.find_binary(perf_analyzer_bin)
    res = lt.run_sweep(cfg, repository, data, out, target=target, perf_binary=binary,
                       locustfile=locustfile or lt.LOCUSTFILE, fmt=fmt, console=console)
    context = {"repository": str(repository), "data": f"{data} (first {cfg.max_rows} rows)",
               "server": f"{url} (running)" if url else "local tritonserver started per deployment, production flags incl. admin-API restriction",
               "load": f"Locust headless, closed loop, {cfg.rows_per_request} rows/request, {cfg.duration_s:g}s per run, "
                       f"{cfg.warmup_s:g}s warm-up dropped",
               "perf_analyzer": str(binary) if cfg.perf_analyzer and binary else "not run"}
    paths = report.write_report(res.rows, res.server_rows, out, context)
    for p in paths.values():
        typer.echo(f"wrote {p}")
    if res.failed:
        bad = [f"{r['variant']}/{r.get('protocol')}/{r.get('users')}: {r.get('status')} errors={r.get('errors')}"
               for r in res.rows if r["status"] not in ("ok", "skipped") or r.get("errors")]
        typer.echo("load test failed: " + "; ".join(bad), err=True)
        raise typer.Exit(1)


@app.command("soak")
@config_options(Ports, dest="ports")
def soak_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Model repository (served, and the offline reference)."),
    data: Path = typer.Option(Path("artifacts/demo/data/test.tsv"), help="Held-out labelled file whose rows are sent."),
    model: str = typer.Option("ctr_ensemble", help="Model to soak."),
    duration: float = typer.Option(600.0, help="Seconds of load (default 10 minutes)."),
    max_requests: int = typer.Option(2_000_000, help="Bound on requests over all protocols; the run stops when reached."),
    protocol: str = typer.Option("grpc,http", help="Comma list; one concurrent Locust process per protocol."),
    users: int = typer.Option(2, help="Concurrent users per protocol."),
    rows_per_request: int = typer.Option(64, help="Rows in each request."),
    max_rows: int = typer.Option(8192, help="Held-out rows cycled through."),
    window: float = typer.Option(60.0, help="Seconds per window; p99 drift = last window's p99 - first window's."),
    sample: float = typer.Option(5.0, help="Seconds between server RSS samples."),
    rss_warn_mb: float = typer.Option(100.0, help="RSS growth after the first window flagged as a suspected leak."),
    url: Optional[str] = typer.Option(None, help="Host of a running Triton (no server is started)."),
    server_pid: Optional[int] = typer.Option(None, help="With --url on this machine: tritonserver's pid, for the RSS leak check."),
    out: Path = typer.Option(Path("artifacts/soak"), help="Output folder for soak.{json,md,png}, soak_windows.csv, rss.csv."),
    fmt: str = format_option(),
    ports: dict = None,
) -> None:
    """Long Locust load on one model: requests, errors (must be 0), p99 drift first vs last window, server RSS start/end."""
    from rich.console import Console

    from ctr_ensemble.loadtest import soak as sk
    from ctr_ensemble.loadtest import sweep as lt

    cfg = sk.SoakConfig(model=model, duration_s=duration, protocols=split_list(protocol), users=users,
                        rows_per_request=rows_per_request, max_rows=max_rows, max_requests=max_requests, window_s=window,
                        sample_s=sample, rss_warn_mb=rss_warn_mb)
    target = lt.Target(url, **ports, repository=repository) if url is not None else None
    console = Console(width=None if sys.stdout.isatty() else 200)
    s = sk.run_soak(cfg, repository, data, out, target=target, server_pid=server_pid, fmt=fmt, console=console)
    typer.echo((out / "soak.md").read_text())
    typer.echo(f"wrote {out / 'soak.json'}, {out / 'soak.md'}, {out / 'soak.png'}")
    if not s["passed"]:
        typer.echo(f"soak failed: {s['errors']} errors, {s['requests']} requests, server alive: {s['server_alive']}", err=True)
        raise typer.Exit(1)


def _prepare_compose(repository: Path, data: Path, model: str, rows_per_request: int, max_rows: int, dest: Path, fmt: str) -> None:
    """rows.npz + config.json for the locust services of docker-compose.yml (mounted at /loadtest/run)."""
    from ctr_ensemble.loadtest import sweep as lt
    from ctr_ensemble.loadtest.rows import inputs_from_config, load_rows

    inputs = inputs_from_config(repository, model)
    rows = load_rows(data, repository, model, inputs, max_rows, fmt)
    lt.save_rows(rows, dest / "rows.npz")
    lt.write_run_config(dest / "config.json", http_url="triton:8000", grpc_url="triton:8001", model=model,
                        rows_file=f"{lt.COMPOSE_RUN_DIR}/rows.npz", inputs=inputs, rows_per_request=rows_per_request,
                        timeout_s=10.0, max_requests=10_000_000, results_dir=f"{lt.COMPOSE_RUN_DIR}/results")
    typer.echo(f"wrote {dest / 'rows.npz'} ({len(rows['label'])} rows) and {dest / 'config.json'} for docker compose")


@app.command("rollout")
def rollout_cmd(
    repository: Path = typer.Option(..., help="Repository to serve (deploy writes into it: use a copy)."),
    new: Path = typer.Option(..., help="The export to deploy mid-load (`ctr-ensemble export`); same feature spec."),
    data: Path = typer.Option(Path("artifacts/demo/data/test.tsv"), help="Held-out labelled file whose rows are sent."),
    users: int = typer.Option(4, help="Locust users per protocol."),
    hold: float = typer.Option(10.0, help="Seconds of load before the deploy, between deploy and rollback, and after."),
    rollback: bool = typer.Option(True, help="Roll back to the old release after the deploy."),
    rows_per_request: int = typer.Option(16, help="Rows per request."),
    out: Path = typer.Option(Path("artifacts/rollout"), help="Output folder for rollout.{json,md}."),
    fmt: str = format_option(),
) -> None:
    """Deploy (and roll back) a release under Locust load on a local server: errors (must be 0), answers by release
    (each equal to the old or the new release's offline prediction), p99 during the switch, switch times."""
    from ctr_ensemble.errors import CtrError
    from ctr_ensemble.loadtest.rollout import RolloutConfig, run_rollout
    from ctr_ensemble.loadtest.sweep import started

    cfg = RolloutConfig(users=users, hold_s=hold, rollback=rollback, rows_per_request=rows_per_request)
    target = started(repository, out / "tritonserver.log")
    try:
        s = run_rollout(cfg, target, new, data, out, fmt)
    finally:
        target.server.stop()
    typer.echo(f"{s['requests']:,} requests, {s['errors']} errors, p99 {s['p99_ms']:.1f} ms "
               f"({s['p99_switch_ms']:.1f} ms during switches); wrote {out / 'rollout.md'}")
    if not s["passed"]:
        raise CtrError(f"rollout failed: {s['errors']} errors; answered {s['answered']} (see {out / 'rollout.md'})")

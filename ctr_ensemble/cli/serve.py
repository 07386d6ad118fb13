"""``ctr-ensemble serve`` and ``evaluate``: the local Triton server under its supervisor, and offline/served scoring."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.cli.app import app, split_list
from ctr_ensemble.cli.options import Ports, config_options, format_option
from ctr_ensemble.errors import CtrError


@app.command("serve")
@config_options(Ports, dest="ports")
def serve_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (HTTP, gRPC, metrics)."),
    startup_timeout: float = typer.Option(180.0, help="Seconds to wait for readiness."),
    log_verbose: int = typer.Option(0, help="tritonserver --log-verbose level."),
    admin_key: Optional[str] = typer.Option(None, envvar="TRITON_ADMIN_KEY", show_default=False,
                                            help="Key for the admin APIs (header admin-key); default: a random "
                                                 "key nobody knows, i.e. admin APIs closed."),
    open_admin: bool = typer.Option(False, help="Leave the admin APIs unrestricted (not recommended)."),
    supervise: bool = typer.Option(True, help="Restart the server when it dies or a backend stub dies "
                                              "(Triton does not recover a killed stub by itself)."),
    max_restarts: int = typer.Option(5, help="Give up after this many restarts within --restart-window."),
    restart_window: float = typer.Option(600.0, help="Seconds of the sliding window that --max-restarts counts in; "
                                                     "the k-th restart in it first waits 2^(k-1) s (at most 30)."),
    http_guard: bool = typer.Option(True, help="Put the HTTP port behind serving/guard.py, which refuses requests "
                                               "that crash tritonserver 2.51 (a JSON body declaring a huge shape) "
                                               "and bodies over --max-input-size; Triton's HTTP then listens on "
                                               "loopback only."),
    max_input_size: int = typer.Option(64 * 2**20, help="With --http-guard: the largest HTTP request body, bytes."),
    ports: dict = None,
) -> None:
    """Run the local tritonserver (from nvidia-pytriton) until Ctrl-C."""
    from ctr_ensemble.serving.server import TritonServer, default_admin_key

    public_http = ports["http_port"]
    if http_guard:  # Triton's HTTP on a free loopback port; the guard takes the public one
        ports = {**ports, "http_port": 0}
    server = TritonServer(repository, host=host, **ports, http_host="127.0.0.1" if http_guard else None,
                          startup_timeout=startup_timeout, log_verbose=log_verbose,
                          log_path=Path("artifacts/tritonserver.log").resolve(),
                          admin_key=None if open_admin else (admin_key or default_admin_key()))
    Path("artifacts").mkdir(exist_ok=True)
    from ctr_ensemble.serving import liveness
    from ctr_ensemble.serving.supervisor import Supervisor

    # the probe (one row through the ensemble every 10 s) also tells a killed stub from an unloaded model's (deploy)
    sup = Supervisor(server, max_restarts=max_restarts, window_s=restart_window,
                     probe=lambda: liveness.probe(server.http_url), notify=lambda m: typer.echo(m, err=True)
                     ) if supervise else None
    sup.start() if sup else server.start()
    guard = None
    if http_guard:
        from ctr_ensemble.serving.guard import GuardProcess

        try:
            guard = GuardProcess(f"{host}:{public_http}", server.http_url, max_input_size).start()
        except CtrError:
            sup.stop() if sup else server.stop()
            raise
    http_url = guard.url if guard else server.http_url
    typer.echo(f"Triton ready: HTTP {http_url}{' (guarded)' if guard else ''}, gRPC {server.grpc_url}, metrics {server.metrics_url} "
               f"(log {server.log_path}); {'supervised, ' if sup else ''}Ctrl-C to stop")
    stop = {"now": False}

    def _on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    import time

    seen = 0
    while not stop["now"] and (server.is_running() if sup is None else sup.error is None):
        time.sleep(0.5)
        if sup is not None and len(sup.restarts) > seen:
            for r in sup.restarts[seen:]:
                kept = f"; the crashed server's log: {r['log']}" if r["log"] else ""
                typer.echo(f"restarted tritonserver after: {r['reason']} ({r['waited']:.0f}s backoff, "
                           f"{r['seconds']:.1f}s restart){kept}", err=True)
            seen = len(sup.restarts)
        if guard is not None and not guard.is_running():
            typer.echo(f"the HTTP guard exited ({guard.exit_reason()}); starting it again", err=True)
            guard.start()
    if guard is not None:
        guard.stop()
    if sup is not None and sup.error is not None:
        sup.stop()
        raise CtrError(f"tritonserver supervision stopped: {sup.error}")
    if sup is None and not server.is_running():
        raise CtrError(f"tritonserver exited unexpectedly; log:\n{server.log_tail()}")
    code = sup.stop() if sup else server.stop()
    typer.echo(f"tritonserver stopped (exit code {code})")


def _admin_key_option():
    return typer.Option(None, envvar="TRITON_ADMIN_KEY", show_default=False,
                        help="The server's admin key (model load/unload is an admin API); default $TRITON_ADMIN_KEY.")


@app.command("deploy")
def deploy_cmd(
    export: Path = typer.Argument(..., help="Repository written by `ctr-ensemble export`: the release to publish."),
    repository: Path = typer.Option(Path("model_repository"), help="The repository the running server serves."),
    http_url: str = typer.Option("127.0.0.1:8000", help="The running server's HTTP host:port."),
    admin_key: Optional[str] = _admin_key_option(),
    timeout: float = typer.Option(300.0, help="Seconds to wait for each model load."),
) -> None:
    """Publish an export to a running server as its next release: load it beside the current one, then switch the
    ensemble atomically (requests in flight finish on the old release); the old release's files are kept for rollback."""
    from ctr_ensemble.serving.deploy import deploy

    _print_switch(deploy(export, repository, http_url, admin_key, timeout))


@app.command("rollback")
def rollback_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="The repository the running server serves."),
    http_url: str = typer.Option("127.0.0.1:8000", help="The running server's HTTP host:port."),
    admin_key: Optional[str] = _admin_key_option(),
    timeout: float = typer.Option(300.0, help="Seconds to wait for each model load."),
) -> None:
    """Switch a running server back to the release before the current one, the same way `deploy` switches."""
    from ctr_ensemble.serving.deploy import rollback

    _print_switch(rollback(repository, http_url, admin_key, timeout))


def _print_switch(r: dict) -> None:
    typer.echo(f"release {r['from_release']} → {r['release']}: models loaded in {r['load_s']:.2f}s, ensemble switched in "
               f"{r['switch_s']:.2f}s; serving {', '.join(f'{k}={v}' for k, v in r['models'].items())}; "
               f"releases kept: {r['kept']}")


@app.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(..., help="Labelled file to score (any supported format, see --format)."),
    repository: Path = typer.Option(Path("model_repository"), help="Model repository written by `export`."),
    backends: str = typer.Option("torch,onnx,triton_http,triton_grpc", help="Comma list of backends."),
    truth: Optional[Path] = typer.Option(None, help="True click probabilities (.p.npy) for the oracle AUC."),
    checkpoint_: list[str] = typer.Option([], "--checkpoint", help="NAME=PATH to override a member's checkpoint."),
    http_url: Optional[str] = typer.Option(None, help="Triton HTTP host:port (default: the started server)."),
    grpc_url: Optional[str] = typer.Option(None, help="Triton gRPC host:port."),
    start_server: bool = typer.Option(False, help="Start a local server on free ports for the run."),
    batch_size: int = typer.Option(1024, help="Rows per Triton request."),
    out: Optional[Path] = typer.Option(None, help="Write the summary JSON here."),
    skip_bad_rows: bool = typer.Option(False, help="Skip and count malformed rows instead of stopping."),
    fmt: str = format_option(),
) -> None:
    """Score a labelled file through each backend; AUC, logloss, NE, calibration, ECE, rows/s, max |Δ| vs PyTorch."""
    from rich.console import Console

    from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate, render_table
    from ctr_ensemble.serving.server import TritonServer

    ckpts = dict(_kv(c, "--checkpoint") for c in checkpoint_)
    server = None
    try:
        if start_server:
            server = TritonServer(repository).start()
            http_url, grpc_url = http_url or server.http_url, grpc_url or server.grpc_url
        summary = evaluate(data, repository, split_list(backends), EvalTargets(http_url, grpc_url, batch_size),
                           truth=truth, checkpoints=ckpts, skip_bad_rows=skip_bad_rows, fmt=fmt)
    finally:
        if server is not None:
            server.stop()
    Console().print(render_table(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        typer.echo(f"wrote {out}")


def _kv(s: str, flag: str) -> tuple[str, str]:
    if "=" not in s:
        raise CtrError(f"{flag} expects NAME=PATH, got {s!r}")
    k, v = s.split("=", 1)
    return k, v

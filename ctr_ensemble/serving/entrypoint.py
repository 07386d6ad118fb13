"""The production container's command: tritonserver under the supervisor, so a dead stub is recovered there too.

    python3 -m ctr_ensemble.serving.entrypoint [options] [tritonserver args...]

Triton 2.51 does not restart a killed Python-backend stub (the model keeps reporting ready while every
request fails, docs/reliability.md), and ``/v2/health/ready`` does not notice. This command runs tritonserver
with ``server.production_args`` -- the repository at /models, ``SERVER_FLAGS``, the admin-API restriction keyed
by ``$TRITON_ADMIN_KEY`` -- where every flag given on the command line replaces the production one of the same
name and any other is added (Kubernetes passes ``--model-repository=/models`` alone; compose passes the whole
``production_command()``, the restriction keyed by compose's interpolation, so no key is needed in the
environment there), under ``supervisor.Supervisor`` -- the same watch as ``ctr-ensemble serve``: the server process and its stub
processes every ``--interval`` s, plus one row through the ensemble every ``--liveness-interval`` s
(``serving.liveness``; ``--liveness-failures`` in a row count as a failure) -- and restarts the server on a
failure, within a sliding window (``--max-restarts`` within ``--restart-window`` s, exponential backoff from
the second). When the budget is spent, or the server cannot start, it exits 1 so that the container runtime's
restart policy (compose ``restart: unless-stopped``, Kubernetes) takes over. SIGTERM / SIGINT stop the server
gracefully (its ``--exit-timeout-secs`` drain) and exit 0.

The server's output goes to this process's stdout (``docker logs``), its last lines kept for the restart
records; every line this command writes has the admin key (``admin-key=<key>`` in the args,
``$TRITON_ADMIN_KEY``) replaced by ``***``.

``--local`` runs the same supervision with the tritonserver of the nvidia-pytriton wheel and a private backend
directory (``server.make_backend_dir``), so tests/test_entrypoint.py and benchmarks/bench_recovery.py run this
very module without Docker. Everything imported here is the standard library (the NGC image has no
tritonclient, onnx or protobuf for Python).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving import liveness
from ctr_ensemble.serving.server import (ADMIN_KEY_ENV, ENTRYPOINT, ServerProcess, StartCancelled, local_binary, local_env,
                                         make_backend_dir, production_args, MAX_INPUT_FLAG)
from ctr_ensemble.serving.supervisor import Supervisor

PROG = "python3 -m ctr_ensemble.serving.entrypoint"
CONFIRM_TIMEOUT = 2.0  # s: the check that tells a killed stub (restart) from an unloaded model's (none)
TAIL_LINES = 400  # server output kept in memory for the restart records (nothing grows on disk)


def redactor(args: list[str], env: dict[str, str]):
    """A function that replaces every admin key (from ``admin-key=<key>`` in ``args`` and ``$TRITON_ADMIN_KEY``)."""
    keys = {m for a in args for m in re.findall(r"admin-key=([^,\s]+)", a)}
    if env.get(ADMIN_KEY_ENV):
        keys.add(env[ADMIN_KEY_ENV])
    keys = sorted(keys, key=len, reverse=True)

    def redact(text: str) -> str:
        for k in keys:
            text = text.replace(k, "***")
        return text

    return redact


def option(args: list[str], name: str, default: str) -> str:
    """The value of tritonserver option ``name`` in ``args`` (``--name=v`` or ``--name v``; the last one wins)."""
    value = default
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


RESTRICTION = ("--http-restricted-api", "--grpc-restricted-protocol")


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def tritonserver_args(given: list[str], env: dict[str, str]) -> list[str]:
    """``server.production_args`` keyed by ``$TRITON_ADMIN_KEY``, less every flag ``given`` names, then ``given``.
    The key is needed only when ``given`` lacks one of the two restriction flags: the admin APIs are never open."""
    names = {flag_name(a) for a in given if a.startswith("--")}
    need_key = not set(RESTRICTION) <= names
    key = env.get(ADMIN_KEY_ENV, "")
    if need_key and not key:
        raise CtrError(f"set ${ADMIN_KEY_ENV} (or pass both {' and '.join(RESTRICTION)}): the admin APIs are "
                       "never left open")
    defaults = production_args(key, check=need_key, env=env)
    return [*(a for a in defaults if flag_name(a) not in names), *given]


def probe_host(address: str) -> str:
    """Where to reach a server bound to ``address`` from inside its own host/container."""
    return "127.0.0.1" if address in ("0.0.0.0", "", "::") else address


@dataclass
class CommandServer(ServerProcess):
    """A tritonserver command line as a ``ServerProcess``: ``binary`` + ``args``, output tee'd (redacted) to
    ``out`` and kept in memory; ``local`` adds the wheel's backend directory and environment."""

    args: list[str]
    binary: str = "tritonserver"
    local: bool = False
    startup_timeout: float = 300.0
    out: object = field(default=None, repr=False)  # a text stream; None: sys.stdout
    redact: object = field(default=None, repr=False)
    log_path: Path | None = None  # unused: the output is in the container log, its tail in memory
    cancel: threading.Event | None = field(default=None, repr=False)
    host: str = field(default="127.0.0.1", init=False)
    http_port: int = field(default=8000, init=False)
    grpc_port: int = field(default=8001, init=False)
    metrics_port: int = field(default=8002, init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    _tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES), init=False,
                                     repr=False)

    def __post_init__(self) -> None:
        self.redact = self.redact or redactor(self.args, dict(os.environ))
        self.host = probe_host(option(self.args, "--http-address", "0.0.0.0"))
        self.http_port = int(option(self.args, "--http-port", "8000"))
        self.grpc_port = int(option(self.args, "--grpc-port", "8001"))
        self.metrics_port = int(option(self.args, "--metrics-port", "8002"))

    def command(self) -> list[str]:
        """The argv started (``--local``: the wheel's binary and a fresh backend directory)."""
        if not self.local:
            return [self.binary, *self.args]
        self._workdir = Path(tempfile.mkdtemp(prefix="ctr-triton-"))
        backends = make_backend_dir(self._workdir / "backends")
        # The wheel's tritonserver (2.51) predates the request-size flag of the production image: leave it out.
        args = [a for a in self.args if flag_name(a) != MAX_INPUT_FLAG]
        return [str(local_binary()), f"--backend-directory={backends}", *args]

    def start(self) -> CommandServer:
        if not self.local and shutil.which(self.binary) is None:
            raise CtrError(f"{self.binary} is not on PATH (the NGC image has it; --local runs nvidia-pytriton's)")
        argv = self.command()
        self._tail.clear()
        self._launch(argv, local_env() if self.local else dict(os.environ), subprocess.PIPE)
        threading.Thread(target=self._copy_output, args=(self._proc.stdout,), name="tritonserver-output",
                         daemon=True).start()
        self._wait_ready()
        return self

    def _copy_output(self, pipe) -> None:
        out = self.out or sys.stdout
        for raw in iter(pipe.readline, b""):
            line = self.redact(raw.decode(errors="replace").rstrip("\n"))
            self._tail.append(line)
            try:
                out.write(line + "\n")
                out.flush()
            except (OSError, ValueError):  # our stdout closed: keep draining the pipe so the server never blocks
                pass
        pipe.close()

    def log_lines(self) -> list[str]:
        return list(self._tail)


def reap_orphans(keep: set[int]) -> None:
    """As PID 1 of a container, stubs orphaned by a dead tritonserver become our children: reap their zombies
    (only those, by pid, so the Popen of the server keeps its own exit status)."""
    me = os.getpid()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in keep:
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            try:
                os.waitpid(int(p.name), os.WNOHANG)
            except ChildProcessError:
                pass


def local_command(repository: Path, key: str, ports: tuple[int, int, int], *options: str) -> list[str]:
    """This module run with ``--local`` and the production arguments on ``repository``, bound to 127.0.0.1 on
    ``ports`` (HTTP, gRPC, metrics): what tests/test_entrypoint.py and benchmarks/bench_recovery.py start."""
    http, grpc, metrics = ports
    return [sys.executable, "-m", ENTRYPOINT[2], "--local",
            *options, "--", *production_args(key, repository=Path(repository).resolve()),
            "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description="tritonserver under the supervisor (the container's command), with the "
                                            "production flags; every other argument goes to tritonserver (after "
                                            "'--': all of them), replacing the production flag of the same name.")
    p.add_argument("--local", action="store_true", help="the nvidia-pytriton tritonserver and a private backend "
                                                        "directory (tests, benchmarks) instead of `tritonserver` on PATH")
    p.add_argument("--binary", default="tritonserver", help="the tritonserver to run (not with --local)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between process checks (server, stubs)")
    p.add_argument("--liveness-interval", type=float, default=10.0,
                   help="seconds between one-row inferences through --liveness-model (0: off)")
    p.add_argument("--liveness-failures", type=int, default=3, help="failed liveness checks in a row that restart")
    p.add_argument("--liveness-timeout", type=float, default=5.0, help="seconds for one liveness check")
    p.add_argument("--liveness-model", default=liveness.DEFAULT_MODEL)
    p.add_argument("--max-restarts", type=int, default=5, help="give up (exit 1) after this many within --restart-window")
    p.add_argument("--restart-window", type=float, default=600.0,
                   help="sliding window (s) of --max-restarts; the k-th restart in it first waits 2^(k-1) s (at most 30)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a (re)start may take to become ready")
    if "--" in argv:
        cut = argv.index("--")
        a, rest = p.parse_known_args(argv[:cut])
        return a, rest + argv[cut + 1:]
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    a, given = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args = tritonserver_args(given, dict(os.environ))
    except CtrError as e:
        print(f"entrypoint: {e}", file=sys.stderr)
        return 2
    redact = redactor(args, dict(os.environ))

    def log(msg: str) -> None:
        print(f"entrypoint: {redact(msg)}", file=sys.stderr, flush=True)

    server = CommandServer(args, binary=a.binary, local=a.local, startup_timeout=a.ready_timeout, redact=redact)
    url = f"http://{server.http_url}"

    def probe() -> str | None:
        return liveness.probe(url, a.liveness_model, a.liveness_timeout)

    def confirm() -> str | None:  # a stub is gone: killed (the ensemble fails) or its model unloaded (it answers)
        return liveness.probe(url, a.liveness_model, min(CONFIRM_TIMEOUT, a.liveness_timeout))

    sup = Supervisor(server, interval=a.interval, max_restarts=a.max_restarts, window_s=a.restart_window,
                     probe=probe if a.liveness_interval > 0 else None, probe_interval=a.liveness_interval,
                     probe_failures=a.liveness_failures, confirm=confirm, notify=log)
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if not stopping.is_set():
            log(f"{signal.Signals(signum).name}: stopping tritonserver")
        stopping.set()
        sup.request_stop()  # also aborts a start or restart that waits for readiness

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"starting {' '.join([server.binary if not a.local else 'tritonserver (nvidia-pytriton)', *args])}")
    try:
        sup.start()
    except StartCancelled:
        sup.stop()
        log("stopped before tritonserver was ready")
        return 0
    except (CtrError, OSError) as e:
        sup.stop()
        log(f"tritonserver did not start: {e}")
        return 1
    log(f"tritonserver ready (pid {server.pid}, HTTP {server.http_url}); supervised: process checks every "
        f"{a.interval:g} s, liveness " + (f"every {a.liveness_interval:g} s" if a.liveness_interval > 0 else "off")
        + f", at most {a.max_restarts} restarts within {a.restart_window:g} s")
    seen = 0
    while not stopping.wait(0.5) and sup.error is None:
        for r in sup.restarts[seen:]:
            log(f"restarted tritonserver after: {r['reason']} ({r['waited']:.0f} s backoff, {r['seconds']:.1f} s "
                f"restart, new pid {server.pid})")
        seen = len(sup.restarts)
        if os.getpid() == 1:
            reap_orphans({server.pid} if server.pid else set())
    if sup.error is not None and not stopping.is_set():
        log(f"supervision stopped, exiting 1 for the container's restart policy: {sup.error}")
        sup.stop()
        return 1
    code = sup.stop()
    log(f"tritonserver stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

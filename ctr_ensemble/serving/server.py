"""Run the real ``tritonserver`` binary from the nvidia-pytriton wheel, without Docker.

A private backend directory is assembled per server: ``python/`` (the wheel's Python
backend plus the stub built for the running Python) and ``onnxruntime/model.py`` (our
Python-based ONNX Runtime backend). The server binds to 127.0.0.1 by default, runs with
``--model-control-mode=explicit --load-model=ctr_ensemble --strict-readiness``, and ``start()`` waits for readiness,
showing the end of the server log if it never comes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ctr_ensemble.errors import CtrError

# No import of ctr_ensemble.export (onnx, protobuf, tritonclient, torch) at module level: the container's
# entrypoint (serving/entrypoint.py) imports this module in the NGC image, which has none of them but numpy/torch.


def pytriton_root() -> Path:
    """The installed ``pytriton`` folder, found without importing it: only its ``tritonserver/`` is used, so
    its own Python dependencies need not be there (a ``pip install --no-deps --target`` of the wheel works)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise CtrError("nvidia-pytriton is not installed; it ships the tritonserver binary (pip install nvidia-pytriton)")
    return Path(spec.origin).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay open until every port is picked, so none repeats."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# The flags every tritonserver of this project runs with, here and in the NGC container
# (docker-compose.yml): one source of truth, checked by tests/test_deploy.py. Explicit model control, so that
# `ctr-ensemble deploy` can load a release and switch the ensemble to it (the load/unload API is an admin API:
# it needs the key); at start only the ensemble is loaded, which loads the models its steps name.
SERVER_FLAGS = (
    "--model-control-mode=explicit",
    "--load-model=ctr_ensemble",
    "--strict-readiness=true",
    "--exit-on-error=true",
    "--exit-timeout-secs=30",
)
# Admin APIs that need the key header; inference, health and metadata stay open to clients.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "admin-key"
PRODUCTION_REPOSITORY = "/models"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"


def restriction_flags(key: str, check: bool = True) -> list[str]:
    """Admin APIs allowed only with header ``admin-key: <key>``, over HTTP and gRPC."""
    if check and (not key or any(c in key for c in " ,:=\n")):
        raise CtrError("the admin key must be non-empty and contain no spaces, ',', ':' or '='")
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}", f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}"]


def default_admin_key() -> str:
    """``$TRITON_ADMIN_KEY``, else a random key for this server: the admin APIs are never open by default."""
    import secrets

    return os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)


def admin_headers(key: str, protocol: str) -> dict[str, str]:
    """The header that unlocks the restricted APIs (gRPC metadata keys get Triton's protocol prefix)."""
    return {ADMIN_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_HEADER}": key}


# Request-size bound of the production server (docs/serving.md, "Request bounds"): Triton's HTTP body limit,
# from $TRITON_MAX_REQUEST_BYTES (set it to repository.json's limits.max_request_bytes). The flag came to Triton
# in 2025 (server PR #8174), after 2.51: the production image has it (not run here: no Docker), the local
# tritonserver 2.51 rejects it, so the local server never passes it. Triton has no gRPC message-size flag: the
# gateway in front bounds both protocols (deploy/gateway/nginx.conf).
MAX_REQUEST_BYTES_ENV = "TRITON_MAX_REQUEST_BYTES"
# 8 MiB: every repository of up to 169 tensor elements a row at max_batch_size 1024 (export.repository.request_limits).
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_INPUT_FLAG = "--http-max-input-size"
# As compose writes it (it expands the variable); the entrypoint, which no shell runs, puts in the value itself.
LIMIT_FLAGS = (f"{MAX_INPUT_FLAG}=${{{MAX_REQUEST_BYTES_ENV}:-{DEFAULT_MAX_REQUEST_BYTES}}}",)


def limit_flags(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """``LIMIT_FLAGS`` as written, or with the value of ``env`` (default when unset) for a command no shell expands."""
    if env is None:
        return LIMIT_FLAGS
    return (f"{MAX_INPUT_FLAG}={int(env.get(MAX_REQUEST_BYTES_ENV) or DEFAULT_MAX_REQUEST_BYTES)}",)


# The container's command (docker-compose.yml, deploy/triton/Dockerfile): tritonserver under our supervisor.
ENTRYPOINT = ("python3", "-m", "ctr_ensemble.serving.entrypoint")


def production_args(key: str, check: bool = True, repository: str | Path = PRODUCTION_REPOSITORY,
                    env: dict[str, str] | None = None) -> list[str]:
    """tritonserver's arguments in the container: the NGC image's backends, all ports on 0.0.0.0 (defaults
    8000/8001/8002), the repository at /models, the admin APIs behind ``key``, the request-size bound."""
    return [f"--model-repository={repository}", *SERVER_FLAGS, *restriction_flags(key, check=check), *limit_flags(env)]


def production_command() -> list[str]:
    """The container's command line (docker-compose.yml): the entrypoint (supervision: a dead stub or server
    is restarted) running tritonserver with ``production_args``, the key taken from the environment by compose."""
    return [*ENTRYPOINT, *production_args(f"${{{ADMIN_KEY_ENV}:?set {ADMIN_KEY_ENV} (see README)}}", check=False)]


def libpython_dir() -> list[str]:
    """The folder of this Python's shared libpython (the stub links ``libpython3.X.so.1.0``), where it has one:
    a Python outside the system library paths (pyenv, a --target install on another machine) still starts it."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return [libdir] if libdir and soname and (Path(libdir) / soname).is_file() else []


def make_backend_dir(dest: Path) -> Path:
    """Backend directory with the Python backend (stub for this Python) and the Python-based onnxruntime backend."""
    from ctr_ensemble.export.repository import TRITON_SRC

    root = pytriton_root() / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise CtrError(f"nvidia-pytriton has no Python backend stub for Python {py} (looked for {stub})")
    (dest / "python").mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(root / "backends" / "python" / f, dest / "python" / f)
    shutil.copy(stub, dest / "python" / "triton_python_backend_stub")
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy(TRITON_SRC / "onnxruntime_backend.py", dest / "onnxruntime" / "model.py")
    return dest


def local_binary() -> Path:
    """The tritonserver binary of the nvidia-pytriton wheel."""
    return pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def local_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the wheel's tritonserver needs here: its bundled libraries (and this Python's libpython)
    on LD_LIBRARY_PATH, and this Python first on PATH (the Python backend stub imports packages from it)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [str(pytriton_root().parent / "nvidia_pytriton.libs"), *libpython_dir()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


class Endpoints:
    """URLs of a server from ``host``, ``http_port``, ``grpc_port``, ``metrics_port``."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


class StartCancelled(CtrError):
    """``TritonServer.start`` gave up because its ``cancel`` event was set."""


class PortInUse(CtrError):
    """tritonserver exited while starting because one of its ports was taken (by the time it bound it)."""


# Triton 2.51's log line when a port is taken: 'failed to start HTTP service: Unavailable - Socket
# '127.0.0.1:47721' already in use' (GRPC and Metrics alike).
PORT_IN_USE = re.compile(r"failed to start \w+ service: .*already in use")
PORT_ATTRS = ("http_port", "grpc_port", "metrics_port")


class ServerProcess(Endpoints):
    """A tritonserver process group started by this program, as the supervisor sees it: ``start()`` (by the
    subclass: launch, then ``_wait_ready``), ``is_running``, ``pid``, ``log_tail``, ``stop``. The subclass
    provides the fields below (TritonServer: the wheel's binary on a repository; entrypoint.CommandServer: a
    tritonserver command line, the container's)."""

    startup_timeout: float
    log_path: Path | None
    cancel: threading.Event | None
    _proc: subprocess.Popen | None
    _workdir: Path | None
    killed: bool  # the last stop() had to SIGKILL tritonserver (no exit by itself)

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def _launch(self, argv: list[str], env: dict[str, str], stdout) -> None:
        """Start ``argv`` in a new session (its process group holds the backend stubs too; ``stop`` kills it)."""
        self.killed = False
        self._proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.cancel is not None and self.cancel.is_set():
                self.stop(timeout=3)  # not serving yet: nothing in flight to drain
                raise StartCancelled("tritonserver start cancelled: a stop was asked for while it was starting")
            if self._proc.poll() is not None:
                tail = self.log_tail()
                in_use = any(PORT_IN_USE.search(line) for line in self.log_lines())
                self._cleanup()
                raise (PortInUse if in_use else CtrError)(
                    f"tritonserver exited with code {self._proc.returncode} while starting; log:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise CtrError(f"tritonserver not ready after {self.startup_timeout:.0f}s; log:\n{tail}")

    def log_lines(self) -> list[str]:
        if self.log_path is None or not Path(self.log_path).is_file():
            return []
        return Path(self.log_path).read_text(errors="replace").splitlines()

    def log_tail(self, lines: int = 15) -> str:
        """Error lines of the server log (which model failed and why) plus its last lines."""
        text = self.log_lines()
        if not text:
            return "(no log)"
        # Triton's error lines start with E<date>; the model table marks failed models UNAVAILABLE.
        errors = [l for l in text if re.match(r"E\d{4} ", l) or "UNAVAILABLE" in l]
        tail = [l for l in text[-lines:] if l not in errors]
        return "\n".join(errors[:20] + (["..."] if tail else []) + tail)

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver (its backend stubs are its children)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (in-flight requests finish, new ones are refused), then SIGKILL after ``timeout``."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
                self.killed = True
            except ProcessLookupError:
                pass
        try:  # stubs outlive a crashed server (SIGSEGV, abort): take the whole process group down
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self._proc.returncode
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class TritonServer(ServerProcess):
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0 = pick a free port
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout: float = 180.0
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    # Admin APIs (model repository/config, shared memory, statistics, trace, logging) need this key in the
    # ``admin-key`` header (see restriction_flags); default $TRITON_ADMIN_KEY or a random key; None opens them.
    admin_key: str | None = field(default_factory=default_admin_key)
    validate_repository: bool = True  # run export.validate first: a broken repository fails in ~1 s, not minutes
    # When set while start() waits for readiness, start() stops what it started and raises (a stop during a restart).
    cancel: threading.Event | None = field(default=None, repr=False)
    # Ports picked here (given as 0) are free when picked but may be taken before tritonserver binds them, seconds
    # later: start() then picks new ones and starts again, at most this many times in all. Ports given (and
    # those of a restart, which keeps its ports) are never changed.
    bind_attempts: int = 3
    # HTTP's own address when not ``host``: ``serve`` binds it to loopback behind its guard (serving/guard.py)
    http_host: str | None = None
    killed: bool = field(default=False, init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)

    def command(self, backend_dir: Path) -> list[str]:
        return [
            str(local_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            *self.flags(),
            f"--http-address={self.http_host or self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",  # no DCGM here; the container keeps GPU metrics on
            f"--log-verbose={self.log_verbose}",
            *(restriction_flags(self.admin_key) if self.admin_key else []),
            *self.extra_args,
        ]

    @property
    def http_url(self) -> str:
        return f"{self.http_host or self.host}:{self.http_port}"

    def flags(self) -> list[str]:
        """``SERVER_FLAGS`` plus the repository's deployment variants (``export.variants``); a repository without
        the ensemble (members served alone) loads all its models."""
        # Imported here: the container's entrypoint imports this module with the standard library only.
        from ctr_ensemble.export.served import variant_models

        if (Path(self.repository) / "ctr_ensemble").is_dir():
            return [*SERVER_FLAGS, *(f"--load-model={m}" for m in variant_models(self.repository))]
        return ["--load-model=*" if f.startswith("--load-model=") else f for f in SERVER_FLAGS]

    def start(self) -> TritonServer:
        # Absolute, but its symlink kept (export flips it to each new version): a restart serves the repository
        # published last, and the version this server started on may be pruned by a later export.
        self.repository = Path(os.path.abspath(self.repository))
        if not (self.repository / "repository.json").is_file() and not any(self.repository.glob("*/config.pbtxt")):
            raise CtrError(f"{self.repository}: not a model repository (no */config.pbtxt); run `ctr-ensemble export` first")
        if self.validate_repository:
            from ctr_ensemble.export import validate

            validate.check(self.repository)
        auto = [a for a in PORT_ATTRS if not getattr(self, a)]
        own_log = self.log_path is None
        attempt = 1
        while True:
            self._pick_ports()
            if own_log:
                self.log_path = None
            try:
                self._workdir = Path(tempfile.mkdtemp(prefix="ctr-triton-"))
                backend_dir = make_backend_dir(self._workdir / "backends")
                if self.log_path is None:
                    self.log_path = self._workdir / "tritonserver.log"
                with open(self.log_path, "wb") as log:
                    self._launch(self.command(backend_dir), local_env(), log)
                self._wait_ready()
                return self
            except PortInUse:
                if not auto or attempt >= self.bind_attempts:
                    raise
            attempt += 1
            for attr in auto:  # taken between picking and binding: pick again
                setattr(self, attr, 0)

    def _pick_ports(self) -> None:
        taken = {getattr(self, a) for a in PORT_ATTRS if getattr(self, a)}
        spare = iter(p for p in free_ports(6) if p not in taken)
        for attr in PORT_ATTRS:
            if not getattr(self, attr):
                setattr(self, attr, next(spare))

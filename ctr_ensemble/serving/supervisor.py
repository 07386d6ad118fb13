"""Keep a local Triton server serving: restart it when it dies or when a backend stub dies.

Two failures that Triton 2.51 does not recover from by itself (both measured here, see
docs/reliability.md):

* a Python-backend (or Python-based onnxruntime) **stub process is killed**: the model then
  answers every request with "Stub process '<model>_0_0' is not healthy" while the server and
  the model still report ready, so a readiness probe does not notice;
* the **server process exits** (e.g. it aborts on an HTTP JSON request declaring a ~200 GB shape).

The supervisor polls (every ``interval`` s) that the server process is alive and that every stub
process it had when it became ready is still alive; on a failure it stops what is left and
starts the server again on the same ports, with bounded retries. Requests in the gap fail with a
connection error or the stub error (clients should retry); answers afterwards are the same as before.
A stop (SIGTERM to ``ctr-ensemble serve``) during a restart aborts the restart at once rather than
waiting for the new server to become ready.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving.server import StartCancelled, TritonServer

STUB_SUFFIX = b"triton_python_backend_stub"


def stub_pids(server_pid: int) -> dict[int, str]:
    """Backend stub processes started by ``server_pid``: pid → the model file it serves."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process went away while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and cmd and cmd[0].endswith(STUB_SUFFIX):
            out[int(p.name)] = cmd[1].decode(errors="replace") if len(cmd) > 1 else "?"
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@dataclass
class Supervisor:
    server: TritonServer
    interval: float = 1.0
    max_restarts: int = 5
    restarts: list[dict] = field(default_factory=list)  # {"at": time, "reason": str, "seconds": float}
    _stubs: dict[int, str] = field(default_factory=dict, init=False)
    _log_path: Path | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    error: str | None = None  # set when restarts are exhausted

    def start(self) -> Supervisor:
        # A log the server put in its own temp folder goes away with it; a restart gets a new one.
        self._log_path = self.server.log_path
        self.server.cancel = self._stop  # stop() during a restart aborts the restart instead of waiting for it
        if not self.server.is_running():
            self.server.start()
        self._stubs = stub_pids(self.server._proc.pid)
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def check(self) -> str | None:
        """Why the server needs a restart, or None if it is healthy."""
        if not self.server.is_running():
            return f"tritonserver exited with code {self.server._proc.returncode}"
        dead = [model for pid, model in self._stubs.items() if not _alive(pid)]
        if dead:
            return f"backend stub died: {', '.join(sorted(dead))}"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            reason = self.check()
            if reason is None:
                continue
            if len(self.restarts) >= self.max_restarts:
                self.error = f"giving up after {self.max_restarts} restarts; last failure: {reason}"
                return
            with self._lock:
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                self.server.stop(timeout=3)  # already broken: do not wait long for a graceful exit
                self.server.log_path = self._log_path
                try:
                    self.server.start()
                except StartCancelled:
                    return  # stop() was called: it stops what is left
                except (CtrError, OSError) as e:
                    self.error = f"restart after '{reason}' failed: {e}"
                    return
                self._stubs = stub_pids(self.server._proc.pid)
                self.restarts.append({"at": time.time(), "reason": reason, "seconds": time.perf_counter() - t0})

    def stop(self) -> int | None:
        self._stop.set()
        with self._lock:
            if self._thread is not None:
                self._thread.join(timeout=5)
            self.server.cancel = None
            return self.server.stop()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Keep a local Triton server serving: restart it when it dies or when a backend stub dies.

Two failures that Triton 2.51 does not recover from by itself (both measured here, see
docs/reliability.md):

* a Python-backend (or Python-based onnxruntime) **stub process is killed**: the model then
  answers every request with "Stub process '<model>_0_0' is not healthy" while the server and
  the model still report ready, so a readiness probe does not notice;
* the **server process exits** (e.g. it aborts on an HTTP JSON request declaring a ~200 GB shape).

The supervisor polls (every ``interval`` s) that the server process is alive and that every stub
process it had when it became ready is still alive; on a failure it stops what is left and
starts the server again on the same ports. Requests in the gap fail with a connection error or the
stub error (clients should retry); answers afterwards are the same as before.

The restart budget is a sliding window: at most ``max_restarts`` restarts within ``window_s`` seconds
(a server that crashes once a day is restarted forever, one that crash-loops is given up on), and the
k-th restart inside the window waits ``backoff_s * 2**(k-1)`` seconds first (capped at
``max_backoff_s``; the first is immediate). Each restart keeps the evidence: its record holds the
reason and the tail of the server log, and a log at a fixed path (``serve``: artifacts/tritonserver.log)
is rotated to ``<log>.1`` … ``<log>.<keep_logs>`` instead of being truncated by the new server.
A stop (SIGTERM to ``ctr-ensemble serve``) during a restart aborts the restart at once rather than
waiting for the new server to become ready.

An optional ``probe`` (the container's entrypoint uses ``serving.liveness``: one row through the ensemble)
runs every ``probe_interval`` s; ``probe_failures`` failures in a row restart the server too, which covers
what the process checks cannot see (a stub alive but hung, a model that stopped answering). With a probe, a
stub that is gone is confirmed by it (or by ``confirm``) before the restart (an idle server answers HTTP 500
within 1 s; under load the request may hang, so the entrypoint gives this check a 2 s deadline): a stub whose model was unloaded (``ctr-ensemble deploy`` / ``rollback`` unload the previous
release) exits too, and then the ensemble still answers, so nothing is restarted. Stubs started after the
server became ready (a release loaded by ``deploy``) are watched from the check that first sees them.

The server is any ``ServerProcess``: ``TritonServer`` (the wheel's binary, ``serve``) or the entrypoint's
``CommandServer`` (a tritonserver command line; in the NGC container, ``python3 -m ctr_ensemble.serving.entrypoint``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving.server import ServerProcess, StartCancelled

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


def rotate_log(path: Path | None, keep: int) -> Path | None:
    """``path`` → ``path.1`` (``.1`` → ``.2`` …, the oldest beyond ``keep`` dropped), so a restarted server does
    not truncate the log that holds the crash; returns ``path.1``, or None when there is no such log."""
    if path is None or keep < 1 or not Path(path).is_file():
        return None
    path = Path(path)
    old = path.with_name(f"{path.name}.{keep}")
    old.unlink(missing_ok=True)
    for i in range(keep - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.is_file():
            src.rename(path.with_name(f"{path.name}.{i + 1}"))
    dst = path.with_name(f"{path.name}.1")
    path.rename(dst)
    return dst


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@dataclass
class Supervisor:
    server: ServerProcess
    interval: float = 1.0
    max_restarts: int = 5  # within window_s
    window_s: float = 600.0  # restarts older than this no longer count toward max_restarts
    backoff_s: float = 1.0  # wait before the k-th restart in the window: backoff_s * 2**(k-1) (the first: none)
    max_backoff_s: float = 30.0
    keep_logs: int = 5  # rotated logs of a fixed log path: <log>.1 (the latest crash) .. <log>.<keep_logs>
    # {"at": time, "reason": str, "seconds": float, "waited": backoff s, "log_tail": str, "log": rotated path}
    restarts: list[dict] = field(default_factory=list)
    # () -> None when the server answers, else why not; probe_failures failures in a row restart the server
    probe: Callable[[], str | None] | None = None
    probe_interval: float = 10.0
    probe_failures: int = 3
    # asked when a stub is gone, before restarting (default: probe); the entrypoint's has a shorter deadline
    confirm: Callable[[], str | None] | None = None
    notify: Callable[[str], None] | None = None  # told each failure before its restart (reason, backoff)
    _probe_failed: int = field(default=0, init=False)
    _probe_next: float = field(default=0.0, init=False)
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
        self._watch_new_server()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def check(self) -> str | None:
        """Why the server needs a restart, or None if it is healthy."""
        if not self.server.is_running():
            return f"tritonserver exited with code {self.server._proc.returncode}"
        dead = {pid: model for pid, model in self._stubs.items() if not _alive(pid)}
        # stubs started later (a model loaded by `deploy`) are watched from the check that first sees them
        self._stubs.update((pid, m) for pid, m in stub_pids(self.server.pid).items() if pid not in dead and _alive(pid))
        if dead:
            models = ", ".join(sorted(dead.values()))
            ask = self.confirm or self.probe
            why = ask() if ask is not None else "no probe to ask"
            if why is None:  # the ensemble still answers: the stub's model was unloaded (deploy/rollback), not killed
                for pid in dead:
                    self._stubs.pop(pid, None)
                if self.notify is not None:
                    self.notify(f"backend stub exited: {models}, and the liveness check passes (a model unloaded): "
                                "no restart")
                return None
            return f"backend stub died: {models}" + (f" ({why})" if ask is not None else "")
        if self.probe is not None and time.monotonic() >= self._probe_next:
            self._probe_next = time.monotonic() + self.probe_interval
            why = self.probe()
            self._probe_failed = 0 if why is None else self._probe_failed + 1
            if self._probe_failed >= self.probe_failures:
                return f"liveness check failed {self._probe_failed} times in a row: {why}"
        return None

    def _watch_new_server(self) -> None:
        self._stubs = stub_pids(self.server.pid)
        self._probe_failed, self._probe_next = 0, time.monotonic() + self.probe_interval

    def recent(self, now: float | None = None) -> list[dict]:
        """The restarts inside the sliding window (what counts toward ``max_restarts``)."""
        now = time.time() if now is None else now
        return [r for r in self.restarts if now - r["at"] <= self.window_s]

    def backoff(self, k: int) -> float:
        """Seconds to wait before a restart with ``k`` restarts already in the window."""
        return 0.0 if k <= 0 else min(self.max_backoff_s, self.backoff_s * 2 ** (k - 1))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            reason = self.check()
            if reason is None:
                continue
            k = len(self.recent())
            if k >= self.max_restarts:
                self.error = (f"giving up: {k} restarts within {self.window_s:g} s; last failure: {reason}"
                              f"\n{self.server.log_tail()}")
                return
            waited = self.backoff(k)
            if self.notify is not None:
                self.notify(f"{reason}; restarting tritonserver" + (f" in {waited:g} s (backoff)" if waited else ""))
            if self._stop.wait(waited):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                tail = self.server.log_tail(40)  # before stop(): a log in the server's temp folder goes with it
                self.server.stop(timeout=3)  # already broken: do not wait long for a graceful exit
                rotated = rotate_log(self._log_path, self.keep_logs)
                self.server.log_path = self._log_path
                try:
                    self.server.start()
                except StartCancelled:
                    return  # stop() was called: it stops what is left
                except (CtrError, OSError) as e:
                    self.error = f"restart after '{reason}' failed: {e}"
                    return
                self._watch_new_server()
                self.restarts.append({"at": time.time(), "reason": reason, "seconds": time.perf_counter() - t0,
                                      "waited": waited, "log_tail": tail,
                                      "log": str(rotated) if rotated is not None else None})

    def request_stop(self) -> None:
        """Ask the watch (and a restart waiting for readiness) to end, without waiting: a signal handler's part."""
        self._stop.set()

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

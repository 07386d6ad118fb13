"""serving/supervisor.py's restart policy: a sliding-window budget, exponential backoff, and logs kept.

The end-to-end restarts of a real tritonserver (a killed stub, a crashed server) are in tests/test_faults.py;
here a real short-lived process stands in for the server, so the policy runs through many restarts quickly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctr_ensemble.serving.supervisor import Supervisor, rotate_log


class SleepServer:
    """A real process (``sleep``) with what the supervisor uses of TritonServer: start/stop/is_running, a log."""

    def __init__(self, log_path: Path):
        self.log_path, self._proc, self.cancel, self.starts = log_path, None, None, 0

    def start(self):
        self.starts += 1
        with open(self.log_path, "w") as f:
            f.write(f"E1202 start {self.starts}: the reason of the next crash is in here\n")
        self._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 3) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        return None if self._proc is None else self._proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        return Path(self.log_path).read_text() if Path(self.log_path).is_file() else "(no log)"

    def crash(self) -> None:
        os.kill(self._proc.pid, signal.SIGKILL)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_backoff_doubles_and_the_window_forgets_old_restarts():
    sup = Supervisor(server=None, backoff_s=1.0, max_backoff_s=5.0, window_s=100.0)
    assert [sup.backoff(k) for k in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    sup.restarts = [{"at": 1000.0}, {"at": 1050.0}, {"at": 1100.0}]
    assert sup.recent(now=1120.0) == [{"at": 1050.0}, {"at": 1100.0}]  # the one at 1000 s has left the window
    assert sup.recent(now=1201.0) == []


def test_rotate_log_keeps_the_newest_crashes(tmp_path):
    log = tmp_path / "tritonserver.log"
    assert rotate_log(log, 3) is None  # no log yet
    for i in range(5):
        log.write_text(f"run {i}\n")
        assert rotate_log(log, 3) == tmp_path / "tritonserver.log.1"
    assert not log.exists()
    assert [(tmp_path / f"tritonserver.log.{k}").read_text() for k in (1, 2, 3)] == ["run 4\n", "run 3\n", "run 2\n"]
    assert not (tmp_path / "tritonserver.log.4").exists()


def test_crash_loop_is_given_up_within_the_window_with_backoff_and_the_evidence_kept(tmp_path):
    server = SleepServer(tmp_path / "server.log")
    sup = Supervisor(server, interval=0.02, max_restarts=3, window_s=60.0, backoff_s=0.1, max_backoff_s=1.0,
                     keep_logs=5).start()
    try:
        for n in range(1, 4):
            server.crash()
            _wait(lambda: len(sup.restarts) == n, 10, f"restart {n}")
        assert [r["waited"] for r in sup.restarts] == [0.0, 0.1, 0.2]
        assert all(r["reason"].startswith("tritonserver exited") for r in sup.restarts)
        # each restart kept the crashed run's log and its tail; the new server did not truncate it
        assert [r["log_tail"].split(":")[0] for r in sup.restarts] == ["E1202 start 1", "E1202 start 2", "E1202 start 3"]
        assert sorted(p.name for p in tmp_path.glob("server.log.*")) == ["server.log.1", "server.log.2", "server.log.3"]
        assert (tmp_path / "server.log.3").read_text().startswith("E1202 start 1")
        server.crash()  # the 4th crash inside the window: given up, with the reason and the log
        _wait(lambda: sup.error is not None, 10, "the supervisor to give up")
        assert "giving up: 3 restarts within 60 s" in sup.error and "E1202 start 4" in sup.error
        assert server.starts == 4
    finally:
        sup.stop()


def test_restarts_outside_the_window_do_not_use_up_the_budget(tmp_path):
    server = SleepServer(tmp_path / "server.log")
    sup = Supervisor(server, interval=0.02, max_restarts=1, window_s=0.5, backoff_s=0.05).start()
    try:
        for n in range(1, 4):  # one restart allowed per 0.5 s: spaced crashes are restarted forever
            server.crash()
            _wait(lambda: len(sup.restarts) == n, 10, f"restart {n}")
            assert sup.restarts[-1]["waited"] == 0.0 and sup.error is None
            time.sleep(0.6)
    finally:
        sup.stop()
    assert server.starts == 4


def test_rotation_off_leaves_the_log_to_the_next_run(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("a")
    assert rotate_log(log, 0) is None and log.read_text() == "a"


def test_a_failing_liveness_probe_restarts_after_its_failures_in_a_row(tmp_path):
    """The entrypoint's probe (one row through the ensemble): a single failure is tolerated, ``probe_failures``
    in a row restart the server (with the reason and the notice before it), and the count starts over after."""
    server, answers, notes = SleepServer(tmp_path / "server.log"), [], []

    def probe():
        return answers.pop(0) if answers else None

    sup = Supervisor(server, interval=0.02, probe=probe, probe_interval=0.02, probe_failures=2,
                     notify=notes.append).start()
    try:
        answers[:] = ["HTTP 400: Stub process 'fusion_0_0' is not healthy", None]  # one failure, then live
        _wait(lambda: not answers, 10, "the probe to be asked twice")
        time.sleep(0.2)
        assert sup.restarts == []
        answers[:] = ["HTTP 400: stub unhealthy"] * 2
        _wait(lambda: len(sup.restarts) == 1, 10, "the restart after two failures in a row")
        assert sup.restarts[0]["reason"] == "liveness check failed 2 times in a row: HTTP 400: stub unhealthy"
        assert notes == [f"{sup.restarts[0]['reason']}; restarting tritonserver"] and server.starts == 2
        time.sleep(0.2)
        assert len(sup.restarts) == 1 and sup.error is None  # live again: no further restart
    finally:
        sup.stop()



class StubServer(SleepServer):
    """A bash process with 'backend stub' children (argv[0] ends with triton_python_backend_stub, argv[1] the
    model file), as tritonserver has: one at the start (``fusion``), one more once ``go`` exists (``fusion-r2``,
    as a release loaded by `deploy` would be)."""

    def start(self):
        self.starts += 1
        d = self.log_path.parent
        for model in ("fusion", "fusion-r2"):
            (d / model).write_text("sleep 60\n")
        stub = "exec -a /x/triton_python_backend_stub bash"
        script = (f"({stub} {d}/fusion) & while [ ! -e {d}/go ]; do sleep 0.05; done; ({stub} {d}/fusion-r2) & sleep 60")
        self._proc = subprocess.Popen(["bash", "-c", script])
        return self

    def stubs(self) -> dict[int, str]:
        from ctr_ensemble.serving.supervisor import stub_pids

        return {pid: Path(m).name for pid, m in stub_pids(self._proc.pid).items()}

    def stop(self, timeout: float = 3) -> int | None:
        for pid in self.stubs() if self._proc is not None else ():
            os.kill(pid, signal.SIGKILL)
        return super().stop(timeout)


def test_a_gone_stub_is_confirmed_by_the_probe_and_later_stubs_are_watched(tmp_path):
    """With a probe, a stub that is gone restarts the server only when the probe fails too (killed); when the
    ensemble still answers, its model was unloaded (deploy/rollback) and nothing restarts. A stub that appears
    after the start (a release loaded later) is watched as well."""
    server, answers, notes = StubServer(tmp_path / "server.log"), [], []
    sup = Supervisor(server, interval=0.05, probe=lambda: answers[0] if answers else None, probe_interval=60,
                     notify=notes.append)
    server.start()
    _wait(lambda: len(server.stubs()) == 1, 10, "the first stub")
    sup.start()
    try:
        (tmp_path / "go").touch()  # the second stub starts after the supervisor took its snapshot
        _wait(lambda: len(server.stubs()) == 2 and set(server.stubs()) <= set(sup._stubs), 10, "the later stub watched")
        first = next(pid for pid, m in server.stubs().items() if m == "fusion")
        os.kill(first, signal.SIGKILL)  # the probe passes: an unloaded model's stub
        _wait(lambda: notes, 10, "the notice")
        assert "backend stub exited" in notes[0] and "no restart" in notes[0] and sup.restarts == []
        answers.append("HTTP 500: Stub process 'fusion-r2_0_0' is not healthy")
        later = next(pid for pid, m in server.stubs().items() if m == "fusion-r2")
        os.kill(later, signal.SIGKILL)  # the probe fails: killed, restart
        _wait(lambda: sup.restarts, 10, "the restart")
        reason = sup.restarts[0]["reason"]
        assert reason.startswith("backend stub died: ") and reason.split(" (")[0].endswith("/fusion-r2"), reason
        assert reason.endswith("(HTTP 500: Stub process 'fusion-r2_0_0' is not healthy)") and server.starts == 2
    finally:
        sup.stop()

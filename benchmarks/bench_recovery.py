"""Recovery after a stub kill through the container entrypoint: errors during the outage and seconds to recover.

Starts ``python -m ctr_ensemble.serving.entrypoint --local`` -- the module the NGC container runs
(docker-compose.yml), with the production arguments, on the bundled tritonserver -- on free ports, puts
``--users`` client threads on the ensemble (half HTTP, half gRPC; each sends its own ``--rows`` rows again and
again, the answer checked against the one it got before any fault, |Δ| ≤ 1e-5), then ``--kills`` times:
SIGKILLs the fusion model's Python stub, runs ``python -m ctr_ensemble.serving.liveness`` at once (it must
fail), waits until every user has had a correct answer again, and lets the load settle for ``--settle`` s.

Per kill: failed requests from the kill to the recovery, seconds from the kill to the first correct answer
(any user) and to the last user's first correct answer, the liveness line, the entrypoint's restart line
(reason, backoff, restart time). The restart policy is the production default (5 restarts in 600 s, the k-th
restart in the window waits 2^(k-1) s first), so the 2nd and 3rd kills include 1 s and 2 s of backoff.

Writes ``<out>/recovery.md`` and ``<out>/recovery.csv``; ``make bench-recovery`` publishes them, stamped, into
docs/recovery/. Exit 1 when a wrong answer came back, a user never recovered or liveness did not fail.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load_average, md_table, write_report  # noqa: E402

from ctr_ensemble.data.encode import encode_file  # noqa: E402
from ctr_ensemble.export.repository import ENSEMBLE_NAME, repository_spec  # noqa: E402
from ctr_ensemble.serving.client import TritonScorer  # noqa: E402
from ctr_ensemble.serving.entrypoint import local_command  # noqa: E402
from ctr_ensemble.serving.server import free_ports  # noqa: E402
from ctr_ensemble.serving.supervisor import stub_pids  # noqa: E402

COLUMNS = ["kill", "errors", "first_ok_s", "all_users_ok_s", "liveness_rc", "restart"]


class User(threading.Thread):
    """One client sending its rows to the ensemble over one protocol; every answer timed and checked."""

    def __init__(self, url: str, protocol: str, feeds: dict, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.protocol, self.feeds, self.stop_ev = url, protocol, feeds, stop
        self.ref: np.ndarray | None = None
        self.events: list[tuple[float, bool]] = []  # (monotonic time, correct answer?) — a failure is False
        self.wrong = 0

    def run(self) -> None:
        scorer = TritonScorer(self.url, self.protocol, timeout_s=10)
        while not self.stop_ev.is_set():
            try:
                out = scorer.infer(ENSEMBLE_NAME, self.feeds)["prob"]
            except Exception:  # refused, reset, the dead stub's error: a new client next time
                self.events.append((time.monotonic(), False))
                scorer = TritonScorer(self.url, self.protocol, timeout_s=10)
                time.sleep(0.05)
                continue
            if self.ref is None:
                self.ref = out
            elif np.abs(out - self.ref).max() > 1e-5:
                self.wrong += 1
            self.events.append((time.monotonic(), True))

    def back_after(self, t: float) -> float | None:
        """Time of this user's first correct answer after its first failure after ``t``."""
        failed = next((e for e, ok in self.events if e > t and not ok), None)
        if failed is None:
            return None
        return next((e for e, ok in self.events if e > failed and ok), None)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"bench-recovery: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _child(ppid: int, suffix: bytes) -> int | None:
    for p in Path("/proc").iterdir():
        try:
            stat, exe = (p / "stat").read_text(), (p / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid and exe.endswith(suffix):
            return int(p.name)
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--data", type=Path, default=Path("artifacts/demo/data/test.tsv"), help="rows to send (any format)")
    p.add_argument("--users", type=int, default=4, help="client threads, alternately HTTP and gRPC")
    p.add_argument("--rows", type=int, default=16, help="rows per request")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--settle", type=float, default=10.0, help="seconds of load before each kill and after recovery")
    p.add_argument("--out", type=Path, default=Path("artifacts/recovery"))
    return p.parse_args()


def main() -> int:
    a = parse_args()
    arr = encode_file(a.data, repository_spec(a.repository))
    key = os.environ.get("TRITON_ADMIN_KEY") or os.urandom(12).hex()
    ports = tuple(free_ports(3))
    cmd = local_command(a.repository, key, ports)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logdir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    err_path = logdir / "entrypoint.err"
    with open(logdir / "entrypoint.out", "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    http, grpc = f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    stop = threading.Event()
    users: list[User] = []
    rows: list[dict] = []
    try:
        _wait(lambda: proc.poll() is not None or "tritonserver ready" in err_path.read_text(), 300, "readiness")
        if proc.poll() is not None:
            raise SystemExit(f"bench-recovery: the entrypoint exited {proc.returncode}:\n{err_path.read_text()}")
        for i in range(a.users):
            lo = (i * a.rows) % max(1, len(arr) - a.rows)
            feeds = arr.feeds(slice(lo, lo + a.rows))
            users.append(User(http if i % 2 == 0 else grpc, "http" if i % 2 == 0 else "grpc", feeds, stop))
        for u in users:
            u.start()
        t_load = time.monotonic()
        for k in range(1, a.kills + 1):
            time.sleep(a.settle)
            if k == 1 and any(not ok for u in users for _, ok in u.events):
                raise SystemExit("bench-recovery: requests failed before any fault")
            triton = _child(proc.pid, b"tritonserver")
            fusion = [pid for pid, m in stub_pids(triton).items() if "/fusion/" in m]
            restarts_before = err_path.read_text().count("restarted tritonserver after")
            t_kill = time.monotonic()
            os.kill(fusion[0], signal.SIGKILL)
            live = subprocess.run([sys.executable, "-m", "ctr_ensemble.serving.liveness", "--url", f"http://{http}"],
                                  capture_output=True, text=True, env=env, timeout=60)
            _wait(lambda: all(u.back_after(t_kill) for u in users), 180, f"every user to recover after kill {k}")
            t_all = max(u.back_after(t_kill) for u in users)
            t_down = min(t for u in users for t, ok in u.events if t > t_kill and not ok)
            t_first = min(t for u in users for t, ok in u.events if t > t_down and ok)
            errors = sum(1 for u in users for t, ok in u.events if t_kill < t <= t_all and not ok)
            _wait(lambda: err_path.read_text().count("restarted tritonserver after") > restarts_before, 30,
                  "the entrypoint's restart line")
            restart = [l.split("entrypoint: ", 1)[1] for l in err_path.read_text().splitlines()
                       if "restarted tritonserver after" in l][-1]
            rows.append({"kill": k, "errors": errors, "first_ok_s": round(t_first - t_kill, 1),
                         "all_users_ok_s": round(t_all - t_kill, 1),
                         "liveness_rc": live.returncode, "liveness": live.stderr.strip(), "restart": restart})
            print(f"kill {k}: {errors} errors, first correct answer {t_first - t_kill:.1f} s, every user "
                  f"{t_all - t_kill:.1f} s; liveness exit {live.returncode}: {live.stderr.strip()}", flush=True)
        time.sleep(a.settle)
    finally:
        stop.set()
        for u in users:
            u.join(timeout=30)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(90)
    elapsed = time.monotonic() - t_load
    ok = sum(1 for u in users for _, good in u.events if good)
    failed = sum(1 for u in users for _, good in u.events if not good)
    wrong = sum(u.wrong for u in users)
    leaked = key in (logdir / "entrypoint.out").read_text() + err_path.read_text()
    summary = (f"{len(rows)} kills under {a.users} users ({a.users - a.users // 2} HTTP, {a.users // 2} gRPC, "
               f"{a.rows} rows per request): {ok:,} correct answers, {failed:,} failed, {wrong} wrong, "
               f"in {elapsed:.0f} s; entrypoint exit code {proc.returncode}; admin key in its output: "
               f"{'YES' if leaked else 'no'}")
    md = "\n".join([
        "# Recovery after a stub kill through the container entrypoint", "",
        f"`make bench-recovery` (`python benchmarks/bench_recovery.py --repository {a.repository} --data {a.data} "
        f"--users {a.users} --rows {a.rows} --kills {a.kills} --settle {a.settle:g}`): "
        "`python -m ctr_ensemble.serving.entrypoint --local` with the production arguments (the container's "
        "command), the fusion stub SIGKILLed under load, `python -m ctr_ensemble.serving.liveness` run right after.",
        "", summary + f". Load average at the end: {load_average()}.", "",
        "- errors: failed requests of all users from the kill until every user had a correct answer again "
        "(clients retry after 50 ms, so this counts attempts, not lost traffic);",
        "- first_ok_s: kill → the first correct answer after the outage; all_users_ok_s: kill → the last user's;",
        "- restart: the entrypoint's own line (the 2nd and later kills inside the 600 s window wait 2^(k-1) s first).",
        "", md_table(rows, COLUMNS), "",
        "Liveness right after each kill: " + "; ".join(f"kill {r['kill']}: exit {r['liveness_rc']}, "
                                                         f"`{r['liveness']}`" for r in rows), ""])
    write_report([a.out], {"recovery.md": md}, {"recovery.csv": [{c: r[c] for c in COLUMNS} for r in rows]})
    print(md)
    print(f"wrote {a.out / 'recovery.md'}")
    bad = wrong or leaked or proc.returncode != 0 or any(r["liveness_rc"] != 1 for r in rows) or len(rows) < a.kills
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults while serving (cf. Triton's L0_backend_python/restart, L0_client_timeout, L0_request_cancellation,
L0_lifecycle): a killed stub, a crashed server, timeouts and cancellations, shutdown with requests in flight."""

import http.client
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.serving.supervisor import Supervisor, stub_pids
from tests.test_fuzz import HUGE_SHAPE

pytestmark = pytest.mark.integration


@pytest.fixture
def repo(tmp_path, tiny_repo):
    dest = tmp_path / "repo"
    shutil.copytree(tiny_repo, dest)
    return dest


class Load:
    """Client threads sending the same ensemble request (user i over ``protocols[i % len]``, HTTP by default);
    tallies answers and failures, with the time of each (``ok_after``, ``failed_at``)."""

    def __init__(self, server, feeds, ref, users=3, protocols=("http",)):
        self.server, self.feeds, self.ref = server, feeds, ref
        self.ok, self.wrong, self.failed = 0, 0, []
        self.ok_after: list[float] = []
        self.failed_at: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._user, args=(protocols[i % len(protocols)],), daemon=True)
                         for i in range(users)]

    def _user(self, protocol):
        url = self.server.http_url if protocol == "http" else self.server.grpc_url
        while not self._stop.is_set():
            try:
                out = TritonScorer(url, protocol, timeout_s=10).infer("ctr_ensemble", self.feeds)["prob"]
            except Exception as e:  # refused connection or the stub's error while it is down
                self.failed.append(str(e)[:200])
                self.failed_at.append(time.monotonic())
                time.sleep(0.05)
                continue
            self.ok += 1
            self.ok_after.append(time.monotonic())
            if np.abs(out - self.ref).max() > 1e-5:
                self.wrong += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _live_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if p.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(p.name))
    return out


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _recovers(sup, load, t_fault):
    _wait(lambda: sup.restarts, 60, "the supervisor to restart the server")
    _wait(lambda: sum(t > t_fault + sup.restarts[-1]["seconds"] for t in load.ok_after) >= 20, 60, "answers after the restart")


def test_killed_fusion_stub_under_load_is_restarted_and_answers_stay_correct(repo, tiny_arrays):
    feeds = tiny_arrays["test"].feeds(slice(0, 32))
    with Supervisor(TritonServer(repo), interval=0.5) as sup:
        ref = TritonScorer(sup.server.http_url).infer("ctr_ensemble", feeds)["prob"]
        with Load(sup.server, feeds, ref) as load:
            _wait(lambda: load.ok >= 20, 30, "load to start")
            fusion = [pid for pid, model in stub_pids(sup.server._proc.pid).items() if "/fusion/" in model]
            assert len(fusion) == 1
            t_fault = time.monotonic()
            os.kill(fusion[0], signal.SIGKILL)
            _recovers(sup, load, t_fault)
        assert load.wrong == 0
        assert sup.restarts[0]["reason"].startswith("backend stub died") and "fusion" in sup.restarts[0]["reason"]
        print(f"\nstub killed: {load.ok} answers (all correct), {len(load.failed)} failed during the outage, "
              f"restart took {sup.restarts[0]['seconds']:.1f}s")
        assert sup.error is None
        out = TritonScorer(sup.server.http_url).infer("ctr_ensemble", feeds)["prob"]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)



def test_stop_during_a_restart_aborts_it_and_leaves_no_server(repo):
    """SIGTERM to `serve` while the supervisor restarts the server: the restart is abandoned (not waited for
    and then stopped), and neither the old nor the half-started server is left running."""
    sup = Supervisor(TritonServer(repo), interval=0.3).start()
    try:
        old = sup.server.pid
        fusion = [pid for pid, model in stub_pids(old).items() if "/fusion/" in model]
        os.kill(fusion[0], signal.SIGKILL)
        _wait(lambda: sup.server.pid != old, 30, "the restart to launch a new tritonserver")
        new = sup.server.pid
    finally:
        sup.stop()
    assert sup.restarts == [] and sup.error is None  # abandoned, not completed
    for pid in (old, new):
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    _wait(lambda: not _live_in_group(new), 10, "the new server's process group (stubs included) to be gone")

def test_crashed_server_is_restarted_on_the_same_ports(repo, tiny_arrays):
    feeds = tiny_arrays["test"].feeds(slice(0, 32))
    with Supervisor(TritonServer(repo), interval=0.5) as sup:
        port = sup.server.http_port
        ref = TritonScorer(sup.server.http_url).infer("ctr_ensemble", feeds)["prob"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v2/models/deepfm/infer", body=HUGE_SHAPE, headers={"Content-Type": "application/json"})
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        _wait(lambda: sup.restarts, 60, "the restart after the crash")
        assert sup.restarts[0]["reason"].startswith("tritonserver exited") and sup.server.http_port == port
        _wait(lambda: sup.server.is_running(), 60, "the new server")
        out = TritonScorer(sup.server.http_url).infer("ctr_ensemble", feeds)["prob"]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def _pending(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^nv_inference_pending_request_count\{[^}]*\} (\S+)$", text, re.M))


def test_client_timeouts_and_cancellations_are_clean_and_leak_nothing(server, tiny_repo, tiny_arrays):
    feeds = tiny_arrays["test"].feeds(slice(0, 256))
    inputs = []
    for name, v in feeds.items():
        x = tgrpc.InferInput(name, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
        x.set_data_from_numpy(v)
        inputs.append(x)
    client = tgrpc.InferenceServerClient(server.grpc_url)
    deadline_errors = 0
    for _ in range(20):  # a deadline far below one inference
        try:
            client.infer("ctr_ensemble", inputs, client_timeout=1e-4)
        except InferenceServerException as e:
            assert "DEADLINE_EXCEEDED" in str(e.status()) or "Deadline" in e.message(), (e.status(), e.message())
            deadline_errors += 1
    assert deadline_errors >= 15  # a rare one may finish inside 0.1 ms on a fast machine
    results = []
    cancelled = 0
    for _ in range(20):
        ctx = client.async_infer("ctr_ensemble", inputs, callback=lambda result, error: results.append((result, error)))
        ctx.cancel()
        cancelled += 1
    _wait(lambda: len(results) == cancelled, 30, "every cancelled request's callback")
    for r, e in results:  # cancelled ones say so; one that finished first is a normal answer
        assert (e is not None and "CANCELLED" in str(e.status())) or (e is None and r.as_numpy("prob").shape == (256, 1))
    _wait(lambda: _pending(server) == 0, 30, "no request left pending on the server")
    ok = TritonScorer(server.grpc_url, "grpc").infer("ctr_ensemble", feeds)["prob"]
    assert ok.shape == (256, 1) and np.isfinite(ok).all()
    client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shutdown_under_load_answers_correctly_or_refuses(repo, tiny_arrays, protocol):
    """SIGTERM while 4 users send requests to a member: what was answered is correct, later requests are
    refused (UNAVAILABLE / "Server is stopping" / connection refused), never a wrong answer, and the
    server is gone within the exit timeout. Triton 2.51 sometimes ends with SIGSEGV in
    TRITONSERVER_ServerInferAsync when requests keep arriving during shutdown (always for the ensemble
    under gRPC load here): docs/reliability.md. So the exit code is reported, not required to be 0."""
    feeds = tiny_arrays["test"].feeds(slice(0, 256))
    server = TritonServer(repo, extra_args=["--exit-timeout-secs=5"]).start()
    url = server.grpc_url if protocol == "grpc" else server.http_url
    ref = TritonScorer(url, protocol).infer("deepfm", feeds)["prob"]
    outcomes = {"ok": 0, "wrong": 0, "refused": 0}
    stop = threading.Event()

    def user():
        scorer = TritonScorer(url, protocol, timeout_s=20)
        while not stop.is_set():
            try:
                out = scorer.infer("deepfm", feeds)["prob"]
            except Exception:  # every failure mode here is a refusal, never an answer
                outcomes["refused"] += 1
                time.sleep(0.01)
                continue
            outcomes["ok" if np.abs(out - ref).max() <= 1e-5 else "wrong"] += 1

    threads = [threading.Thread(target=user, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    _wait(lambda: outcomes["ok"] >= 20, 30, "load")
    code = server.stop()  # SIGTERM: Triton stops taking requests, finishes in-flight ones, exits
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert code is not None and not server.is_running()
    assert outcomes["wrong"] == 0 and outcomes["refused"] > 0, outcomes
    print(f"\nshutdown under {protocol} load: {outcomes}, exit code {code}")


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_checkpoints, monkeypatch):
    import errno

    from ctr_ensemble import files
    from ctr_ensemble.errors import CtrError
    from ctr_ensemble.models import checkpoint

    path = checkpoint.save(tiny_checkpoints[0], tmp_path / "m.pt")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(CtrError, match="No space left on device.*previous checkpoint there is intact"):
        checkpoint.save(tiny_checkpoints[1], path)
    monkeypatch.undo()
    assert path.read_bytes() == before and checkpoint.load(path).name == tiny_checkpoints[0].name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.sha256"]  # no temp files left

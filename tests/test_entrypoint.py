"""The container's entrypoint and liveness check (issue 16: a dead stub is recovered inside the container).

The integration tests run ``python -m ctr_ensemble.serving.entrypoint --local`` -- the module the NGC image runs
(docker-compose.yml), with the production arguments (``server.production_args``) -- as a subprocess on free
ports with the tiny repository, and ``python -m ctr_ensemble.serving.liveness`` against it. The unit tests at
the top need no server: the modules import with the standard library only (what the image has), the admin key
never reaches a log line, and the arguments go to tritonserver unchanged."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ctr_ensemble.serving import liveness
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.entrypoint import (local_command, main, option, parse_args, probe_host, redactor,
                                             tritonserver_args)
from ctr_ensemble.serving.server import ENTRYPOINT, SERVER_FLAGS, free_ports, production_args, production_command
from ctr_ensemble.serving.supervisor import stub_pids
from tests.test_faults import Load
from tests.waits import live_in_group as _live_in_group, wait_for as _wait
from tests.test_rollout import new_export  # noqa: F401  (a fixture: a second release)

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret-Entrypoint-Key_42"
# What the NGC image has for Python besides the standard library is numpy and torch; these are not there at all.
NOT_IN_IMAGE = ("onnx", "onnxruntime", "tritonclient", "google", "pyarrow", "typer", "rich", "yaml", "sklearn")


def _env() -> dict[str, str]:
    """This checkout first on the path (the venv's editable install may point at another one)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _liveness(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr_ensemble.serving.liveness", "--url", url, *args],
                          capture_output=True, text=True, env=_env(), timeout=60)


# --- no server --------------------------------------------------------------------------------------------------

def test_entrypoint_and_liveness_import_with_the_standard_library_only():
    blocker = (
        "import sys\n"
        f"BLOCK = {NOT_IN_IMAGE + ('numpy', 'torch')!r}\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCK: raise ImportError('not in the image: ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        "import ctr_ensemble.serving.entrypoint, ctr_ensemble.serving.liveness\n"
        "print(sorted(m for m in sys.modules if m.startswith('ctr_ensemble')))\n")
    r = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ctr_ensemble.export" not in r.stdout and "ctr_ensemble.serving.entrypoint" in r.stdout


def test_arguments_go_to_tritonserver_unchanged_and_the_key_is_redacted():
    args = production_args(KEY, repository="/m")
    a, rest = parse_args(["--local", "--max-restarts", "2", *args, "--http-port", "9100"])
    assert a.local and a.max_restarts == 2 and rest == [*args, "--http-port", "9100"]
    assert all(f in rest for f in SERVER_FLAGS)
    a, rest = parse_args(["--interval", "0.5", "--", "--local", "--x=1"])  # after '--': all tritonserver's
    assert a.interval == 0.5 and not a.local and rest == ["--local", "--x=1"]
    assert option(rest + ["--http-port", "9100"], "--http-port", "8000") == "9100"
    assert option(["--http-port=9101"], "--http-port", "8000") == "9101" and option([], "--http-port", "8000") == "8000"
    assert probe_host("0.0.0.0") == "127.0.0.1" and probe_host("10.1.2.3") == "10.1.2.3"
    redact = redactor(args, {"TRITON_ADMIN_KEY": "other-key"})
    line = redact(" ".join(args) + " other-key")
    assert KEY not in line and "other-key" not in line and line.count("***") == 3


def test_the_production_flags_are_the_base_and_a_given_flag_replaces_its_namesake(monkeypatch, capsys):
    """Kubernetes passes ``--model-repository=/models`` alone (the flags and the key's restriction come from here),
    compose the whole production_command() (keyed by its interpolation): both give tritonserver the same flags."""
    env = {"TRITON_ADMIN_KEY": KEY}
    k8s = tritonserver_args(["--model-repository=/models"], env)
    assert sorted(k8s) == sorted(production_args(KEY, env=env))
    compose = production_command()[len(ENTRYPOINT):]
    assert tritonserver_args(compose, {}) == compose  # nothing added, nothing needs the environment's key
    # the same flags; compose leaves the key and the request-size bound to its interpolation, the entrypoint fills them
    same = lambda a: a.split(":admin-key=")[0] if not a.startswith("--http-max-input-size=") else "--http-max-input-size"
    assert sorted(map(same, compose)) == sorted(map(same, k8s))
    given = ["--exit-timeout-secs=5", "--model-repository", "/m", "--log-verbose=1"]
    custom = tritonserver_args(given, env)
    assert "--exit-timeout-secs=30" not in custom and "--model-repository=/models" not in custom
    assert custom[-len(given):] == given
    assert sum(a.startswith("--exit-timeout-secs") for a in custom) == 1
    assert all(f in custom for f in SERVER_FLAGS if not f.startswith("--exit-timeout-secs"))
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    assert main(["--model-repository=/models"]) == 2  # the admin APIs are never left open
    assert "TRITON_ADMIN_KEY" in capsys.readouterr().err


def test_the_row_follows_the_metadata_and_a_refused_server_fails_liveness_in_one_line():
    meta = {"inputs": [{"name": "cat_ids", "datatype": "INT64", "shape": [-1, 3]},
                       {"name": "num", "datatype": "FP32", "shape": [-1, 2]},
                       {"name": "seq_ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "seq_len", "datatype": "INT64", "shape": [-1, 1]}]}
    rows = {i["name"]: (i["shape"], i["data"]) for i in liveness.one_row(meta)}
    assert rows == {"cat_ids": ([1, 3], [0, 0, 0]), "num": ([1, 2], [0, 0]), "seq_ids": ([1, 1], [0]),
                    "seq_len": ([1, 1], [0])}
    port = free_ports(1)[0]
    r = _liveness(f"http://127.0.0.1:{port}", "--timeout", "2")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "metadata of ctr_ensemble" in r.stderr and "refused" in r.stderr.lower()


# --- the entrypoint with the bundled tritonserver ---------------------------------------------------------------

class Entrypoint:
    """``python -m ctr_ensemble.serving.entrypoint --local`` on free ports, its stdout/stderr in files."""

    def __init__(self, repo: Path, tmp: Path, *options: str):
        self.ports = tuple(free_ports(3))
        self.http_url, self.grpc_url = f"127.0.0.1:{self.ports[0]}", f"127.0.0.1:{self.ports[1]}"
        self.out, self.err = tmp / "entrypoint.out", tmp / "entrypoint.err"
        self.cmd = local_command(repo, KEY, self.ports, "--interval", "0.5", *options)
        assert self.cmd[1:3] == list(ENTRYPOINT[1:])  # the container's module
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=_env())

    def wait_ready(self, timeout: float = 240) -> None:
        _wait(lambda: self.proc.poll() is not None or "tritonserver ready" in self.err.read_text(), timeout,
              "the entrypoint's tritonserver to be ready")
        assert self.proc.poll() is None, self.logs()

    def triton_pid(self) -> int:
        """The entrypoint's tritonserver child."""
        for p in Path("/proc").iterdir():
            try:
                stat = (p / "stat").read_text()
                exe = (p / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and exe.endswith(b"tritonserver"):
                return int(p.name)
        raise AssertionError(f"no tritonserver child of {self.proc.pid}\n{self.logs()}")

    def fusion_stub(self) -> int:
        pids = [pid for pid, model in stub_pids(self.triton_pid()).items() if "/fusion/" in model]
        assert len(pids) == 1, pids
        return pids[0]

    def logs(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def entry(tmp_path_factory, tiny_repo):
    e = Entrypoint(tiny_repo, tmp_path_factory.mktemp("entrypoint"))
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()


@pytest.mark.integration
def test_liveness_passes_on_a_healthy_server(entry):
    r = _liveness(f"http://{entry.http_url}")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert liveness.probe(entry.http_url) is None


@pytest.mark.integration
def test_a_stub_killed_under_load_is_recovered_by_the_entrypoint(entry, tiny_arrays):
    """SIGKILL the fusion stub while HTTP and gRPC users send the ensemble request: liveness fails while it is
    dead, the entrypoint restarts tritonserver, answers come back equal to before; errors and seconds measured."""
    feeds = tiny_arrays["test"].feeds(slice(0, 32))
    ref = TritonScorer(entry.http_url).infer("ctr_ensemble", feeds)["prob"]
    old = entry.triton_pid()
    with Load(SimpleNamespace(http_url=entry.http_url, grpc_url=entry.grpc_url), feeds, ref, users=4,
              protocols=("http", "grpc")) as load:
        _wait(lambda: load.ok >= 40, 60, "load to start")
        assert load.failed == [] and load.wrong == 0
        t_kill = time.monotonic()
        os.kill(entry.fusion_stub(), signal.SIGKILL)
        dead = _liveness(f"http://{entry.http_url}")  # right after the kill: the restart takes seconds
        _wait(lambda: load.failed_at and any(t > load.failed_at[0] for t in load.ok_after), 120,
              "a correct answer after the outage")
        t_back = next(t for t in load.ok_after if t > load.failed_at[0])
        _wait(lambda: sum(t > t_back for t in load.ok_after) >= 20, 60, "answers after the recovery")
    recovery_s, errors = t_back - t_kill, len(load.failed)
    print(f"\nentrypoint, stub killed: {errors} failed requests during the outage, first correct answer "
          f"{recovery_s:.1f} s after the kill; {load.ok} correct answers in all, {load.wrong} wrong")
    assert dead.returncode == 1 and len(dead.stderr.strip().splitlines()) == 1, (dead.returncode, dead.stderr)
    assert "inference of one row" in dead.stderr or "metadata" in dead.stderr
    assert load.wrong == 0 and errors > 0 and recovery_s < 90
    assert entry.proc.poll() is None and entry.triton_pid() != old
    _wait(lambda: "restarted tritonserver after" in entry.err.read_text(), 30, "the entrypoint's restart line")
    logs = entry.err.read_text()
    assert "backend stub died" in logs and "fusion" in logs and "restarted tritonserver after" in logs
    assert _liveness(f"http://{entry.http_url}").returncode == 0
    for protocol, url in (("http", entry.http_url), ("grpc", entry.grpc_url)):
        out = TritonScorer(url, protocol).infer("ctr_ensemble", feeds)["prob"]
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert KEY not in entry.logs() and "admin-key=***" in logs


@pytest.mark.integration
def test_sigterm_stops_the_server_and_its_stubs_and_exits_0(entry):
    triton = entry.triton_pid()
    stubs = stub_pids(triton)
    assert stubs
    assert entry.stop() == 0, entry.logs()
    _wait(lambda: not _live_in_group(triton), 30, "tritonserver's process group (stubs included) to be gone")
    assert not any(Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                   for p in [triton, *stubs])
    assert "SIGTERM: stopping tritonserver" in entry.err.read_text() and KEY not in entry.logs()


@pytest.mark.integration
def test_when_supervision_gives_up_the_entrypoint_exits_1(tmp_path, tiny_repo):
    """No restart budget (--max-restarts 0): a dead stub ends the entrypoint with exit 1 and the reason, for the
    container runtime's restart policy; nothing of the server is left."""
    e = Entrypoint(tiny_repo, tmp_path, "--max-restarts", "0", "--liveness-interval", "0")
    try:
        e.wait_ready()
        triton = e.triton_pid()
        os.kill(e.fusion_stub(), signal.SIGKILL)
        e.proc.wait(60)
    finally:
        code = e.stop()
    assert code == 1, e.logs()
    assert "giving up: 0 restarts" in e.err.read_text() and "backend stub died" in e.err.read_text()
    _wait(lambda: not _live_in_group(triton), 30, "tritonserver's process group to be gone")
    assert KEY not in e.logs()


@pytest.mark.integration
def test_a_server_that_cannot_start_exits_1(tmp_path):
    e = Entrypoint(tmp_path / "missing", tmp_path, "--ready-timeout", "60")  # no such repository
    try:
        e.proc.wait(90)
    finally:
        code = e.stop()
    assert code == 1 and "tritonserver did not start" in e.err.read_text(), e.logs()
    assert KEY not in e.logs()


@pytest.mark.integration
def test_a_deploy_restarts_nothing_and_the_new_releases_stub_is_watched(tmp_path, tiny_repo, new_export, tiny_arrays):
    """`deploy` unloads the previous release, whose stubs then exit: the entrypoint's liveness check still passes,
    so it does not restart tritonserver. The new release's fusion stub, started after readiness, is watched:
    killed, it is restarted, and the restarted server serves the new release."""
    from ctr_ensemble.serving import deploy as dep

    repo = tmp_path / "served"
    shutil.copytree(tiny_repo, repo)
    e = Entrypoint(repo, tmp_path)
    try:
        e.wait_ready()
        feeds = tiny_arrays["test"].feeds(slice(0, 32))
        before = TritonScorer(e.http_url).infer("ctr_ensemble", feeds)["prob"]
        triton = e.triton_pid()
        assert dep.deploy(new_export, repo, e.http_url, KEY)["release"] == 2
        after = TritonScorer(e.http_url).infer("ctr_ensemble", feeds)["prob"]
        assert np.abs(after - before).max() > 1e-4
        _wait(lambda: not any(m.endswith("/fusion/1/model.py") for m in stub_pids(triton).values()), 60,
              "the previous release's fusion stub to exit")
        new = [pid for pid, m in stub_pids(triton).items() if "/fusion-r2/" in m]
        assert new  # (one, or for a moment two while Triton finishes the load)
        time.sleep(3)  # several process checks (every 0.5 s) after the old stubs exited
        assert e.triton_pid() == triton and "restarted tritonserver" not in e.err.read_text(), e.err.read_text()
        assert "backend stub exited" in e.err.read_text() and "no restart" in e.err.read_text()
        for pid in new:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # the second one was the load's and has gone already
                pass
        _wait(lambda: "restarted tritonserver after" in e.err.read_text(), 120, "the restart after the kill")
        assert "fusion-r2" in e.err.read_text().split("restarted tritonserver after")[1].splitlines()[0]
        out = TritonScorer(e.http_url).infer("ctr_ensemble", feeds)["prob"]
        np.testing.assert_allclose(out, after, atol=1e-5, rtol=0)  # the restart serves the current release
    finally:
        assert e.stop() == 0, e.logs()
    assert KEY not in e.logs()

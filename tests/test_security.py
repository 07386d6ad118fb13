"""Admin APIs need the key (HTTP 403 / gRPC UNAVAILABLE without it), no request can load models,
the local server listens on 127.0.0.1 only, and the gateway config lets only inference through, bounded."""

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from ctr_ensemble.serving.server import TritonServer, admin_headers, default_admin_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
ADMIN_PATHS = [("GET", "/v2/models/stats"), ("GET", "/v2/models/deepfm/config"), ("POST", "/v2/repository/index"),
               ("GET", "/v2/logging"), ("GET", "/v2/trace/setting"), ("GET", "/v2/systemsharedmemory/status")]


def _http(server, method, path, headers=None, body=b""):
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body if method == "POST" else None,
                                 headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_default_key_comes_from_the_environment_or_is_random(monkeypatch):
    monkeypatch.setenv("TRITON_ADMIN_KEY", "from-env")
    assert default_admin_key() == "from-env" and TritonServer("x").admin_key == "from-env"
    monkeypatch.delenv("TRITON_ADMIN_KEY")
    a, b = default_admin_key(), default_admin_key()
    assert a != b and len(a) >= 24


@pytest.mark.parametrize("method,path", ADMIN_PATHS)
def test_http_admin_apis_need_the_key(server, method, path):
    assert server.admin_key  # the shared test server runs with the default: restricted
    assert _http(server, method, path)[0] == 403
    assert _http(server, method, path, {"admin-key": "wrong"})[0] == 403
    assert _http(server, method, path, admin_headers(server.admin_key, "http"))[0] == 200


def test_grpc_admin_apis_need_the_key_and_inference_stays_open(server, tiny_arrays):
    client = tgrpc.InferenceServerClient(server.grpc_url)
    for call in (lambda h: client.get_inference_statistics(headers=h), lambda h: client.get_model_config("deepfm", headers=h),
                 lambda h: client.get_model_repository_index(headers=h)):
        with pytest.raises(InferenceServerException) as err:
            call(None)
        assert "UNAVAILABLE" in str(err.value.status()) and "restricted" in err.value.message()
        call(admin_headers(server.admin_key, "grpc"))
    assert client.is_model_ready("ctr_ensemble") and client.get_model_metadata("deepfm").name == "deepfm"
    client.close()


def test_only_the_admin_key_can_load_or_unload_models(server):
    """Explicit model control (what `deploy` uses) is an admin API: without the key nothing loads or unloads."""
    for action in ("load", "unload"):
        for headers in ({}, {"admin-key": "wrong"}):
            status, body = _http(server, "POST", f"/v2/repository/models/deepfm/{action}", headers, b"{}")
            assert status == 403 and b"restricted" in body, (action, status, body)
    assert _http(server, "GET", "/v2/models/deepfm/ready")[0] == 200  # still loaded
    # With the key a reload of the ensemble goes through (what `deploy` does at its switch), and it keeps serving.
    status, body = _http(server, "POST", "/v2/repository/models/ctr_ensemble/load", admin_headers(server.admin_key, "http"), b"{}")
    assert status == 200, body
    assert _http(server, "GET", "/v2/models/ctr_ensemble/ready")[0] == 200


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of ``pids`` holds (/proc/net/tcp{,6})."""
    import ipaddress
    import os

    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr, port = local.split(":")
                raw = bytes.fromhex(addr)  # little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                ip = getattr(ip, "ipv4_mapped", None) or ip  # gRPC listens on ::ffff:127.0.0.1 (IPv4-mapped)
                out.add((str(ip), int(port, 16)))
    return out


def test_local_server_listens_on_loopback_only(server):
    """The sockets tritonserver (and its stubs) actually listen on, read from the kernel: its three ports,
    each on 127.0.0.1 only; and model control stays off."""
    from tests.waits import live_in_group

    sockets = _listening({server.pid, *live_in_group(server.pid)})
    assert {p for _, p in sockets} == {server.http_port, server.grpc_port, server.metrics_port}, sockets
    assert {a for a, _ in sockets} == {"127.0.0.1"}, sockets
    assert "--model-control-mode=explicit" in server.command(server.repository)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (the gateway config is checked where it is)")
def test_gateway_forwards_only_inference_and_bounds_the_body(server, tmp_path, tiny_arrays):
    """deploy/gateway/nginx.conf, pointed at the local server: inference, health and metadata pass on both
    protocols (answers equal to the direct ones); admin routes and metrics are 403; a body over
    client_max_body_size is 413 before it reaches Triton."""
    import subprocess

    import numpy as np

    from ctr_ensemble.serving.client import TritonScorer
    from ctr_ensemble.serving.server import free_ports
    from tests.waits import wait_for

    http_port, grpc_port = free_ports(2)
    conf = (ROOT / "deploy" / "gateway" / "nginx.conf").read_text()
    conf = (conf.replace("127.0.0.1:8000", server.http_url).replace("127.0.0.1:8001", server.grpc_url)
            .replace("listen 8080;", f"listen 127.0.0.1:{http_port};")
            .replace("listen 8081 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
            .replace("pid /tmp/ctr-gateway-nginx.pid;", f"pid {tmp_path / 'nginx.pid'};"))
    assert "client_max_body_size 8m;" in conf
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(["nginx", "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _http_port_open(http_port) and _http_port_open(grpc_port), 20, "nginx to listen")
        feeds = tiny_arrays["test"].feeds(slice(0, 256))
        direct = TritonScorer(server.http_url).infer("ctr_ensemble", feeds)["prob"]
        big = {k: np.repeat(v, 160, 0) for k, v in feeds.items()}  # 40,960 rows: ~10 MB binary
        for protocol, url in (("http", f"127.0.0.1:{http_port}"), ("grpc", f"127.0.0.1:{grpc_port}")):
            scorer = TritonScorer(url, protocol)
            assert scorer.client.is_server_ready() and scorer.client.is_model_ready("ctr_ensemble")
            np.testing.assert_array_equal(scorer.infer("ctr_ensemble", feeds)["prob"], direct)
            with pytest.raises(Exception, match="413"):
                scorer.infer("ctr_ensemble", big)
            scorer.close()
        for _, path in ADMIN_PATHS:
            assert _http_gateway(http_port, path) == 403, path
        assert _http_gateway(http_port, "/metrics") == 403
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for call in (lambda: client.get_model_config("deepfm"), client.get_inference_statistics, client.get_model_repository_index):
            with pytest.raises(InferenceServerException, match="403"):
                call()
        client.close()
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


def _http_port_open(port):
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_gateway(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

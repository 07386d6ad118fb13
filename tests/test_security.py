"""Admin APIs need the key (HTTP 403 / gRPC UNAVAILABLE without it), no request can load models,
and the local server listens on 127.0.0.1 only."""

import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from ctr_ensemble.serving.server import TritonServer, admin_headers, default_admin_key

pytestmark = pytest.mark.integration
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


def test_local_server_binds_to_loopback(server):
    cmd = " ".join(server.command(server.repository))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                 "--model-control-mode=explicit"):
        assert flag in cmd

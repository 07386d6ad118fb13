"""An HTTP front for the local tritonserver that refuses the requests it would crash on, before it sees them.

Triton 2.51 (the ``nvidia-pytriton`` 0.7.0 binary) allocates an HTTP JSON request's inputs from their
*declared* shapes before it compares them with the data, so one small body declaring
``[1000000000, 26]`` INT64 aborts the whole server (std::bad_alloc; ``tests/test_fuzz.py``). It also has
no ``--http-max-input-size``. Later releases check both themselves (docs/serving.md); for 2.51, ``serve``
puts this process on the public HTTP port and Triton's own HTTP port on loopback.

Checks, on ``POST /v2/models/<name>[/versions/<v>]/infer`` only (everything else is passed through):

* the body is at most ``--max-input-size`` bytes (default 64 MiB, Triton's later default): else 413;
* the JSON header (the whole body, or its first ``Inference-Header-Content-Length`` bytes) parses as JSON;
* every input's ``shape`` is a list of non-negative integers whose product is at most the body's length.
  Each element takes at least one byte of the body in every encoding (a JSON number and its comma, a
  binary INT8/BOOL byte, a BYTES length prefix), so a request that declares more cannot be well formed.

A refusal is Triton's own error form, ``{"error": "..."}`` with status 400 (413 for size), naming the input,
its declared shape and what was expected. Requests that pass are forwarded byte for byte over a pool of
keep-alive connections; answers come back unchanged. gRPC is not fronted: its messages carry the data,
and Triton checks their sizes (``--grpc-max-message-size`` is not needed for this bug).

Run: ``python -m ctr_ensemble.serving.guard --listen 0.0.0.0:8000 --upstream 127.0.0.1:18000``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import subprocess
import sys
import tempfile
import time
from http import HTTPStatus

from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving.server import free_ports

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")
DEFAULT_MAX_INPUT_SIZE = 64 * 2**20  # bytes; Triton's --http-max-input-size default from the release that added it
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


def check_infer_body(body: bytes, header_length: str | None, max_input_size: int) -> tuple[int, str] | None:
    """(status, message) when an inference request must be refused, else None."""
    if len(body) > max_input_size:
        return 413, f"request body of {len(body)} bytes exceeds the limit of {max_input_size} bytes (--max-input-size)"
    head = body
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            return 400, (f"Inference-Header-Content-Length is {header_length!r}; expected an integer between 0 and the "
                         f"body's {len(body)} bytes")
        head = body[:n]
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        return 400, f"the request's JSON header does not parse: {e}"
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list):
        return 400, "the request's JSON header has no \"inputs\" list"
    for i, inp in enumerate(inputs):
        name = inp.get("name", f"#{i}") if isinstance(inp, dict) else f"#{i}"
        shape = inp.get("shape") if isinstance(inp, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return 400, f"input {name!r}: shape {shape!r}; expected a list of non-negative integers"
        elements = math.prod(shape)
        if elements > len(body):
            return 400, (f"input {name!r} declares shape {shape} ({elements} elements), more than the request's "
                         f"{len(body)} bytes can hold (every element takes at least one byte)")
    return None


class Guard:
    """The WSGI application: check, then forward to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], max_input_size: int = DEFAULT_MAX_INPUT_SIZE,
                 concurrency: int = 64, timeout: float = 600.0):
        from geventhttpclient import HTTPClient

        self.max_input_size = max_input_size
        self.client = HTTPClient(*upstream, concurrency=concurrency, connection_timeout=10.0, network_timeout=timeout)

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        length = environ.get("CONTENT_LENGTH")
        if length and not length.isdigit():
            return _error(start_response, 400, f"Content-Length is {length!r}; expected a byte count")
        # without a length (chunked) read one byte past the limit, so that an oversized body is seen as one
        body = environ["wsgi.input"].read(min(int(length), self.max_input_size + 1) if length
                                          else self.max_input_size + 1)
        if len(body) > self.max_input_size or (length and int(length) > self.max_input_size):
            return _error(start_response, 413, f"request body of {length or 'more than ' + str(len(body) - 1)} bytes "
                                               f"exceeds the limit of {self.max_input_size} bytes (--max-input-size)")
        if method == "POST" and INFER_PATH.match(path):
            refused = check_infer_body(body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"), self.max_input_size)
            if refused is not None:
                return _error(start_response, *refused)
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_") and k[5:].replace("_", "-").lower() not in HOP_BY_HOP}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        headers["Content-Length"] = str(len(body))
        uri = path + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        try:
            resp = self.client.request(method, uri, body=body, headers=headers)
            payload = resp.read()
            status, out = resp.status_code, [(k, v) for k, v in resp.items() if k.lower() not in HOP_BY_HOP]
            resp.release()
        except OSError as e:  # upstream down (e.g. being restarted by the supervisor)
            return _error(start_response, 503, f"tritonserver is not reachable: {e}")
        start_response(_status_line(status), out + [("Content-Length", str(len(payload)))])
        return [payload]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:  # a code Python does not name: pass it on without a phrase
        return f"{status} Status"


def _error(start_response, status: int, message: str):
    payload = json.dumps({"error": message}).encode()
    start_response(_status_line(status),
                   [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


class GuardProcess:
    """The guard as a child process of ``serve`` (its own session: Ctrl-C reaches ``serve``, which stops it)."""

    def __init__(self, listen: str, upstream: str, max_input_size: int = DEFAULT_MAX_INPUT_SIZE,
                 startup_timeout: float = 30.0):
        self.listen, self.upstream = _hostport(listen), upstream
        self.max_input_size, self.startup_timeout = max_input_size, startup_timeout
        self._proc = None
        self._log = None

    @property
    def url(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    def start(self) -> "GuardProcess":
        if not self.listen[1]:
            self.listen = (self.listen[0], free_ports(1)[0])
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "ctr_ensemble.serving.guard", "--listen", self.url, "--upstream", self.upstream,
             "--max-input-size", str(self.max_input_size)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise CtrError(f"the HTTP guard on {self.url} exited at start ({self.exit_reason()})")
            if _accepts(self.listen):
                return self
            time.sleep(0.05)
        self.stop()
        raise CtrError(f"the HTTP guard on {self.url} did not accept connections within {self.startup_timeout:.0f}s")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_reason(self) -> str:
        self._log.seek(0)
        tail = self._log.read()[-2000:].decode(errors="replace").strip()
        return f"exit code {self._proc.returncode}" + (f": {tail}" if tail else "")

    def stop(self) -> None:
        if self.is_running():
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if addr[0] in ("0.0.0.0", "") else addr[0], addr[1]), timeout=1):
            return True
    except OSError:
        return False


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT the clients use")
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT of tritonserver's HTTP endpoint")
    p.add_argument("--max-input-size", type=int, default=DEFAULT_MAX_INPUT_SIZE, help="largest request body, bytes")
    a = p.parse_args(argv)
    from gevent import socket as gsocket
    from gevent.pywsgi import WSGIServer

    listener = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted sockets inherit it: a response written in two parts must not wait for the client's delayed ACK
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(a.listen)
    listener.listen(1024)
    server = WSGIServer(listener, Guard(a.upstream, a.max_input_size), log=None, error_log=sys.stderr)
    print(f"guard: http://{a.listen[0]}:{a.listen[1]} -> http://{a.upstream[0]}:{a.upstream[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

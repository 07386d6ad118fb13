"""Liveness: one row through the ensemble, not just readiness.

``/v2/health/ready`` stays 200 after the fusion model's Python stub has died (every inference then fails with
"Stub process 'fusion_0_0' is not healthy", docs/reliability.md), so a readiness probe cannot tell a serving
server from a broken one. This check asks the server for the model's metadata (open without the admin key:
``model-config`` is restricted, metadata is not), builds one valid row from it (every dimension -1 is 1: one
row, a sequence of one item; all values zero: id 0 is the OOV/padding id, numerics 0, ``seq_len`` 0 = an empty
history), sends it over HTTP (Triton's KServe v2 JSON protocol) and checks the answer is a finite probability
in [0, 1].

    python3 -m ctr_ensemble.serving.liveness [--url http://127.0.0.1:8000] [--model ctr_ensemble] [--timeout 3]

Exit 0 when it is; otherwise one line on stderr naming the check that failed, exit 1. Standard library only:
it runs in the NGC Triton container (compose healthcheck, Kubernetes livenessProbe) and inside the entrypoint's
supervisor (``--liveness-interval``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "ctr_ensemble"
PROB_OUTPUT = "prob"
_ZERO = {"BOOL": False, "BYTES": ""}  # every numeric datatype: 0


class LivenessError(Exception):
    """One failed check, said in one line."""


def _request(url: str, deadline: float, body: dict | None = None) -> dict:
    left = deadline - time.monotonic()
    if left <= 0:
        raise LivenessError("timed out")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=left) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read().decode()).get("error", "")
        except (ValueError, OSError, AttributeError):
            detail = ""
        raise LivenessError(f"HTTP {e.code}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        raise LivenessError(str(getattr(e, "reason", e)) or type(e).__name__) from None
    except ValueError:
        raise LivenessError("the answer is not JSON") from None


def one_row(metadata: dict) -> list[dict]:
    """The inference inputs of one valid row for a model's metadata (``/v2/models/<m>``)."""
    inputs = []
    for i in metadata.get("inputs") or []:
        shape = [1 if int(d) < 0 else int(d) for d in i["shape"]]
        n = math.prod(shape)
        inputs.append({"name": i["name"], "datatype": i["datatype"], "shape": shape,
                       "data": [_ZERO.get(i["datatype"], 0)] * n})
    if not inputs:
        raise LivenessError("the metadata lists no inputs")
    return inputs


def check(url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, timeout: float = 3.0) -> None:
    """Raise ``LivenessError`` (which check failed) unless one row through ``model`` gives a probability."""
    url = url if "://" in url else f"http://{url}"
    base = f"{url.rstrip('/')}/v2/models/{model}"
    deadline = time.monotonic() + timeout
    try:
        meta = _request(base, deadline)
    except LivenessError as e:
        raise LivenessError(f"metadata of {model}: {e}") from None
    outputs = [o["name"] for o in meta.get("outputs") or []]
    name = PROB_OUTPUT if PROB_OUTPUT in outputs or not outputs else outputs[0]
    try:
        answer = _request(f"{base}/infer", deadline, {"inputs": one_row(meta), "outputs": [{"name": name}]})
    except LivenessError as e:
        raise LivenessError(f"inference of one row through {model}: {e}") from None
    out = next((o for o in answer.get("outputs") or [] if o.get("name") == name), None)
    if out is None or not out.get("data"):
        raise LivenessError(f"inference of one row through {model}: no {name!r} in the answer")
    for v in out["data"]:
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise LivenessError(f"inference of one row through {model}: {name} = {v!r}, not a probability in [0, 1]")


def probe(url: str = DEFAULT_URL, model: str = DEFAULT_MODEL, timeout: float = 3.0) -> str | None:
    """``check`` as the supervisor's probe: None when live, else why not."""
    try:
        check(url, model, timeout)
    except LivenessError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ctr_ensemble.serving.liveness", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL, help=f"Triton's HTTP endpoint (default {DEFAULT_URL})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to send the row through (default {DEFAULT_MODEL})")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check (default 3)")
    a = p.parse_args(argv)
    why = probe(a.url, a.model, a.timeout)
    if why is not None:
        print(f"liveness: {a.url}: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

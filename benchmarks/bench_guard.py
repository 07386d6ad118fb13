"""``make bench-guard``: what `serve`'s HTTP guard (serving/guard.py) costs per request, direct vs guarded.

One tritonserver, its HTTP port on loopback, and the guard in front of it, as `serve` runs them; the same
requests (held-out rows, batch 1 and 64, one client, keep-alive) go to both ports in alternating rounds, so
load on the machine hits both alike. Prints and writes ``guard.md`` / ``guard.csv`` (stamped) to --docs.
Repository: --repository (default ``model_repository`` from ``make demo``); without one, a small one is
trained and exported here first (synthetic data, 1 epoch per member).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cli, cpu_name, md_table, stamp, write_report  # noqa: E402


def small_repository(work: Path) -> tuple[Path, Path]:
    repo, data = work / "model_repository", work / "data"
    if not (repo / "ctr_ensemble").exists():
        cli("data", "synth", "--out", str(data), "--train-rows", "20000", "--val-rows", "4000", "--test-rows", "4000",
            quiet=True)
        cli("data", "fit", "--train", str(data / "train.tsv"), "--out", str(work / "spec.json"), quiet=True)
        cks = []
        for m in ("deepfm", "dcnv2"):
            cli("train", "--model", m, "--train", str(data / "train.tsv"), "--val", str(data / "val.tsv"),
                "--spec", str(work / "spec.json"), "--out", str(work / f"{m}.pt"), "--epochs", "1", quiet=True)
            cks += ["--checkpoint", str(work / f"{m}.pt")]
        cli("export", *cks, "--repository", str(repo), quiet=True)
    return repo, data / "test.tsv"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--test", type=Path, default=ROOT / "artifacts" / "demo" / "data" / "test.tsv")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench_guard")
    p.add_argument("--docs", type=Path, default=None)
    p.add_argument("--requests", type=int, default=400, help="per (model, batch, path), in rounds of 50")
    a = p.parse_args()
    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.data.spec import FeatureSpec
    from ctr_ensemble.serving.client import TritonScorer
    from ctr_ensemble.serving.guard import GuardProcess
    from ctr_ensemble.serving.server import TritonServer

    repo, test = a.repository, a.test
    if not (repo / "ctr_ensemble").exists() or not test.is_file():
        print("no demo repository: training a small one", flush=True)
        repo, test = small_repository(a.work)
    spec = FeatureSpec.load(next(repo.glob("*/feature_spec.json")))
    rows = encode_file(test, spec)
    rows_out = []
    with TritonServer(repo, http_host="127.0.0.1") as server:
        guard = GuardProcess("127.0.0.1:0", server.http_url).start()
        try:
            for model in ("deepfm", "ctr_ensemble"):
                for batch in (1, 64):
                    feeds = rows.feeds(slice(0, batch))
                    times = {"direct": [], "guarded": []}
                    scorers = {"direct": TritonScorer(server.http_url), "guarded": TritonScorer(guard.url)}
                    for s in scorers.values():
                        s.infer(model, feeds)  # warm up the connection and the model
                    for _ in range(max(1, a.requests // 50)):
                        for path, s in scorers.items():
                            for _ in range(50):
                                t0 = time.perf_counter()
                                s.infer(model, feeds)
                                times[path].append((time.perf_counter() - t0) * 1e3)
                    for s in scorers.values():
                        s.close()
                    d, g = (np.percentile(times[k], [50, 99]) for k in ("direct", "guarded"))
                    rows_out.append({"model": model, "batch": batch, "requests": len(times["direct"]),
                                     "direct_p50_ms": round(d[0], 3), "guarded_p50_ms": round(g[0], 3),
                                     "added_p50_ms": round(g[0] - d[0], 3), "direct_p99_ms": round(d[1], 3),
                                     "guarded_p99_ms": round(g[1], 3)})
                    print(rows_out[-1], flush=True)
        finally:
            guard.stop()
    st = stamp()
    cols = ["model", "batch", "requests", "direct_p50_ms", "guarded_p50_ms", "added_p50_ms", "direct_p99_ms",
            "guarded_p99_ms"]
    text = "\n".join([
        "# What `serve`'s HTTP guard costs (`make bench-guard`)", "",
        f"- commit {st['commit']}, {st['date']}; machine: {cpu_name()}, {os.cpu_count()} cores",
        f"- repository: {repo.name if repo == a.repository else 'a small one trained here (synthetic, 1 epoch)'}; "
        "one tritonserver 2.51, HTTP with tritonclient (binary tensors, keep-alive), one client, alternating "
        "rounds of 50 requests direct (Triton's loopback port) and guarded (serving/guard.py in front)", "",
        md_table(rows_out, cols), ""])
    write_report([a.work, a.docs], {"guard.md": text}, {"guard.csv": rows_out})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check`: what can only be measured on a GPU, in one bounded run, written to ``gpu_report.md`` + CSVs.

Made for the lent GPU machine (README, *GPU check*): Python 3.12, torch with CUDA, numpy 2.x, no network,
nothing installed for this project. It runs from the working tree with that machine's python3; the
wheels ``make gpu-wheels`` carried there are installed into a ``--target`` folder first (only those whose
module is not importable already), which goes on ``PYTHONPATH``.

Sections, each with its own time budget inside a hard overall deadline (8 minutes); a section that fails
is recorded with its error and the run goes on; the exit code is 0 only when every section passed:

1. environment: commit, date, machine (nvidia-smi), versions; the carried wheels installed; every module
   the serving path imports is importable.
2. dlpack: the served Python models use no ``as_numpy()`` / ``pb_utils.Tensor(name, ndarray)`` where numpy
   2 breaks them (static; section 4 is the same check at run time, on that machine's numpy).
3. cuda_tests: the tests that skip without CUDA (found by their skip mark), run with pytest.
4. serving: a small repository per fusion mode (NE, mean, the fitted fusion when this version has it, the
   collaborative head) with the fusion on KIND_GPU, served by the local ``tritonserver``; the ensemble's
   outputs over HTTP and gRPC against the CPU (PyTorch) reference, <= 1e-5 (``evaluate``); the fusion
   model's compute time per request at batch 1/64/1024/4096 from Triton's metrics, on KIND_GPU and on
   KIND_CPU (the same repository reconfigured), as rows/s.
5. train: training throughput of the reference DCNv2 (26 fields x 100k ids x 16, cross x3 + MLP 400^3)
   on CUDA from prepared shards in host memory through the real loader (pinned, prefetched), batch
   4096/16384/65536: dense Adam, sparse Adam, sparse Adagrad, bf16 autocast, torch.compile; and the
   plain-PyTorch baseline (``baseline_dcnv2.py``) at the same batches.
6. quality: the same DeepFM trained on CPU and on CUDA from the same shards and seed: val AUC within 0.002.

Targets (goals for later work, reported as measured, not part of the exit code): training >= 5 M
samples/s at batch 4096 for the reference shape end to end from host data; GPU fusion >= 10x the CPU
fusion's rows/s at batch 4096.

``--dry-run`` (``GPU_CHECK_DRY=1``): everything that runs without CUDA: no install, the fusion on KIND_CPU
(served parity for every mode, CPU fusion timing), the CUDA tests run (and skip), training and quality on
CPU at tiny sizes; the CUDA parts say "skipped (dry run)". ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_wheels  # noqa: E402  (stdlib only)

DEADLINE_S = 480.0  # the whole run, hard
BUDGET_S = {"environment": 60, "dlpack": 5, "cuda_tests": 100, "serving": 150, "train": 130, "quality": 80}
QUALITY_TOL = 0.002
FUSION_BATCHES = (1, 64, 1024, 4096)
TARGET_TRAIN = 5e6  # samples/s, reference DCNv2 at batch 4096 from host data (plain PyTorch on an H100: 1.04 M/s)
TARGET_FUSION = 10.0  # GPU fusion rows/s over the CPU fusion's at batch 4096
SKIP_DRY = "skipped (dry run)"
TINY_MEMBERS = {"deepfm": {"embedding_dim": 4, "hidden": [16]},
                "dcnv2": {"embedding_dim": 4, "hidden": [16], "cross_layers": 2}}


class DeadlineReached(Exception):
    pass


class Section:
    """One section's outcome: ``status`` pass | fail | error | skipped (...) | not run (...)."""

    def __init__(self, name: str):
        self.name, self.status, self.seconds, self.detail, self.md = name, "pass", 0.0, "", []

    def fail(self, detail: str) -> None:
        self.status = "fail"
        self.detail = "; ".join(filter(None, [self.detail, detail]))


class Check:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline
        self.out, self.work = args.out, args.work
        self.sections: list[Section] = []
        self.header: list[str] = []
        self.targets: list[dict] = []
        self.servers: list = []  # running TritonServers, stopped by the watchdog too
        self.children: list[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.device = "cpu" if self.dry else "cuda"
        self.kind = "cpu" if self.dry else "gpu"

    # -------------------------------------------------------------------------------------- plumbing
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def budget_end(self, name: str) -> float:
        return min(time.monotonic() + BUDGET_S[name] * self.args.budget_scale, self.deadline)

    def check_time(self, end: float, what: str) -> None:
        if time.monotonic() > end:
            raise DeadlineReached(f"time budget used up before {what}")

    def run_section(self, name: str, fn) -> Section:
        sec = Section(name)
        self.sections.append(sec)
        t = time.monotonic()
        if self.remaining() < 5:
            sec.status, sec.detail = "not run", f"the {self.args.deadline:.0f} s deadline was reached"
        else:
            try:
                fn(sec, self.budget_end(name))
            except DeadlineReached as e:
                sec.fail(str(e))
            except Exception as e:  # recorded; the run goes on
                sec.status = "error"
                sec.detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                sec.md += ["", "```", traceback.format_exc()[-3000:], "```"]
        sec.seconds = time.monotonic() - t
        print(f"[gpu-check] {name}: {sec.status} ({sec.seconds:.0f} s) {sec.detail}", flush=True)
        self.write_report()
        return sec

    def csv(self, name: str, rows: list[dict], cols: list[str] | None = None) -> None:
        cols = cols or list(dict.fromkeys(k for r in rows for k in r))
        with open(self.out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, text=True, start_new_session=True, **kw)
        self.children.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.children:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except OSError:
                    pass
        for s in list(self.servers):
            try:
                s.stop(timeout=5)
            except Exception:
                pass

    def write_report(self, note: str = "") -> None:
        ok = self.passed()
        md = ["# GPU check", "", *self.header, f"- wall time: {time.monotonic() - self.t0:.0f} s "
              f"(deadline {self.args.deadline:.0f} s)", f"- result: {'all sections passed' if ok else 'NOT all passed'}"
              + (" (dry run: nothing on CUDA was run or measured)" if self.dry else ""), *([f"- {note}"] if note else []),
              "", "## Summary", "", md_table([{"section": s.name, "status": s.status, "seconds": f"{s.seconds:.0f}",
                                               "detail": s.detail} for s in self.sections],
                                              ["section", "status", "seconds", "detail"]), ""]
        if self.targets:
            md += ["## Targets (goals for later work; not part of the exit code)", "",
                   md_table(self.targets, ["target", "goal", "measured", "met"]), ""]
        for s in self.sections:
            if s.md:
                md += [f"## {s.name}", "", *s.md, ""]
        (self.out / "gpu_report.md").write_text("\n".join(md))
        self.csv("summary.csv", [{"section": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                                  "detail": s.detail} for s in self.sections], ["section", "status", "seconds", "detail"])

    def passed(self) -> bool:
        return all(s.status == "pass" or s.status.startswith("skipped") for s in self.sections)

    # ----------------------------------------------------------------------------------- 1. environment
    def environment(self, sec: Section, end: float) -> None:
        try:
            self.check_modules(sec)
        finally:
            self.stamp()

    def check_modules(self, sec: Section) -> None:
        import importlib.metadata as md

        rows = []
        if self.dry and not self.args.install:
            sec.md.append(f"- wheels: not installed ({SKIP_DRY}: this Python's own packages are used)")
        else:
            rows += self.install_wheels(sec)
        missing = []
        for dist, module, where in ([(d, m, "carried") for d, (_, m) in gpu_wheels.WHEELS.items()]
                                    + [(d, m, "machine") for d, m in gpu_wheels.MACHINE_HAS.items()]):
            found = importable(module)
            try:
                version = md.version(dist)
            except md.PackageNotFoundError:
                version = ""
            rows.append({"what": "module", "name": module, "distribution": dist, "expected from": where,
                         "version": version, "status": "ok" if found else "MISSING"})
            if not found:
                missing.append(module)
        self.csv("environment.csv", rows, ["what", "name", "distribution", "expected from", "version", "status"])
        sec.md += ["", md_table(rows, ["what", "name", "distribution", "expected from", "version", "status"])]
        if missing:
            sec.fail(f"not importable: {', '.join(missing)}")

    def install_wheels(self, sec: Section) -> list[dict]:
        """pip install --no-deps --no-index --target (or unzip) the carried wheels whose module is not there yet."""
        import importlib

        folder = self.args.wheels
        index = json.loads((folder / "wheels.json").read_text()) if (folder / "wheels.json").is_file() else {"wheels": []}
        site = self.args.site
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        todo, rows = [], []
        for w in index["wheels"]:
            have = importable(w["module"])
            rows.append({"what": "wheel", "name": w["wheel"], "distribution": w["distribution"],
                         "expected from": "carried", "version": "", "status": "already on the machine" if have else "installed"})
            if not have:
                todo.append(folder / w["wheel"])
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        if not index["wheels"]:
            sec.fail(f"{folder}/wheels.json not found: run `make gpu-wheels` here and carry {folder}")
        elif index.get("python") != py:
            sec.fail(f"the wheels in {folder} are for Python {index.get('python')}, this is {py}")
            todo = []
        if todo and sec.status == "pass":
            t = time.monotonic()
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
                   *map(str, todo)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            how = "pip install --no-deps --no-index --target"
            if r.returncode != 0:  # no pip on that Python: a wheel is a zip
                how = f"unzip (pip failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:150]})"
                for whl in todo:
                    unzip_wheel(whl, site)
            sec.md.append(f"- {len(todo)} wheels into `{site}` by {how} in {time.monotonic() - t:.1f} s")
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
        self.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), self.env.get("PYTHONPATH", "")])
        return rows

    def stamp(self) -> None:
        import numpy
        import onnxruntime
        import torch

        commit = git(["rev-parse", "HEAD"])
        if commit:
            dirty = git(["status", "--porcelain", "--untracked-files=no"])
            commit += " (with uncommitted changes)" if dirty else ""
        else:  # the device's copy of the tree has no .git
            wheels = self.args.wheels / "wheels.json"
            built = json.loads(wheels.read_text()).get("commit") if wheels.is_file() else None
            commit = (os.environ.get("GPU_CHECK_COMMIT") or (f"{built} (no git here: the commit `make gpu-wheels` ran at)"
                                                            if built else "unknown (no git here; pass GPU_CHECK_COMMIT=<sha>)"))
        cuda = torch.cuda.is_available()
        smi = shutil.which("nvidia-smi")
        gpu = run_text([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]) if smi else ""
        self.header = [
            f"- mode: {'DRY RUN (CPU only)' if self.dry else 'GPU'}",
            f"- commit: {commit}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {platform.node()}, {cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            f"- GPU: {gpu or (torch.cuda.get_device_name(0) if cuda else 'none')}",
            f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
            f"available: {cuda}), numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__} "
            f"({', '.join(onnxruntime.get_available_providers())})",
        ]
        if smi:
            (self.out / "nvidia-smi.txt").write_text(run_text([smi]))

    # ---------------------------------------------------------------------------------------- 2. dlpack
    def dlpack(self, sec: Section, end: float) -> None:
        problems = gpu_wheels.dlpack_check()
        import numpy

        sec.md += [f"Static check of `ctr_ensemble/export/triton/*.py` (run here with numpy {numpy.__version__}): "
                   "no `as_numpy()`; `pb_utils.Tensor(name, ndarray)` only in the onnxruntime shim's numpy < 2 branch; "
                   "the fusion model moves tensors by DLPack only.", ""]
        sec.md += [f"- {p}" for p in problems] or ["- clean"]
        if problems:
            sec.fail(f"{len(problems)} numpy-2-unsafe tensor calls")

    # ------------------------------------------------------------------------------------ 3. cuda tests
    def cuda_tests(self, sec: Section, end: float) -> None:
        ids = cuda_test_ids()
        xml = self.work / "cuda_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", f"--junitxml={xml}", *ids]
        p = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            log, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            log, _ = p.communicate()
            sec.fail("pytest ran past the section's budget")
        rows = junit_rows(xml) if xml.is_file() else []
        self.csv("cuda_tests.csv", rows, ["test", "outcome", "seconds", "message"])
        (self.out / "cuda_tests.log").write_text(log or "")  # pytest's own output, for the failures
        tail = (log or "").strip().splitlines()[-1:] or ["(no output)"]
        sec.md += [f"`{' '.join(['pytest', *ids])}` → {tail[0]}", "", md_table(rows, ["test", "outcome", "seconds", "message"])]
        bad = [r["test"] for r in rows if r["outcome"] in ("failed", "error")]
        if bad or (p.returncode not in (0, 5) and not rows):
            sec.fail(f"failed: {', '.join(bad) or 'pytest exit ' + str(p.returncode)}")
        if self.dry:
            sec.status = SKIP_DRY if sec.status == "pass" else sec.status
            sec.detail = sec.detail or f"{len(rows)} CUDA tests found; they skip without CUDA"
        elif any(r["outcome"] == "skipped" for r in rows):
            sec.fail("CUDA tests skipped on the GPU machine")

    # ------------------------------------------------------------------------------------- 4. serving
    def serving(self, sec: Section, end: float) -> None:
        from ctr_ensemble.layers import fusion

        work = self.work / "serving"
        shutil.rmtree(work, ignore_errors=True)
        data, cks, collab_ck = self.serving_members(work)
        modes = list(fusion.FUSION_MODES)
        sec.md.append(f"Fusion modes of this version (`layers.fusion.FUSION_MODES`): {', '.join(modes)}."
                      + ("" if "fitted" in modes else " The fitted fusion is not in this version: skipped."))
        parity, timing, errors = [], [], []
        try:
            for mode in modes:
                self.check_time(end, f"mode {mode}")
                try:
                    self.serve_mode(mode, work, data, cks if mode != fusion.COLLABORATIVE else None, collab_ck, end,
                                    parity, timing)
                except DeadlineReached:
                    raise
                except Exception as e:  # one mode's failure is recorded; the other modes still run
                    parity.append({"mode": mode, "pass": "NO", "error": f"{type(e).__name__}: {str(e).strip()[:300]}"})
                    errors.append(f"{mode}: {traceback.format_exc()[-3000:]}")
        finally:
            self.serving_report(sec, parity, timing)
            sec.md += [f"```\n{e}\n```" for e in errors]

    def serve_mode(self, mode: str, work: Path, data: dict, cks, collab_ck, end: float, parity: list, timing: list) -> None:
        """Export ``mode`` with the fusion on this run's kind, serve it, check parity; time the fusion there and,
        on the GPU, on the same repository reconfigured to KIND_CPU (both servers started together)."""
        from ctr_ensemble.export import repository as R
        from ctr_ensemble.serving.server import TritonServer

        repo = work / "repos" / f"{mode}-{self.kind}"
        opt = R.RepoOptions(max_batch_size=max(FUSION_BATCHES), fusion_mode=mode, fusion_kind=self.kind)
        if mode == "fitted":  # as `export --fit-fusion`: τ, priors and space fitted on the validation rows
            from ctr_ensemble.export import fusion_fit

            rule, _ = fusion_fit.fit_for_export(cks, data["val"])
            opt = opt.with_rule(rule)
        rows = data["val"].feeds(slice(0, 256))
        R.write_repository(cks or [], repo, opt, parity_rows=rows, collab=None if cks else collab_ck)
        kind_in_config = "KIND_GPU" if "KIND_GPU" in (repo / R.FUSION_NAME / "config.pbtxt").read_text() else "KIND_CPU"
        repos = {self.kind: repo}
        if self.kind != "cpu":
            repos["cpu"] = work / "repos" / f"{mode}-cpu"
            R.reconfigure_repository(repo, repos["cpu"], R.RepoOptions(**{**R.read_manifest(repo)["options"],
                                                                           "fusion_kind": "cpu"}))
        with ExitStack() as stack:
            servers = self.start_servers(TritonServer, repos, end)
            for s in servers.values():
                stack.callback(self.stop_server, s)
            parity += self.served_parity(mode, kind_in_config, data["test_file"], repo, servers[self.kind])
            for kind, s in servers.items():
                self.check_time(end, f"fusion timing {mode}/{kind}")
                timing += fusion_timing(mode, kind, s, repos[kind], self.args.requests)

    def serving_report(self, sec: Section, parity: list[dict], timing: list[dict]) -> None:
        from ctr_ensemble.metrics import PARITY_TOL

        pcols = ["mode", "fusion_kind", "protocol", "rows", "max_abs_diff", "fusion_max_abs_diff", "pass", "error"]
        tcols = ["mode", "fusion_kind", "batch", "requests", "compute_ms", "infer_ms", "rows_per_s"]
        self.csv("served_parity.csv", parity, pcols)
        self.csv("fusion_timing.csv", timing, tcols)
        sec.md += ["", f"### Served outputs against the CPU reference (PyTorch members + reference fusion), ≤ {PARITY_TOL:g}",
                   "", f"{self.args.parity_rows} test rows per repository, HTTP and gRPC; `max_abs_diff`: the ensemble's "
                   "prob vs the reference, `fusion_max_abs_diff`: the served fusion vs the reference fusion of what the same "
                   "server's members returned.", "", md_table(parity, pcols), "",
                   "### Fusion compute time per request (Triton's nv_inference_compute_*_duration_us of model `fusion`)", "",
                   "Requests sent to the fusion model itself (member outputs as inputs), one request at a time; compute = "
                   "input + infer + output per request; rows/s = batch / compute.", "", md_table(timing, tcols)]
        bad = [f"{r['mode']}/{r.get('protocol', '-')}" for r in parity if r["pass"] != "yes"]
        if bad:
            sec.fail(f"served parity > {PARITY_TOL:g} or failed: {', '.join(bad)}")
        if not self.dry and any(r.get("fusion_kind") not in ("KIND_GPU", None) for r in parity):
            sec.fail("a fusion config is not KIND_GPU")
        self.fusion_targets(sec, timing)

    def serving_members(self, work: Path):
        """Small synthetic data, two tiny members and a collaborative checkpoint of the same two."""
        from ctr_ensemble import models
        from ctr_ensemble.data.encode import encode_file
        from ctr_ensemble.data.fit import fit
        from ctr_ensemble.data.synth import DEFAULT_CARDINALITIES, SynthConfig, generate
        from ctr_ensemble.models import checkpoint
        from ctr_ensemble.models import ensemble
        from ctr_ensemble.training import collab, mutual
        from ctr_ensemble.training.config import TrainConfig
        from ctr_ensemble.training.member import train_member

        d = work / "data"
        generate(d, SynthConfig(seed=3, cardinalities=tuple(min(c, 300) for c in DEFAULT_CARDINALITIES),
                                splits={"train": 6000, "val": 1500, "test": self.args.parity_rows}))
        spec = fit(d / "train.tsv", min_count=2)
        data = {s: encode_file(d / f"{s}.tsv", spec) for s in ("train", "val")}
        data["test_file"] = d / "test.tsv"
        cfg = TrainConfig(epochs=1, batch_size=256, seed=1, device="cpu", max_steps=8)  # parity needs no good model
        cks = []
        for arch, over in TINY_MEMBERS.items():
            ck = train_member(arch, arch, models.make_config(arch, over), spec, data["train"], data["val"], cfg)
            cks.append(checkpoint.load(checkpoint.save(ck, work / "members" / f"{arch}.pt")))
        ccfg = collab.CollabConfig(epochs=1, batch_size=256, max_steps=8, seed=4, device="cpu",
                                   head=collab.HeadConfig(hidden=[16], tau=0.7))
        cc = collab.train_collab(mutual.members_from_archs(list(TINY_MEMBERS), TINY_MEMBERS), spec, data["train"],
                                 data["val"], ccfg)
        return data, cks, ensemble.load(ensemble.save(cc, work / "members" / "collab.pt"))

    def start_servers(self, server_cls, repos: dict[str, Path], end: float) -> dict:
        """Start one server per repository at once (their start-ups overlap), wait for all."""
        servers = {k: server_cls(r, startup_timeout=max(10.0, end - time.monotonic())) for k, r in repos.items()}
        errors: dict[str, BaseException] = {}

        def start(k):
            try:
                servers[k].start()
            except BaseException as e:
                errors[k] = e

        threads = [threading.Thread(target=start, args=(k,)) for k in servers]
        self.servers += servers.values()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for s in servers.values():
                self.stop_server(s)
            raise next(iter(errors.values()))
        return servers

    def stop_server(self, server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def served_parity(self, mode: str, kind: str, test_file: Path, repo: Path, server) -> list[dict]:
        from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate
        from ctr_ensemble.metrics import PARITY_TOL

        summary = evaluate(test_file, repo, ["torch", "triton_http", "triton_grpc"],
                           EvalTargets(server.http_url, server.grpc_url, batch_size=256))
        rows = []
        for backend in ("triton_http", "triton_grpc"):
            r = summary["ensemble"][backend]
            worst = max(r["max_abs_diff"], r["fusion_max_abs_diff"])
            rows.append({"mode": mode, "fusion_kind": kind, "protocol": backend.split("_")[1], "rows": summary["rows"],
                         "max_abs_diff": f"{r['max_abs_diff']:.3g}", "fusion_max_abs_diff": f"{r['fusion_max_abs_diff']:.3g}",
                         "pass": "yes" if worst <= PARITY_TOL else "NO"})
        return rows

    def fusion_targets(self, sec: Section, timing: list[dict]) -> None:
        at = {(r["mode"], r["fusion_kind"]): r for r in timing if r["batch"] == max(FUSION_BATCHES)}
        for mode in dict.fromkeys(r["mode"] for r in timing):
            gpu, cpu = at.get((mode, "gpu")), at.get((mode, "cpu"))
            if gpu and cpu:
                ratio = gpu["rows_per_s"] / cpu["rows_per_s"]
                measured, met = f"{ratio:.1f}x ({gpu['rows_per_s']:,.0f} vs {cpu['rows_per_s']:,.0f} rows/s)", \
                    "yes" if ratio >= TARGET_FUSION else "no"
            else:
                measured = f"CPU {cpu['rows_per_s']:,.0f} rows/s; GPU {SKIP_DRY}" if cpu else "not measured"
                met = "n/a"
            self.targets.append({"target": f"fusion {mode}: GPU rows/s ÷ CPU rows/s at batch {max(FUSION_BATCHES)}",
                                 "goal": f"≥ {TARGET_FUSION:g}x", "measured": measured, "met": met})

    # --------------------------------------------------------------------------------------- 5. train
    def train(self, sec: Section, end: float) -> None:
        a = self.args
        shards = self.work / "train_shards"
        t = time.monotonic()
        rows = write_random_shards(shards, a.ids, a.train_rows, seed=0)
        mlp = "×".join(map(str, a.train_hidden))
        sec.md.append(f"{'Reference' if not self.dry else 'Dry-run (smaller)'} shape: DCNv2, 26 fields × {a.ids:,} ids × 16, "
                      f"cross × 3 + MLP {mlp}, on {self.device}"
                      + (" (torch.compile rows: skipped (dry run), compiling takes minutes on 2 CPUs)" if self.dry else "") + "; "
                      f"{rows:,} random rows written as prepared shards (`{shards.name}`, read through the page cache: "
                      f"host memory) in {time.monotonic() - t:.1f} s; ours: the real loader (block shuffle from the "
                      "memmaps, pinned + prefetched copies on CUDA) and optimiser set-up; baseline: plain PyTorch, "
                      f"random data already on the device. {a.train_seconds:g} s timed per row after 3 warm-up steps.")
        from bench_train import REF

        config = {**REF, "hidden": a.train_hidden}
        jobs = train_jobs(self.device, a.train_batches, str(shards), a.ids, a.train_seconds, config, not self.dry)
        results = self.stream_child(["--train-child", json.dumps(jobs)], end, len(jobs))
        out = []
        for job, r in zip(jobs, results + [None] * (len(jobs) - len(results))):
            out.append({**job["label"], **(r or {"error": "not run: the section's time budget"})})
        cols = ["model", "optimizer", "amp", "compile", "batch", "device", "data", "samples_per_s", "steps", "params", "error"]
        self.csv("train_throughput.csv", out, cols)
        sec.md += ["", md_table(out, cols)]
        errors = [f"{r['model']}/{r['optimizer']}/b{r['batch']}" for r in out if r.get("error")]
        if errors:
            sec.fail(f"{len(errors)} rows without a figure: {', '.join(errors[:4])}{' …' if len(errors) > 4 else ''}")
        ours = [r for r in out if r["batch"] == 4096 and r["model"] == "ctr-ensemble dcnv2" and r.get("samples_per_s")]
        best = max(ours, key=lambda r: r["samples_per_s"], default=None)
        base = next((r for r in out if r["batch"] == 4096 and r["model"].startswith("plain") and r.get("samples_per_s")), None)
        measured = (f"{best['samples_per_s'] / 1e6:.2f} M/s ({best['optimizer']}, amp {best['amp']}, compile {best['compile']})"
                    + (f"; plain PyTorch {base['samples_per_s'] / 1e6:.2f} M/s" if base else "")) if best else "not measured"
        self.targets.append({"target": "training, reference DCNv2, batch 4096, end to end from host data",
                             "goal": f"≥ {TARGET_TRAIN / 1e6:g} M samples/s", "measured": measured + (
                                 f" ({SKIP_DRY}: CPU at {a.ids:,} ids)" if self.dry else ""),
                             "met": "n/a" if self.dry or not best else ("yes" if best["samples_per_s"] >= TARGET_TRAIN else "no")})

    def stream_child(self, argv: list[str], end: float, n: int) -> list[dict]:
        """Run this script as a child (``--train-child``); one JSON line per job, kept when the budget kills it."""
        log = open(self.work / "train_child.log", "w+")  # a file: a full stderr pipe would block the child
        p = self.popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.PIPE, stderr=log)
        got: list[dict] = []
        timer = threading.Timer(max(1.0, end - time.monotonic()), lambda: p.poll() is None and os.killpg(p.pid, 9))
        timer.start()
        try:
            for line in p.stdout:
                if line.startswith("{"):
                    got.append(json.loads(line))
        finally:
            timer.cancel()
            p.wait()
        log.seek(0)
        lines = log.read().strip().splitlines()
        (self.out / "train_child.log").write_text("\n".join(lines[-200:]) + "\n")  # warnings, compile errors
        if p.returncode != 0 and len(got) < n:
            err = (lines or [f"exit {p.returncode}"])[-1][:200]
            got.append({"error": f"child ended: {err}" if p.returncode > 0 else "killed at the time budget"})
        return got

    # ------------------------------------------------------------------------------------- 6. quality
    def quality(self, sec: Section, end: float) -> None:
        import bench_train

        a = self.args
        t = time.monotonic()
        tr, va = bench_train.ensure_quality_data(SimpleNamespace(data=self.work / "quality", quality_rows=a.quality_rows),
                                                 val_rows=a.quality_val_rows, workers=min(8, os.cpu_count() or 1))
        prep_s = time.monotonic() - t
        # the dry run: both sides on the CPU (the code path, not the comparison)
        sides = {"cpu": "cpu", "cpu (stand-in for cuda)" if self.dry else "cuda": self.device}
        cpu_threads = 1 if self.dry else max(1, (os.cpu_count() or 2) - 3)
        jobs = {side: {"kind": "quality", "threads": cpu_threads if dev == "cpu" else 2, "arch": "deepfm",
                       "train_dir": str(tr), "val_dir": str(va), "epochs": a.quality_epochs, "batch": a.quality_batch,
                       "seed": 0, "train": {"optimizer": "adam", "device": dev, **({"prefetch": 2} if dev == "cuda" else {})}}
                for side, dev in sides.items()}
        procs = {k: self.popen([sys.executable, str(HERE / "bench_train.py"), "--child", json.dumps(j)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, j in jobs.items()}
        rows = []
        for k, p in procs.items():
            try:
                out, err = p.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                out, err = p.communicate()
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if p.returncode == 0 and lines else {
                "error": (err.strip().splitlines() or [f"exit {p.returncode} (time budget?)"])[-1][:200]}
            if "error" in r:
                sec.md += [f"{k}: the end of its stderr", "```", "\n".join(err.strip().splitlines()[-30:]), "```"]
            rows.append({"device": k, **{c: r.get(c, "") for c in ("val_auc", "best_epoch", "samples_per_s", "error")}})
        self.csv("quality.csv", rows, ["device", "val_auc", "best_epoch", "samples_per_s", "error"])
        sec.md += [f"DeepFM (default config), {a.quality_rows:,} train / {a.quality_val_rows:,} val synthetic rows prepared "
                   f"in {prep_s:.0f} s, batch {a.quality_batch}, epochs {a.quality_epochs}, dense Adam, seed 0, the same "
                   "shards; the two runs side by side.", "", md_table(rows, ["device", "val_auc", "best_epoch", "samples_per_s", "error"])]
        aucs = [r["val_auc"] for r in rows if isinstance(r["val_auc"], float)]
        if len(aucs) != 2:
            sec.fail("a run gave no val AUC")
            return
        diff = abs(aucs[0] - aucs[1])
        sec.md += ["", f"|Δ val AUC| = {diff:.4f} (≤ {QUALITY_TOL} to pass)"]
        if diff > QUALITY_TOL:
            sec.fail(f"|Δ val AUC| {diff:.4f} > {QUALITY_TOL}")
        sec.detail = sec.detail or f"|Δ val AUC| {diff:.4f}"
        if self.dry:
            sec.detail += " (dry run: CPU vs CPU; the CUDA side skipped)"


# ------------------------------------------------------------------------------------------ helpers
def md_table(rows: list[dict], cols: list[str]) -> str:
    from common import md_table as table

    cells = [{k: v.replace("|", "\\|") if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    return table(cells, cols) if rows else "(none)"


def importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def git(args: list[str]) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({cmd[0]}: {e})"


def cpu_name() -> str:
    from common import cpu_name as name

    return name()


def unzip_wheel(whl: Path, site: Path) -> None:
    import zipfile

    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = Path(z.extract(info, site))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                path.chmod(mode & 0o777)


def cuda_test_ids(tests: Path = ROOT / "tests") -> list[str]:
    """pytest ids of the tests marked to skip without CUDA (``skipif(not torch.cuda.is_available(), ...)``)."""
    ids = []
    for f in sorted(tests.glob("test_*.py")):
        marked = False
        for line in f.read_text().splitlines():
            if re.match(r"\s*@pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)", line):
                marked = True
            elif marked and (m := re.match(r"\s*def (test_\w+)", line)):
                ids.append(f"{f.relative_to(ROOT)}::{m.group(1)}")
                marked = False
            elif marked and re.match(r"\s*(async\s+)?(def|class)\s", line):  # decorators may span lines
                marked = False
    return ids


def junit_rows(path: Path) -> list[dict]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
        rows.append({"test": f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}", "outcome": outcome,
                     "seconds": f"{float(case.get('time', 0)):.1f}", "message": message})
    return rows


def fusion_timing(mode: str, kind: str, server, repo: Path, requests: int) -> list[dict]:
    """Per batch size: warm-up, then ``requests`` requests straight to the fusion model; its compute time per
    request from the metrics difference, and rows/s = batch / compute time."""
    import numpy as np

    from ctr_ensemble.export.repository import FUSION_NAME, read_config
    from ctr_ensemble.serving import metrics
    from ctr_ensemble.serving.client import TritonScorer

    cfg = read_config(repo / FUSION_NAME)
    rng = np.random.default_rng(0)
    scorer = TritonScorer(server.http_url, "http")
    rows = []
    try:
        for b in FUSION_BATCHES:
            feeds = {i.name: (rng.uniform(0.02, 0.98, (b, 1)) if i.name.endswith("_prob") else
                              rng.normal(0, 1, (b, *i.dims))).astype(np.float32) for i in cfg.input}
            n = max(3, requests if b < 1024 else requests // 2)
            for _ in range(5):
                scorer.infer(FUSION_NAME, feeds, ("prob", "weights"))
            before = metrics.scrape(server.metrics_url)
            for _ in range(n):
                scorer.infer(FUSION_NAME, feeds, ("prob", "weights"))
            for _ in range(5):  # the counters of the last request may land a moment after its response
                after = metrics.scrape(server.metrics_url)
                cost = next(c for c in metrics.diff(before, after) if c.model == FUSION_NAME)
                if cost.requests >= n:
                    break
                time.sleep(0.2)
            infer_us = after[FUSION_NAME]["compute_infer_us"] - before[FUSION_NAME]["compute_infer_us"]
            rows.append({"mode": mode, "fusion_kind": kind, "batch": b, "requests": cost.requests,
                         "compute_ms": round(cost.compute_ms, 4), "infer_ms": round(infer_us / cost.requests / 1e3, 4),
                         "rows_per_s": b / (cost.compute_ms / 1e3)})
    finally:
        scorer.close()
    return rows


def write_random_shards(out: Path, ids: int, rows: int, fields: int = 26, shard_rows: int = 1 << 19, seed: int = 0) -> int:
    """A prepared folder (as ``data prepare`` writes it) of random rows of the reference shape: ``fields``
    categorical fields of ``ids`` ids (ids 1..ids-1, 0 is OOV), no numeric field, random labels."""
    import numpy as np

    from bench_train import _reference_spec
    from ctr_ensemble.data.prepared.manifest import (MANIFEST, PREPARED_FORMAT, PREPARED_VERSION, SHARDS, SPEC_FILE,
                                                     STORAGE_DTYPES, shard_file, write_json_atomic, write_npy)

    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("rows") == rows:
        return rows
    shutil.rmtree(out, ignore_errors=True)
    (out / SHARDS).mkdir(parents=True)
    spec = _reference_spec(ids, fields)
    spec.save(out / SPEC_FILE)
    rng = np.random.default_rng(seed)
    shards = []
    for i, lo in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - lo)
        cols = {"cat_ids": rng.integers(1, ids, (n, fields), dtype=np.int32), "num": np.zeros((n, 0), np.float32),
                "label": rng.integers(0, 2, n, dtype=np.uint8)}
        shards.append({"index": i, "rows": n, "files": {c: write_npy(out, shard_file(i, c), a) for c, a in cols.items()}})
    columns = {"cat_ids": [fields], "num": [0], "label": []}
    write_json_atomic(out / MANIFEST, {
        "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "spec_file": SPEC_FILE,
        "spec_fingerprint": spec.fingerprint(), "rows": rows, "shards": shards,
        "columns": {c: {"dtype": np.dtype(STORAGE_DTYPES[c]).str, "shape": s} for c, s in columns.items()}})
    return rows


def train_jobs(device: str, batches: list[int], shards: str, ids: int, seconds: float, config: dict,
               compile_too: bool = True) -> list[dict]:
    """Batch by batch (the target is at the first): the baseline, then ours with each optimiser and bf16; the
    torch.compile rows (dense Adam only: config.check_options) last, as their compiling takes the longest."""
    variants = [("dense Adam", {"optimizer": "adam"}), ("sparse Adam", {"optimizer": "sparse_adam"}),
                ("sparse Adagrad", {"optimizer": "sparse_adagrad", "emb_lr": 0.05}),
                ("dense Adam", {"optimizer": "adam", "amp": "bf16"}),
                ("sparse Adam", {"optimizer": "sparse_adam", "amp": "bf16"})]
    compiled = [("dense Adam", {"optimizer": "adam", "compile": True})] if compile_too else []

    def ours(b, label, train):
        return {"kind": "member", "batch": b, "device": device, "seconds": seconds, "max_steps": 400, "arch": "dcnv2",
                "config": config, "data": shards, "train": train, "prefetch": 2, "label": {
                    "model": "ctr-ensemble dcnv2", "optimizer": label, "amp": train.get("amp", "none"),
                    "compile": train.get("compile", False), "batch": b, "device": device,
                    "data": "prepared shards, host memory"}}

    jobs = []
    for b in batches:
        jobs.append({"kind": "baseline", "batch": b, "device": device, "seconds": seconds, "max_steps": 400, "ids": ids,
                     "hidden": config["hidden"], "label": {
                         "model": "plain PyTorch DCNv2 (baseline)", "optimizer": "dense Adam", "amp": "none",
                         "compile": False, "batch": b, "device": device, "data": "random, on the device"}})
        jobs += [ours(b, label, train) for label, train in variants]
    return jobs + [ours(b, label, train) for b in batches for label, train in compiled]


def train_child(jobs: list[dict]) -> None:
    """Every job in this one process (one CUDA start-up); one JSON line each, printed as soon as it is done."""
    import gc

    import torch

    import bench_train
    from baseline_dcnv2 import run as baseline

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    for job in jobs:
        try:
            if job["kind"] == "baseline":
                r = baseline(job["batch"], job["seconds"], job["max_steps"], job["device"], ids=job["ids"],
                             hidden=job["hidden"])
            else:
                r = bench_train.member_run(job, torch)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        print(json.dumps({k: r.get(k) for k in ("samples_per_s", "steps", "params", "error") if k in r}), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", ROOT / "artifacts" / "gpu")))
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "gpu-work", help="data, repositories (not reported)")
    p.add_argument("--wheels", type=Path, default=ROOT / "artifacts" / "gpu-wheels")
    p.add_argument("--site", type=Path, default=ROOT / "artifacts" / "gpu-site", help="--target folder of the wheels")
    p.add_argument("--dry-run", action="store_true", default=bool(os.environ.get("GPU_CHECK_DRY")))
    p.add_argument("--install", action="store_true", help="install the carried wheels in a dry run too (a rehearsal "
                   "on a Python without them: `gpu_wheels.py --python` of this Python)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S)
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every section's budget")
    p.add_argument("--sections", default="environment,dlpack,cuda_tests,serving,train,quality")
    p.add_argument("--train-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    tiny = args.dry_run
    # sizes: the GPU run's, or tiny for the dry run (2 shared cores, well under 3 minutes in all)
    args.requests = 10 if tiny else 40
    args.parity_rows = 512 if tiny else 2000
    args.ids = 2_000 if tiny else 100_000
    args.train_rows = 1 << 13 if tiny else 1 << 21
    args.train_batches = [256] if tiny else [4096, 16384, 65536]
    args.train_seconds = 0.3 if tiny else 2.0
    args.train_hidden = [64, 64, 64] if tiny else [400, 400, 400]
    args.quality_rows, args.quality_val_rows = (20_000, 5_000) if tiny else (400_000, 50_000)
    args.quality_epochs, args.quality_batch = (1, 1024) if tiny else (2, 4096)
    return args


def main() -> int:
    args = parse_args()
    if args.train_child:
        train_child(json.loads(args.train_child))
        return 0
    for d in (args.out, args.work):
        d.mkdir(parents=True, exist_ok=True)
    args.out, args.work = args.out.resolve(), args.work.resolve()
    check = Check(args)
    for k, v in (("TQDM_DISABLE", "1"), ("TQDM_MININTERVAL", "60")):  # progress bars: noise in a report run
        check.env[k] = os.environ[k] = os.environ.get(k, v)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    check.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    sys.path.insert(0, str(ROOT))

    def watchdog():  # past the deadline (+ grace): write what there is, stop servers and children, exit
        check.write_report(note=f"HARD DEADLINE: the run was stopped at {args.deadline + 20:.0f} s")
        check.kill_all()
        os._exit(124)

    dog = threading.Timer(args.deadline + 20, watchdog)
    dog.daemon = True
    dog.start()
    wanted = args.sections.split(",")
    for name in ("environment", "dlpack", "cuda_tests", "serving", "quality", "train"):
        if name in wanted:
            check.run_section(name, getattr(check, name))
    dog.cancel()
    check.kill_all()
    check.write_report()
    ok = check.passed()
    print(f"[gpu-check] {'all sections passed' if ok else 'NOT all sections passed'} in {time.monotonic() - check.t0:.0f} s; "
          f"report: {args.out / 'gpu_report.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check` and `make gpu-wheels` on CPU: the dry run end to end, the static DLPack check, the slimmed
nvidia-pytriton wheel and the reference-shape shards the GPU benchmark trains from."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

from ctr_ensemble.export.repository import FUSION_MODES  # noqa: E402


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_dry_run_writes_the_report_and_every_fusion_mode_serves_within_tolerance(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if shutil.which("make"):
        cmd = ["make", "-s", "gpu-check", "GPU_CHECK_DRY=1", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}",
               f"GPU_CHECK_ARGS=--work {work}"]
    else:
        cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work", str(work)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "gpu_report.md").read_text()
    assert "DRY RUN" in report and "commit:" in report and "all sections passed" in report
    for name in ("summary", "environment", "cuda_tests", "served_parity", "fusion_timing", "train_throughput", "quality"):
        assert (out / f"{name}.csv").is_file(), name
    status = {r["section"]: r["status"] for r in _rows(out / "summary.csv")}
    assert status == {"environment": "pass", "dlpack": "pass", "cuda_tests": "skipped (dry run)", "serving": "pass",
                      "quality": "pass", "train": "pass"}
    # every fusion mode of this version, both protocols, within 1e-5 of the CPU reference
    parity = _rows(out / "served_parity.csv")
    assert {(p["mode"], p["protocol"]) for p in parity} == {(m, pr) for m in FUSION_MODES for pr in ("http", "grpc")}
    for p in parity:
        assert p["pass"] == "yes" and float(p["max_abs_diff"]) <= 1e-5 and float(p["fusion_max_abs_diff"]) <= 1e-5
        assert p["fusion_kind"] == "KIND_CPU"
    timing = _rows(out / "fusion_timing.csv")
    assert {(t["mode"], int(t["batch"])) for t in timing} == {(m, b) for m in FUSION_MODES for b in gpu_check.FUSION_BATCHES}
    assert all(t["fusion_kind"] == "cpu" and float(t["rows_per_s"]) > 0 for t in timing)
    # the CUDA parts say skipped; the CUDA tests were found and skipped themselves
    tests = _rows(out / "cuda_tests.csv")
    # (parametrised tests give one row per case; every CUDA-only test function ran)
    assert {t["test"].split("[")[0] for t in tests} == set(gpu_check.cuda_test_ids()) and len(tests) >= 3
    assert {t["outcome"] for t in tests} == {"skipped"}
    assert "GPU skipped (dry run)" in report and "torch.compile rows: skipped (dry run)" in report
    train = _rows(out / "train_throughput.csv")
    assert train and all(float(t["samples_per_s"]) > 0 and t["device"] == "cpu" for t in train)
    assert {t["optimizer"] for t in train} >= {"dense Adam", "sparse Adam", "sparse Adagrad"}
    assert len(_rows(out / "quality.csv")) == 2


def test_served_python_models_are_dlpack_only_under_numpy_2():
    assert gpu_wheels.dlpack_check() == []
    fusion = (ROOT / "ctr_ensemble/export/triton/fusion_model.py").read_text()
    assert "as_numpy(" not in fusion and "pb_utils.Tensor(" not in fusion and "from_dlpack" in fusion


def test_the_static_check_finds_numpy_tensor_calls(tmp_path):
    (tmp_path / "fusion_model.py").write_text(
        "import triton_python_backend_utils as pb_utils\n"
        "class M:\n    def execute(self, t):\n        a = t.as_numpy()\n        return pb_utils.Tensor('prob', a)\n")
    (tmp_path / "onnxruntime_backend.py").write_text(
        "import triton_python_backend_utils as pb_utils\n"
        "def _to_triton(name, a):\n    return pb_utils.Tensor(name, a)\n"
        "def other(name, a):\n    return pb_utils.Tensor(name, a)\n")
    problems = gpu_wheels.dlpack_check(tmp_path)
    assert len(problems) == 3
    assert any("fusion_model.py:4: as_numpy()" in p for p in problems)
    assert any("fusion_model.py:5" in p and "execute()" in p for p in problems)
    assert any("onnxruntime_backend.py:5" in p and "other()" in p for p in problems)  # _to_triton: numpy 1 only


def _fake_pytriton(path: Path) -> Path:
    """A wheel laid out as nvidia-pytriton's: stubs for three Pythons, libs linked by name from the binaries."""
    files = {
        "pytriton/__init__.py": b"",
        "pytriton/tritonserver/bin/tritonserver": b"\x7fELF...libtritonserver-1.so...libcudart-1.so",
        "pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub": b"\x7fELF libcudart-1.so",
        "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub": b"\x7fELF libcudart-1.so libpython3.12",
        "pytriton/tritonserver/python_backend_stubs/3.13/triton_python_backend_stub": b"\x7fELF libpython3-x.13.so.1.0",
        "nvidia_pytriton.libs/libtritonserver-1.so": b"\x7fELF libxml2-1.so",
        "nvidia_pytriton.libs/libxml2-1.so": b"\x7fELF",
        "nvidia_pytriton.libs/libcudart-1.so": b"\x7fELF",
        "nvidia_pytriton.libs/libpython3-x.13.so.1.0": b"\x7fELF big",
        "nvidia_pytriton-0.7.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: nvidia-pytriton\nVersion: 0.7.0\n",
        "nvidia_pytriton-0.7.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nTag: py3-none-manylinux_2_35_x86_64\n",
        "nvidia_pytriton-0.7.0.dist-info/RECORD": b"",
    }
    whl = path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if "bin/" in name or "stub" in name else 0o644) << 16
            z.writestr(info, data)
    return whl


def test_slim_pytriton_keeps_the_312_stub_and_what_it_links(tmp_path):
    src = _fake_pytriton(tmp_path)
    (tmp_path / "out").mkdir()
    dst, dropped = gpu_wheels.slim_pytriton(src, tmp_path / "out")
    assert dst.name == "nvidia_pytriton-0.7.0+cp312slim-py3-none-manylinux_2_35_x86_64.whl"
    names = set(zipfile.ZipFile(dst).namelist())
    assert "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub" in names
    assert not any("/3.11/" in n or "/3.13/" in n for n in names)
    assert {"nvidia_pytriton.libs/libtritonserver-1.so", "nvidia_pytriton.libs/libxml2-1.so",
            "nvidia_pytriton.libs/libcudart-1.so"} <= names  # libxml2: linked by a kept library, not a binary
    assert "nvidia_pytriton.libs/libpython3-x.13.so.1.0" in {f for f, _ in dropped}
    z = zipfile.ZipFile(dst)
    info = "nvidia_pytriton-0.7.0+cp312slim.dist-info/"
    assert b"Version: 0.7.0+cp312slim" in z.read(info + "METADATA")
    record = z.read(info + "RECORD").decode().splitlines()
    assert {line.split(",")[0] for line in record} == names
    assert z.getinfo("pytriton/tritonserver/bin/tritonserver").external_attr >> 16 & 0o111  # still executable


def test_random_reference_shards_feed_the_real_loader(tmp_path):
    from ctr_ensemble.data.prepared.shards import Prepared
    from ctr_ensemble.training import loader

    assert gpu_check.write_random_shards(tmp_path / "s", ids=50, rows=1000, fields=3, shard_rows=384) == 1000
    data = Prepared(tmp_path / "s", verify="full")
    assert data.rows == 1000 and data.spec.n_cat == 3 and data.spec.cat_sizes == [50] * 3 and data.spec.n_num == 0
    batches = loader.Batches(data, data.spec.input_names, loader.LoaderConfig(batch_size=250, block_rows=100))
    seen = [x["cat_ids"] for x, _ in batches.epoch(1)]
    assert sum(len(b) for b in seen) == 1000 and all(int(b.min()) >= 1 and int(b.max()) < 50 for b in seen)


def test_every_cuda_only_test_is_found():
    ids = gpu_check.cuda_test_ids()
    assert "tests/test_server_lifecycle.py::test_fusion_on_gpu_matches_reference" in ids
    assert "tests/test_collab_serving.py::test_collaborative_fusion_on_gpu_equals_pytorch" in ids
    assert "tests/test_scale.py::test_cuda_training_from_shards_with_pinned_prefetch" in ids

"""`make gpu-wheels`: the wheels the GPU machine lacks, downloaded here, for ``make gpu-check`` there.

The GPU machine (README, *GPU check*) has Python 3.12, torch with CUDA, numpy 2.x, onnx, onnxruntime,
grpcio, protobuf, pyarrow, scikit-learn, typer, rich, tqdm, PyYAML, matplotlib, prometheus-client and
pytest, and no network. What the serving path imports beyond that (``WHEELS``): nvidia-pytriton (only
for its ``tritonserver`` binary, its Python backend and libraries: the package is never imported, so its
own dependencies are not needed), tritonclient and what its HTTP/gRPC clients import.

Steps: ``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_...`` of the pinned versions into a cache folder; the nvidia-pytriton wheel is
rewritten without the Python backend stubs of other Pythons and the libraries only they link (the
3.13 stub's bundled libpython, 32 MB): ``nvidia_pytriton-0.7.0+cp312slim``; the wheels go to ``--out``
(carried to the GPU machine as an ignored path) with ``wheels.json``. Then the total of the wheels and
the working tree (``git ls-files`` + untracked files that are not ignored) is checked against the
64 MiB a device call may carry, and the static DLPack check of the served Python models is run (numpy
2.x is on that machine: no ``as_numpy()``, no ``pb_utils.Tensor(name, ndarray)`` on the GPU path).
Exit 1 when something does not fit or fails. Stdlib only, so ``gpu_check.py`` can import it anywhere.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 << 20  # bytes a device call may carry: working tree + carried paths
PYTHON = "3.12"
# manylinux tags the GPU machine takes (nvidia-pytriton's wheel is manylinux_2_35); pure wheels match anyway.
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
# distribution -> (version where requirements.txt does not pin it, the module the serving path imports)
WHEELS = {
    "nvidia-pytriton": (None, "pytriton"),  # tritonserver binary + Python backend + its shared libraries
    "tritonclient": (None, "tritonclient"),
    "python-rapidjson": ("1.25", "rapidjson"),  # tritonclient.http and .grpc
    "geventhttpclient": ("2.6.1", "geventhttpclient"),  # tritonclient.http
    "gevent": (None, "gevent"),  # geventhttpclient
    "greenlet": ("3.3.2", "greenlet"),  # gevent
    "zope.event": ("6.2", "zope.event"),  # gevent
    "zope.interface": ("8.7", "zope.interface"),  # gevent
    "brotli": ("1.2.1", "brotli"),  # geventhttpclient
    "certifi": ("2026.10.19.post1", "certifi"),  # geventhttpclient
    "urllib3": ("2.8.0", "urllib3"),  # a declared tritonclient dependency
    "ml-dtypes": ("0.5.4", "ml_dtypes"),  # tritonclient.utils; also onnx's dependency, so usually there already
}
# On the GPU machine already (the list), with the modules the project imports from them.
MACHINE_HAS = {"torch": "torch", "numpy": "numpy", "onnx": "onnx", "onnxruntime": "onnxruntime", "grpcio": "grpc",
               "protobuf": "google.protobuf", "pyarrow": "pyarrow", "scikit-learn": "sklearn", "typer": "typer",
               "rich": "rich", "tqdm": "tqdm", "PyYAML": "yaml", "matplotlib": "matplotlib",
               "prometheus-client": "prometheus_client", "pytest": "pytest", "packaging": "packaging"}

# Served Python models that run in the Triton Python backend stub (built against numpy 1) under the GPU
# machine's numpy 2: as_numpy() returns wrong values there and Tensor(name, ndarray) empty outputs.
TRITON_SRC = ROOT / "ctr_ensemble" / "export" / "triton"
# where a numpy-constructed pb_utils.Tensor is allowed: the onnxruntime shim's numpy < 2 branch only
NUMPY1_ONLY = {"onnxruntime_backend.py": {"_to_triton"}}


def requirement_pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def pinned() -> list[str]:
    req = requirement_pins()
    out = []
    for name, (version, _) in WHEELS.items():
        v = req.get(name.lower(), version)
        if v is None:
            raise SystemExit(f"{name}: no version pinned in requirements.txt or gpu_wheels.WHEELS")
        out.append(f"{name}=={v}")
    return out


def download(cache: Path, python: str = PYTHON) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(cache), *pinned()]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _wheel_for(folder: Path, dist: str, version: str, python: str = PYTHON) -> Path:
    stem, tag = re.sub(r"[-_.]+", "_", dist).lower(), f"-cp{python.replace('.', '')}-"
    hits = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version.lower()}-")
            and ("-cp" not in p.name or tag in p.name)]
    if len(hits) != 1:
        raise SystemExit(f"{folder}: expected one wheel of {dist}=={version}, found {[p.name for p in hits]}")
    return hits[0]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_pytriton(src: Path, out_dir: Path, python: str = PYTHON) -> tuple[Path, list[tuple[str, int]]]:
    """``src`` without the Python backend stubs of other Pythons and the shared libraries that only those
    link (found by their names in the kept binaries, transitively); version ``<v>+cp312slim``.
    Returns the new wheel and the dropped files (name, uncompressed bytes)."""
    zin = zipfile.ZipFile(src)
    infos = zin.infolist()
    dist, version = src.name.split("-")[:2]
    stubs = "pytriton/tritonserver/python_backend_stubs/"
    libs_dir = "nvidia_pytriton.libs/"
    drop = {i.filename for i in infos if i.filename.startswith(stubs) and i.filename != stubs
            and not i.filename.startswith(f"{stubs}{python}/")}
    libs = {i.filename.rsplit("/", 1)[1]: i.filename for i in infos if i.filename.startswith(libs_dir)}
    kept = (zin.read(i) for i in infos if i.filename not in drop and not i.filename.startswith(libs_dir))
    todo = [data for data in kept if data[:4] == b"\x7fELF"]
    needed: set[str] = set()
    while todo:
        data = todo.pop()
        for lib in libs:
            if lib not in needed and lib.encode() in data:
                needed.add(lib)
                todo.append(zin.read(libs[lib]))
    drop |= {path for lib, path in libs.items() if lib not in needed}
    new_version = f"{version}+cp{python.replace('.', '')}slim"
    old_info, new_info = f"{dist}-{version}.dist-info/", f"{dist}-{new_version}.dist-info/"
    dst = out_dir / src.name.replace(f"{dist}-{version}-", f"{dist}-{new_version}-")
    record = []
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in infos:
            if info.filename in drop or info.filename == f"{old_info}RECORD":
                continue
            data = zin.read(info)
            name = info.filename.replace(old_info, new_info, 1)
            if name == f"{new_info}METADATA":
                data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            new = zipfile.ZipInfo(name, info.date_time)
            new.external_attr, new.compress_type = info.external_attr, zipfile.ZIP_DEFLATED  # keeps the exec bits
            zout.writestr(new, data)
            record.append(_record_line(name, data))
        record.append(f"{new_info}RECORD,,")
        zout.writestr(zipfile.ZipInfo(f"{new_info}RECORD", infos[0].date_time), "\n".join(record) + "\n")
    tmp.replace(dst)
    return dst, sorted((i.filename, i.file_size) for i in infos if i.filename in drop)


def tree_bytes(root: Path = ROOT) -> tuple[int, int]:
    """(bytes, files) of what a device call copies: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    files = [root / f for f in out.decode().split("\0") if f]
    files = [f for f in files if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def dlpack_check(folder: Path = TRITON_SRC) -> list[str]:
    """Places in the served Python models that would break under numpy 2: any ``.as_numpy()`` call, and any
    ``pb_utils.Tensor(name, ndarray)`` outside the numpy-1-only functions of ``NUMPY1_ONLY``. Empty = clean."""
    problems = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        owner: dict[ast.AST, str] = {}  # node -> innermost enclosing function (ast.walk visits outer ones first)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                owner.update((n, fn.name) for n in ast.walk(fn))
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{call.lineno}"
            if call.func.attr == "as_numpy":
                problems.append(f"{where}: as_numpy() (wrong values under numpy 2; use DLPack)")
            elif (call.func.attr == "Tensor" and isinstance(call.func.value, ast.Name) and call.func.value.id == "pb_utils"
                  and owner.get(call) not in NUMPY1_ONLY.get(path.name, set())):
                problems.append(f"{where}: pb_utils.Tensor(name, ndarray) in {owner.get(call, 'module')}() "
                                "(empty outputs under numpy 2; use pb_utils.Tensor.from_dlpack)")
    return problems


def wheel_summary(folder: Path) -> list[dict]:
    return [{"wheel": p.name, "bytes": p.stat().st_size} for p in sorted(folder.glob("*.whl"))]


def size_report(folder: Path) -> dict:
    wheels = wheel_summary(folder)
    tree, files = tree_bytes()
    total = sum(w["bytes"] for w in wheels) + tree
    return {"wheels": wheels, "wheels_bytes": sum(w["bytes"] for w in wheels), "tree_bytes": tree, "tree_files": files,
            "total_bytes": total, "limit_bytes": CARRY_LIMIT, "fits": total <= CARRY_LIMIT}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "gpu-wheels", help="the folder carried to the GPU machine")
    p.add_argument("--cache", type=Path, default=ROOT / "artifacts" / "gpu-wheels-cache", help="downloads (not carried)")
    p.add_argument("--python", default=PYTHON, help="the GPU machine's Python (another one only to rehearse elsewhere)")
    args = p.parse_args()
    download(args.cache, args.python)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    entries = []
    req = requirement_pins()
    for name, (version, module) in WHEELS.items():
        src = _wheel_for(args.cache, name, req.get(name.lower(), version), args.python)
        if name == "nvidia-pytriton":
            dst, dropped = slim_pytriton(src, args.out, args.python)
            print(f"{src.name} ({mib(src.stat().st_size)}) -> {dst.name} ({mib(dst.stat().st_size)}); dropped "
                  f"{len(dropped)} files, {mib(sum(b for _, b in dropped))} unpacked: "
                  + ", ".join(sorted({f.split("/")[-1] if "libs/" in f else f"stub {f.split('/')[3]}" for f, _ in dropped})))
        else:
            dst = args.out / src.name
            shutil.copy(src, dst)
        entries.append({"distribution": name, "module": module, "wheel": dst.name, "bytes": dst.stat().st_size,
                        "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (args.out / "wheels.json").write_text(json.dumps({"python": args.python, "platforms": PLATFORMS, "commit": commit,
                                                      "wheels": entries}, indent=2))
    rep = size_report(args.out)
    for w in rep["wheels"]:
        print(f"  {w['bytes']:>11,}  {w['wheel']}")
    print(f"wheels {rep['wheels_bytes']:,} B ({mib(rep['wheels_bytes'])}) + working tree {rep['tree_bytes']:,} B "
          f"({rep['tree_files']} files, {mib(rep['tree_bytes'])}) = {rep['total_bytes']:,} B ({mib(rep['total_bytes'])}); "
          f"limit {mib(CARRY_LIMIT)}: {'fits' if rep['fits'] else 'DOES NOT FIT'} "
          f"({mib(abs(CARRY_LIMIT - rep['total_bytes']))} {'to spare' if rep['fits'] else 'over'})")
    problems = dlpack_check()
    print("DLPack check of the served Python models:", "clean" if not problems else "")
    for line in problems:
        print("  " + line)
    print(f"carry to the GPU machine: [\"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}\"]")
    return 0 if rep["fits"] and not problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""The `ctr-ensemble` console script: every stage runs alone; errors are one line without a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "ctr-ensemble")


def run(*args, check=False, timeout=600):
    r = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.mark.parametrize("cmd", [["data", "synth"], ["data", "fit"], ["train"], ["export"], ["serve"], ["evaluate"], ["demo"], ["models"], ["check-export"], ["train-mutual"], ["train-collab"], ["check-repo"], ["data", "movielens"]])
def test_every_stage_has_help(cmd):
    r = run(*cmd, "--help", check=True)
    assert "Usage" in r.stdout


def test_models_json_lists_the_registry():
    reg = json.loads(run("models", "--json", check=True).stdout)
    assert {"deepfm", "dcnv2"} <= set(reg) and reg["deepfm"]["embedding_dim"] > 0


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for n in needles:
        assert n in last, (n, last)


def test_missing_and_malformed_files(tmp_path):
    _one_line_error(run("data", "fit", "--train", tmp_path / "nope.tsv"), "nope.tsv", "not found")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n")
    _one_line_error(run("data", "fit", "--train", bad, "--out", tmp_path / "s.json"), "bad.tsv:line 1", "expected 40", "got 3")


def test_unknown_model_and_bad_config(tmp_path):
    _one_line_error(run("train", "--model", "wide_deep", "--train", "x", "--val", "y", "--spec", "z", "--out", tmp_path / "m.pt"),
                    "unknown model 'wide_deep'", "deepfm")
    _one_line_error(run("train", "--model", "deepfm", "--set", "hiden=[8]", "--train", "x", "--val", "y", "--spec", "z",
                        "--out", tmp_path / "m.pt"), "unknown config keys")


def test_corrupt_checkpoint_and_debug_traceback(tmp_path):
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(run("export", "--checkpoint", bad, "--repository", tmp_path / "repo"), "m.pt", "not a readable checkpoint")
    assert not (tmp_path / "repo").exists()
    r = run("--debug", "export", "--checkpoint", bad, "--repository", tmp_path / "repo")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.integration
def test_stages_end_to_end_from_the_command_line(tmp_path):
    d = tmp_path / "data"
    run("data", "synth", "--out", d, "--train-rows", 3000, "--val-rows", 800, "--test-rows", 800, check=True)
    run("data", "fit", "--train", d / "train.tsv", "--out", tmp_path / "spec.json", check=True)
    for arch in ("deepfm", "dcnv2"):
        run("train", "--model", arch, "--train", d / "train.tsv", "--val", d / "val.tsv", "--spec", tmp_path / "spec.json",
            "--out", tmp_path / f"{arch}.pt", "--epochs", 1, "--set", "embedding_dim=4", "--set", "hidden=[16]", check=True)
        assert (tmp_path / f"{arch}.history.png").is_file()
    r = run("export", "--checkpoint", tmp_path / "deepfm.pt", "--checkpoint", tmp_path / "dcnv2.pt",
            "--repository", tmp_path / "repo", "--parity-data", d / "val.tsv", "--tau", 0.5, check=True)
    assert "ONNX parity" in r.stdout
    run("evaluate", "--data", d / "test.tsv", "--repository", tmp_path / "repo", "--truth", d / "test.p.npy",
        "--start-server", "--out", tmp_path / "summary.json", check=True)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["fusion"] == {"mode": "negation_entropy", "tau": 0.5}
    assert all(r["max_abs_diff"] <= 1e-5 for rows in [*s["members"].values(), s["ensemble"]] for r in rows.values())
    assert all(r["ne_base"] == "train" and r["ne"] > 0 and r["calibration"] > 0 and r["ece"] is not None
               for rows in [*s["members"].values(), s["ensemble"]] for r in rows.values())


def test_config_options_generate_each_setting_once():
    """cli/options.py: a dataclass's fields become options (default, help, --x/--no-x), stacked decorators fill
    their own dicts, and a setting declared by hand as well is refused."""
    import dataclasses as dc

    import typer
    from typer.testing import CliRunner

    from ctr_ensemble.cli.options import config_options
    from ctr_ensemble.training.config import setting

    @dc.dataclass
    class A:
        width: int = setting(3, "How wide.")
        fast: bool = setting(False, "Go fast.")

    @dc.dataclass
    class B:
        name: str = setting("x", "A name.")

    got = {}
    app = typer.Typer()

    @app.command()
    @config_options(A)
    @config_options(B, dest="b")
    def cmd(out: str = typer.Option("o"), settings: dict = None, b: dict = None) -> None:
        got.update(out=out, settings=settings, b=b)

    r = CliRunner().invoke(app, ["--width", "5", "--fast", "--name", "y"])
    assert r.exit_code == 0, r.output
    assert got == {"out": "o", "settings": {"width": 5, "fast": True}, "b": {"name": "y"}}
    r = CliRunner().invoke(app, ["--help"])
    assert "How wide." in r.output and "--no-fast" in r.output and "A name." in r.output
    with pytest.raises(TypeError, match="declared by hand and by A"):
        config_options(A)(lambda width=1, settings=None: None)
    with pytest.raises(TypeError, match="has no field"):
        config_options(A, only=("height",))

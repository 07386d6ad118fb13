"""The ``ctr-ensemble`` application: the root command, its error handling, and the helpers every command
group uses. Each group lives in its own module of this package and registers itself on ``app``."""

from __future__ import annotations

import sys

import typer
import yaml

from ctr_ensemble.errors import CtrError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="From click logs to a served, measured Triton ensemble of CTR models.")
data_app = typer.Typer(no_args_is_help=True, help="Generate, fit and encode data.")
app.add_typer(data_app, name="data")

# --debug, and the torchrun process group of a running training command (errors then name the rank)
STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_sets(sets: list[str]) -> dict:
    """``KEY=VALUE`` options (values are YAML) → {key: value}."""
    out = {}
    for s in sets:
        if "=" not in s:
            raise CtrError(f"--set expects KEY=VALUE (YAML value), got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def arch_overrides(sets: list[str]) -> dict[str, dict]:
    """``ARCH.KEY=VALUE`` options → {arch: {key: value}} (values are YAML)."""
    out: dict[str, dict] = {}
    for k, v in parse_sets(sets).items():
        if "." not in k:
            raise CtrError(f"--set expects ARCH.KEY=VALUE here (e.g. deepfm.hidden=[64]), got {k!r}")
        arch, key = k.split(".", 1)
        out.setdefault(arch, {})[key] = v
    return out


def run() -> None:
    """Run ``app`` with the errors users see: one ``error:`` line and exit 2 for a ``CtrError`` (naming the rank
    under torchrun), the traceback only with ``--debug``; 130 on Ctrl-C. ``ctr_ensemble.cli.main`` is this, once
    every command group has registered."""
    try:
        app()
    except CtrError as e:
        if STATE["debug"]:
            raise
        dist = STATE.get("dist")
        where = f"{dist.tag()}: " if dist is not None and dist.active and not str(e).startswith(dist.tag()) else ""
        typer.echo(f"error: {where}{e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)

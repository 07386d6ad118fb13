"""Command-line options generated from the config dataclasses.

A setting is declared once, as a field of its dataclass with its default and help
(``training.config.setting``); ``config_options`` turns the chosen fields into typer options of a
command (``--field-name`` each, ``--x/--no-x`` for a bool), and hands the command their values as one dict. So ``train``,
``train-mutual``, ``train-collab`` and ``tune`` cannot drift apart in names, defaults or help texts, and
a new ``TrainConfig`` field reaches every training command by itself.

The options a command shares that are not training settings (data paths and checks, threads, torchrun)
are declared the same way, in the small dataclasses below.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.data.readers import FORMATS
from ctr_ensemble.training.config import setting

FORMAT_HELP = f"Data format of raw files: auto (from the name and first line) or one of {', '.join(FORMATS)}."


def format_option() -> typer.models.OptionInfo:
    """``--format``, with the formats of the reader registry."""
    return typer.Option("auto", "--format", help=FORMAT_HELP)


@dataclass
class DataOptions:
    """Where a training command's rows come from and how they are checked."""

    spec: Optional[Path] = setting(None, "Feature spec JSON (`data fit`); prepared data brings its own.")
    verify_shards: str = setting("size", "Prepared data check at start: size (sizes + headers) | full (+ CRC-32 of "
                                         "every byte).")
    skip_bad_rows: bool = setting(False, "Skip and count malformed rows of raw files instead of stopping.")


@dataclass
class Ports:
    """Triton's three ports: what ``serve`` starts and what ``loadtest``/``soak`` talk to (with ``--url``)."""

    http_port: int = setting(8000, "Triton HTTP/REST port (KServe v2).")
    grpc_port: int = setting(8001, "Triton gRPC port.")
    metrics_port: int = setting(8002, "Triton Prometheus metrics port.")


@dataclass
class RunOptions:
    """How a training command runs: CPU threads and the torchrun process group."""

    threads: int = setting(0, "torch CPU threads (0 = torch default).")
    dist_timeout: float = setting(300.0, "Seconds a torchrun worker waits for the others before stopping with an "
                                         "error.")
    resume: bool = setting(False, "Continue a killed run from its saved training state (same data, members and "
                                  "settings).")


def config_options(cls, only: typing.Iterable[str] | None = None, skip: typing.Iterable[str] = (),
                   defaults: dict | None = None, dest: str = "settings"):
    """Decorator: add a typer option for each field of dataclass ``cls`` (``only`` those, minus ``skip``) to the
    command, and pass their values to it as the dict argument ``dest``.

    ``defaults`` replaces a field's default for this command (``None``: "not given", e.g. a mode-dependent
    default the command fills in). A field name already taken by one of the command's own parameters is an
    error, so a setting cannot be declared twice."""
    hints = typing.get_type_hints(cls)
    chosen = [f for f in dataclasses.fields(cls) if (only is None or f.name in set(only)) and f.name not in set(skip)]
    missing = set(only or ()) - {f.name for f in chosen}
    if missing:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(missing)}")
    defaults = defaults or {}

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != dest]
        taken = {p.name for p in own} & {f.name for f in chosen}
        if taken:
            raise TypeError(f"{fn.__name__}: {sorted(taken)} declared by hand and by {cls.__name__}")
        extra = []
        for f in chosen:
            default = defaults.get(f.name, f.default)
            annotation = hints[f.name] if default is not None else Optional[hints[f.name]]
            help_ = f.metadata.get("help", "")
            extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                           default=typer.Option(default, help=help_)))
        names = [f.name for f in chosen]

        @functools.wraps(fn)
        def command(**kw):
            values = {n: kw.pop(n) for n in names}
            return fn(**kw, **{dest: values})

        # keyword-only, so they may follow the command's own options whatever those look like; stacked
        # decorators (another dataclass into another ``dest``) each see the signature the one below made
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = sig.replace(parameters=own + extra)
        return command

    return decorate


def given(values: dict) -> dict:
    """The values the user gave or that have a default (``None``: left to the command)."""
    return {k: v for k, v in values.items() if v is not None}

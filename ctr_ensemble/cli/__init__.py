"""``ctr-ensemble``: every stage of the pipeline as one command (typer), one module per command group.

``app.py`` holds the root command and the shared helpers, ``options.py`` generates the options of the
config dataclasses; ``data``, ``train``, ``export``, ``serve``, ``loadtest`` and ``demo`` register their
commands on import, in the pipeline's order (the order ``--help`` lists them in)."""

# isort: off
from ctr_ensemble.cli import data, train, export, serve, loadtest, demo  # noqa: F401  (register the commands)
# isort: on
from ctr_ensemble.cli.app import app
from ctr_ensemble.cli.app import run as main

__all__ = ["app", "main"]

"""``ctr-ensemble demo``: the whole path on an embedded default."""

from __future__ import annotations

from pathlib import Path

import typer

from ctr_ensemble.cli.app import app, split_list


@app.command("demo")
def demo_cmd(
    members: str = typer.Option("deepfm,dcnv2", help="Comma list of architectures to train and serve."),
    out: Path = typer.Option(Path("artifacts/demo"), help="Folder for data, checkpoints and summary.json."),
    repository: Path = typer.Option(Path("model_repository"), help="Where to write the Triton repository."),
    train_rows: int = typer.Option(300_000, help="Rows of the synthetic training split."),
    epochs: int = typer.Option(8, help="The most epochs per member (early stopping may end sooner)."),
    seed: int = typer.Option(42, help="Seed of the data and of the training."),
    seq_max_len: int = typer.Option(0, help="> 0: the synthetic data carries a behaviour sequence of this many "
                                             "recent items (Parquet), fed to every member."),
) -> None:
    """The whole pipeline on the embedded synthetic default: data → train → export → serve → evaluate."""
    from ctr_ensemble.demo import run_demo

    ok = run_demo(split_list(members), out, repository, train_rows=train_rows, epochs=epochs, seed=seed,
                  seq_max_len=seq_max_len)
    if not ok:
        raise typer.Exit(1)

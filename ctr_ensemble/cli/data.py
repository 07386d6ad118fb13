"""``ctr-ensemble data ...``: synthetic and MovieLens data sets, feature specs, prepared shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.cli.app import data_app
from ctr_ensemble.cli.options import format_option

MIN_COUNT_HELP = ("Tokens seen fewer times in train map to the OOV id 0 (which also takes unseen tokens): an integer, "
                  "or auto = 2 below 10 M training rows, 10 from there on.")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("artifacts/data/synth"), help="Output folder for train/val/test (TSV, or Parquet with --seq-max-len) and the true p per row."),
    train_rows: int = typer.Option(160_000, help="Rows in the train split."),
    val_rows: int = typer.Option(20_000, help="Rows in the validation split."),
    test_rows: int = typer.Option(20_000, help="Rows in the test split."),
    seed: int = typer.Option(7, help="Seed of the synthetic world and of the rows."),
    seq_max_len: int = typer.Option(0, help="> 0: add a behaviour sequence `history` whose most recent N items "
                                             "influence p, and write Parquet instead of TSV."),
) -> None:
    """Write a synthetic CTR data set in the Criteo TSV layout (Parquet with a sequence), with the true p per row."""
    from ctr_ensemble.data.synth import SynthConfig, generate

    meta = generate(out, SynthConfig(seed=seed, splits={"train": train_rows, "val": val_rows, "test": test_rows},
                                     seq_max_len=seq_max_len))
    for split, m in meta["splits"].items():
        typer.echo(f"{out / m['file']}: {m['rows']} rows, CTR {m['ctr']:.4f}, oracle AUC {m['oracle_auc']:.4f}")


@data_app.command("movielens")
def data_movielens(
    ratings: Path = typer.Option(..., help="MovieLens ratings.csv (userId,movieId,rating,timestamp)."),
    movies: Path = typer.Option(..., help="MovieLens movies.csv (movieId,title,genres)."),
    out: Path = typer.Option(Path("artifacts/data/movielens"), help="Output folder for train/val/test Parquet."),
    max_history: int = typer.Option(50, help="Keep the user's most recent N earlier movies as the history."),
    val_frac: float = typer.Option(0.1, help="Share of the ratings, by time, in the validation split."),
    test_frac: float = typer.Option(0.1, help="Share of the ratings, by time (the latest), in the test split."),
) -> None:
    """Build a sequential CTR task from MovieLens: click = rating >= 4, history = earlier movies, split by time."""
    from ctr_ensemble.data.movielens import build_movielens

    meta = build_movielens(ratings, movies, out, max_history=max_history, val_frac=val_frac, test_frac=test_frac)
    typer.echo(json.dumps(meta, indent=2, default=str)[:2000])


@data_app.command("fit")
def data_fit(
    train: Path = typer.Option(..., help="Training file (any supported format, see --format)."),
    out: Path = typer.Option(Path("artifacts/feature_spec.json"), help="Where to write the feature spec JSON."),
    min_count: str = typer.Option("auto", help=MIN_COUNT_HELP),
    skip_bad_rows: bool = typer.Option(False, help="Skip and count malformed rows instead of stopping."),
    fmt: str = format_option(),
    seq_max_len: int = typer.Option(50, help="Most recent items of the behaviour sequence kept per row."),
    sequence: bool = typer.Option(True, help="Use the file's behaviour-sequence column (Parquet list column) if it has one."),
) -> None:
    """Fit per-field vocabularies and numeric statistics on the train file only."""
    from ctr_ensemble.data.fit import fit, parse_min_count

    spec = fit(train, min_count=parse_min_count(min_count), skip_bad_rows=skip_bad_rows, fmt=fmt,
                        seq_max_len=seq_max_len,
                        use_sequence=sequence)
    spec.save(out)
    seq = spec.sequence
    seq_desc = f", sequence {seq.name!r} ({seq.size} ids, max_len {seq.max_len})" if seq else ""
    typer.echo(f"{out}: {spec.n_cat} categorical fields (vocab sizes {min(spec.cat_sizes)}..{max(spec.cat_sizes)}), "
               f"{spec.n_num} numeric{seq_desc}, fitted on {spec.fitted_on['rows']} rows "
               f"({spec.fitted_on['skipped_rows']} skipped)")


@data_app.command("prepare")
def data_prepare(
    input_: list[Path] = typer.Option(..., "--input", help="Raw input file (or Parquet folder); repeat for several files of one format."),
    out: Path = typer.Option(..., help="Output folder: shards/, manifest.json, feature_spec.json."),
    spec: Optional[Path] = typer.Option(None, help="Encode with this feature spec (val/test with the train spec) instead of fitting one."),
    min_count: str = typer.Option("auto", help=MIN_COUNT_HELP + " When fitting."),
    max_distinct: int = typer.Option(0, help="Cap on distinct tokens counted per field (0 = exact); bounds the counting memory."),
    seq_max_len: int = typer.Option(50, help="Most recent items of the behaviour sequence kept per row (when fitting)."),
    sequence: bool = typer.Option(True, help="Use the input's behaviour-sequence column if it has one (when fitting)."),
    chunk_mb: float = typer.Option(64, help="Raw megabytes per chunk (= per shard); a worker holds about 6x this."),
    workers: int = typer.Option(2, help="Processes for the per-chunk work (1 = in this process)."),
    skip_bad_rows: bool = typer.Option(False, help="Skip and count malformed rows instead of stopping."),
    fmt: str = format_option(),
) -> None:
    """Encode raw data into shards for training, in bounded memory; resumable (run the same command again)."""
    from ctr_ensemble.data.prepared.prepare import PrepareOptions, prepare

    from ctr_ensemble.data.fit import parse_min_count

    opts = PrepareOptions(fmt=fmt, skip_bad_rows=skip_bad_rows, chunk_mb=chunk_mb, workers=workers,
                          min_count=parse_min_count(min_count),
                          seq_max_len=seq_max_len, use_sequence=sequence, max_distinct=max_distinct)
    r = prepare(input_, out, opts, spec=spec)
    if r.checked:
        typer.echo(f"{out}: already prepared ({r.rows:,} rows, {r.shards} shards); every shard file checked (size, "
                   f"CRC-32){f', {r.chunks_run} damaged shard(s) re-encoded' if r.chunks_run else ', all intact'}")
        return
    what = "fitted its feature spec" if r.spec_fitted else "encoded with the given spec"
    resumed = f", {r.chunks_resumed} chunk(s) done by an earlier run" if r.chunks_resumed else ""
    typer.echo(f"{out}: {r.rows:,} rows in {r.shards} shard(s) ({r.skipped} skipped), {what}; "
               f"{r.chunks_run} chunk(s) read in {r.seconds:.1f}s{resumed}")

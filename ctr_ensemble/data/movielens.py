"""Build a sequential CTR task from MovieLens ratings (ratings.csv + movies.csv).

Every rating event is one example. Events are ordered per user by (timestamp, movieId);
for each event:

* ``label`` = rating >= 4;
* categorical ``userId``, ``movieId``, ``genre`` (the first genre in movies.csv, "" if none);
* numeric ``user_n_prev`` (how many ratings the user made before this one) and
  ``movie_year`` (from the title's "(1995)"; NaN if absent);
* sequence ``history``: the movieIds the user rated before this event, oldest first, most
  recent last, truncated to the last ``max_history``.

Only earlier events of the same user feed ``user_n_prev`` and ``history``, so nothing leaks
from the future. The split is by global time: events before the timestamp at the
``1 - val_frac - test_frac`` quantile train, up to the ``1 - test_frac`` quantile validate, the
rest test; every training event is strictly older than every validation event, and those than
every test event. ``train.parquet``, ``val.parquet``, ``test.parquet`` (rows in time order) and
``meta.json`` are written to ``out_dir``. A ``timestamp`` column (Arrow timestamp[s]) is kept for
inspection; ``ParquetReader`` ignores it (not a feature). ``rating`` is not written (it is the label).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctr_ensemble.errors import CtrError

_YEAR_RE = r"\((?P<year>[0-9]{4})(?:[-–][0-9]{0,4})?\)\s*$"


def build_movielens(ratings_csv: str | Path, movies_csv: str | Path, out_dir: str | Path, max_history: int = 50,
                    val_frac: float = 0.1, test_frac: float = 0.1) -> dict:
    """Write train/val/test Parquet files and meta.json for the MovieLens sequential CTR task; return the meta."""
    if max_history < 1:
        raise CtrError(f"max_history must be >= 1, got {max_history}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise CtrError(f"val_frac and test_frac must be >= 0 with a sum below 1, got {val_frac} and {test_frac}")
    ratings_csv, movies_csv, out_dir = Path(ratings_csv), Path(movies_csv), Path(out_dir)
    r = _read_csv(ratings_csv, {"userId": int, "movieId": int, "rating": float, "timestamp": int})
    mv = _read_csv(movies_csv, {"movieId": int, "title": str, "genres": str})
    user, movie, rating, ts = (r[c] for c in ("userId", "movieId", "rating", "timestamp"))
    n = len(user)
    if n == 0:
        raise CtrError(f"{ratings_csv}: no ratings")

    # Per user, in time order (ties by movieId): earlier events only.
    order = np.lexsort((movie, ts, user))
    user, movie, rating, ts = user[order], movie[order], rating[order], ts[order]
    pos = np.arange(n)
    new_user = np.r_[True, user[1:] != user[:-1]]
    start = np.maximum.accumulate(np.where(new_user, pos, 0))
    n_prev = pos - start
    hist_len = np.minimum(n_prev, max_history)
    offsets = np.r_[0, np.cumsum(hist_len)]
    total = int(offsets[-1])
    flat = np.repeat(pos - hist_len, hist_len) + (np.arange(total) - np.repeat(offsets[:-1], hist_len))
    movie_str = pc.cast(pa.array(movie), pa.string())
    items = pc.take(movie_str, pa.array(flat, pa.int64()))
    if total < 2**31:
        history = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), items)
    else:
        history = pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), items)

    # Movie side: first genre and year, looked up by movieId.
    genres = pc.utf8_trim_whitespace(pa.array(mv["genres"], pa.string()))
    first_genre = pc.list_element(pc.split_pattern(genres, "|"), 0)
    first_genre = pc.if_else(pc.equal(first_genre, "(no genres listed)"), "", first_genre)
    year = pc.struct_field(pc.extract_regex(pa.array(mv["title"], pa.string()), _YEAR_RE), [0])
    year = pc.cast(year, pa.float64())
    where = pc.index_in(pa.array(movie), value_set=pa.array(mv["movieId"]))
    genre = pc.fill_null(pc.take(first_genre, where), "")
    movie_year = pc.take(year, where).to_numpy(zero_copy_only=False)  # null → NaN

    table = pa.table({
        "label": pa.array((rating >= 4).astype(np.int64)),
        "userId": pc.cast(pa.array(user), pa.string()),
        "movieId": movie_str,
        "genre": genre,
        "user_n_prev": pa.array(n_prev.astype(np.int64)),
        "movie_year": pa.array(movie_year, pa.float64()),
        "history": history,
        "timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("s")),
    })

    # Global time split at timestamp quantiles; strict inequalities keep splits time-disjoint.
    ts_sorted = np.sort(ts)
    cut = [int(np.floor(n * (1 - val_frac - test_frac))), int(np.floor(n * (1 - test_frac)))]
    t_val, t_test = (ts_sorted[c] if c < n else np.iinfo(np.int64).max for c in cut)
    split_of = np.where(ts < t_val, 0, np.where(ts < t_test, 1, 2))
    time_order = np.lexsort((movie, user, ts))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": "movielens-sequential-ctr",
        "source": {"ratings": str(ratings_csv), "movies": str(movies_csv)},
        "label": "rating >= 4",
        "fields": {"label": "label", "categorical": ["userId", "movieId", "genre"],
                   "numeric": ["user_n_prev", "movie_year"], "sequence": "history"},
        "max_history": max_history,
        "users": int(len(np.unique(user))),
        "movies": int(len(np.unique(movie))),
        "rows": n,
        "ctr": float((rating >= 4).mean()),
        "boundaries": {"val_from": _iso(t_val), "test_from": _iso(t_test)},
        "splits": {},
    }
    for k, name in enumerate(("train", "val", "test")):
        rows = time_order[split_of[time_order] == k]
        part = table.take(pa.array(rows, pa.int64()))
        pq.write_table(part, out_dir / f"{name}.parquet", row_group_size=65536)
        y = (rating[rows] >= 4)
        meta["splits"][name] = {
            "rows": int(len(rows)),
            "ctr": float(y.mean()) if len(rows) else None,
            "first": _iso(ts[rows].min()) if len(rows) else None,
            "last": _iso(ts[rows].max()) if len(rows) else None,
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _iso(t) -> str | None:
    if t >= np.iinfo(np.int64).max:
        return None
    return datetime.fromtimestamp(int(t), tz=timezone.utc).isoformat()


def _read_csv(path: Path, cols: dict[str, type]) -> dict[str, np.ndarray | list]:
    """Read the named columns of a CSV with a header, as text, then convert naming the bad line."""
    if not path.is_file():
        raise CtrError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CtrError(f"{path}: file is empty (expected a CSV with header {','.join(cols)})")
    try:
        t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in cols}, strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrError(f"{path}: cannot read as CSV: {msg}") from e
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise CtrError(f"{path}: missing column(s) {missing}; header has {t.column_names}")
    out: dict[str, np.ndarray | list] = {}
    for c, kind in cols.items():
        col = t.column(c)
        if kind is str:
            out[c] = col.to_pylist()
            continue
        target = pa.int64() if kind is int else pa.float64()
        try:
            out[c] = pc.cast(col, target).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            for i, v in enumerate(col.to_pylist()):
                try:
                    kind(v)
                except ValueError:
                    what = "an integer" if kind is int else "a number"
                    raise CtrError(f"{path}:line {i + 2}, field {c}: expected {what}, got {v!r}") from None
            raise CtrError(f"{path}: column {c}: cannot convert to {target}") from None
    return out

"""Avazu, libSVM/FFM and Parquet readers, format detection, and the MovieLens task builder (all on tmp files)."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctr_ensemble.data.movielens import build_movielens
from ctr_ensemble.data.readers import READERS, detect_format, open_reader, read_all
from ctr_ensemble.data.readers.avazu import AVAZU_CAT_COLS, AVAZU_COLUMNS, AvazuReader
from ctr_ensemble.data.readers.base import field_names
from ctr_ensemble.data.readers.criteo import CriteoReader
from ctr_ensemble.data.readers.libsvm import LibSVMReader
from ctr_ensemble.data.readers.parquet import ParquetReader
from ctr_ensemble.errors import CtrError


def _concat(batches):
    label = np.concatenate([b.label for b in batches])
    num = np.concatenate([b.num for b in batches])
    cat = [sum((b.cat[f].to_pylist() for b in batches), []) for f in range(len(batches[0].cat))]
    seq = sum((b.seq.to_pylist() for b in batches), []) if batches[0].seq is not None else None
    return label, num, cat, seq


# ----------------------------------------------------------------------------- Avazu

def _avazu_row(i=0, click="0", hour="14102113", n_cols=24):
    vals = [f"{1000 + i}", click, hour, "1005", str(i % 2), f"site{i % 3}", "dom", "cat", "app", "appdom", "appcat",
            "dev", f"ip{i}", "model", "1", "0", str(15700 + i), "320", "50", "1722", "0", "35", "-1", "79"]
    vals = (vals + ["x"] * n_cols)[:n_cols]
    return ",".join(vals)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_avazu_parses_with_and_without_header(tmp_path):
    rows = [_avazu_row(0, "0", "14102113"), _avazu_row(1, "1", "14102500"), _avazu_row(2, "0", "14102623")]
    with_h = _write(tmp_path / "train.csv", [",".join(AVAZU_COLUMNS), *rows])
    no_h = _write(tmp_path / "dev.csv", rows)
    for p in (with_h, no_h):
        r = AvazuReader(p)
        assert r.has_header == (p == with_h)
        assert r.cat_names == AVAZU_CAT_COLS and len(r.cat_names) == 23 and r.num_names == []
        assert "hour" not in r.cat_names and "id" not in r.cat_names and r.label_name == "click"
        batch, stats = read_all(p)
        assert batch.label.tolist() == [0, 1, 0] and batch.num.shape == (3, 0) and stats.rows == 3
        cat = dict(zip(r.cat_names, (c.to_pylist() for c in batch.cat)))
        assert cat["hour_of_day"] == ["13", "00", "23"]
        assert cat["weekday"] == ["2", "6", "0"]  # 2014-10-21 Tue, 10-25 Sat, 10-26 Sun (strftime %w)
        assert cat["C1"] == ["1005"] * 3 and cat["device_ip"] == ["ip0", "ip1", "ip2"]
        assert cat["C21"] == ["79"] * 3


def test_avazu_chunked_equals_whole(tmp_path):
    rows = [_avazu_row(i, str(i % 3 == 0 and 1 or 0), f"141021{i % 24:02d}") for i in range(400)]
    p = _write(tmp_path / "a.csv", [",".join(AVAZU_COLUMNS), *rows])
    whole = list(AvazuReader(p))
    chunks = list(AvazuReader(p, block_size=2048))
    assert len(whole) == 1 and len(chunks) > 5
    a, b = _concat(whole), _concat(chunks)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and len(a[0]) == 400
    assert chunks[1].first_line == 2 + len(chunks[0].label)  # line numbers continue across chunks (header = line 1)


@pytest.mark.parametrize("bad, msg", [
    (_avazu_row(9, n_cols=23), r"a\.csv:line 4: expected 24 comma-separated columns .*got 23"),
    (_avazu_row(9, click="2"), r"a\.csv:line 4: click must be 0 or 1, got '2'"),
    (_avazu_row(9, hour="1410211"), r"a\.csv:line 4, field hour: expected YYMMDDHH .*got '1410211'"),
    (_avazu_row(9, hour="14102125"), r"a\.csv:line 4, field hour: .*got '14102125'"),
    (_avazu_row(9, hour="14133100"), r"a\.csv:line 4, field hour: .*got '14133100'"),
])
def test_avazu_bad_rows_name_file_and_line(tmp_path, bad, msg):
    p = _write(tmp_path / "a.csv", [",".join(AVAZU_COLUMNS), _avazu_row(0), _avazu_row(1), bad, _avazu_row(2, "1")])
    with pytest.raises(CtrError, match=msg):
        read_all(p)
    batch, stats = read_all(p, skip_bad_rows=True)
    assert stats.skipped == 1 and batch.label.tolist() == [0, 0, 1]
    assert "line 4" in stats.skipped_examples[0]


def test_avazu_skip_counts_several_and_headerless_line_numbers(tmp_path):
    p = _write(tmp_path / "d.csv", [_avazu_row(0), _avazu_row(1, click="x"), _avazu_row(2, hour="abc"),
                                    _avazu_row(3, n_cols=25), _avazu_row(4, "1")])
    with pytest.raises(CtrError, match=r"d\.csv:line 2: click"):
        read_all(p)
    batch, stats = read_all(p, skip_bad_rows=True)
    assert stats.skipped == 3 and batch.label.tolist() == [0, 1]
    for line in ("line 2", "line 3", "line 4"):
        assert sum(f"d.csv:{line}" in e for e in stats.skipped_examples) == 1


@pytest.mark.parametrize("block_size", [1 << 20, 600])
def test_avazu_line_numbers_after_dropped_rows(tmp_path, block_size):
    rows = [_avazu_row(i) for i in range(20)]
    rows[3] = _avazu_row(3, n_cols=22)  # line 4: dropped by the parser
    rows[6] = _avazu_row(6, click="7")  # line 7: must still be called line 7
    rows[15] = _avazu_row(15, hour="2014")  # line 16
    p = _write(tmp_path / "d.csv", rows)
    with pytest.raises(CtrError, match=r"d\.csv:line 4: expected 24"):
        list(AvazuReader(p, block_size=block_size))
    r = AvazuReader(p, skip_bad_rows=True, block_size=block_size)
    assert sum(len(b.label) for b in r) == 17 and r.stats.skipped == 3
    assert sorted(e.split("d.csv:")[1].split(":")[0].split(",")[0] for e in r.stats.skipped_examples) == \
        ["line 16", "line 4", "line 7"]
    rows[3] = _avazu_row(3)
    with pytest.raises(CtrError, match=r"d\.csv:line 7: click must be 0 or 1, got '7'"):
        list(AvazuReader(_write(p, rows), block_size=block_size))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_avazu_missing_empty_gzip_and_truncated_gzip(tmp_path):
    with pytest.raises(CtrError, match=r"nope\.csv: data file not found"):
        AvazuReader(tmp_path / "nope.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(CtrError, match=r"e\.csv: data file is empty"):
        AvazuReader(tmp_path / "e.csv")
    text = "\n".join([",".join(AVAZU_COLUMNS)] + [_avazu_row(i, "1" if i % 4 == 0 else "0") for i in range(3000)])
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    batch, _ = read_all(gz, fmt="avazu")
    assert len(batch.label) == 3000 and batch.label.sum() == 750
    assert detect_format(gz) == "avazu"
    data = gzip.compress(text.encode())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CtrError, match=r"cut\.csv\.gz"):
        read_all(cut, fmt="avazu")


def test_avazu_rejects_foreign_header(tmp_path):
    p = _write(tmp_path / "h.csv", ["id,click,when", _avazu_row(0)])
    with pytest.raises(CtrError, match=r"h\.csv:line 1: header is not the Avazu layout"):
        AvazuReader(p)


# ----------------------------------------------------------------------------- libSVM / FFM

def test_libsvm_parses_labels_and_fields(tmp_path):
    p = _write(tmp_path / "f.libfm", ["1 451:1 4149:1 5041:1", "-1 12:1 4149:1 5042:1", "0.0 7:1 8:0.5 9:1e3",
                                      "", "1.0 1:1 2:1 3:1", "+1 a:1 b:1 c:1"])
    r = LibSVMReader(p)
    assert r.cat_names == ["f1", "f2", "f3"] and r.num_names == [] and r.n_fields == 3
    batch, stats = read_all(p)
    assert batch.label.tolist() == [1, 0, 0, 1, 1] and batch.num.shape == (5, 0)
    assert [c.to_pylist() for c in batch.cat] == [["451", "12", "7", "1", "a"], ["4149", "4149", "8", "2", "b"],
                                                 ["5041", "5042", "9", "3", "c"]]
    assert stats.rows == 5 and stats.skipped == 0


def test_ffm_takes_idx_and_ignores_field_prefix(tmp_path):
    p = _write(tmp_path / "d.ffm", ["1 0:10:1 1:20:1", "0 0:11:1 1:21:1"])
    batch, _ = read_all(p)
    assert batch.label.tolist() == [1, 0]
    assert [c.to_pylist() for c in batch.cat] == [["10", "11"], ["20", "21"]]


def test_libsvm_chunked_equals_whole_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    lines = [f"{rng.integers(0, 2)} " + " ".join(f"{rng.integers(0, 50) + 100 * k}:1" for k in range(6))
             for _ in range(1000)]
    p = _write(tmp_path / "x.svm", lines)
    whole = list(LibSVMReader(p))
    chunks = list(LibSVMReader(p, block_size=1024))
    assert len(whole) == 1 and len(chunks) > 10
    a, b = _concat(whole), _concat(chunks)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and len(a[0]) == 1000
    assert a[0].tolist() == [int(line[0]) for line in lines]
    assert chunks[1].first_line == 1 + len(chunks[0].label)
    gz = tmp_path / "x.svm.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    g = _concat(list(LibSVMReader(gz, block_size=4096)))
    np.testing.assert_array_equal(g[0], a[0])
    assert g[2] == a[2]


@pytest.mark.parametrize("bad, msg", [
    ("1 1:1 2:1", r"x\.svm:line 3: expected a label and 3 tokens .*got 2"),
    ("1 1:1 2:1 3:1 4:1", r"x\.svm:line 3: expected a label and 3 tokens .*got 4"),
    ("2 1:1 2:1 3:1", r"x\.svm:line 3: label must be 1 or 0 .*got '2'"),
    ("yes 1:1 2:1 3:1", r"x\.svm:line 3: label must be .*got 'yes'"),
    ("1 1:1 2 3:1", r"x\.svm:line 3: token 2 \(field f2\) must be idx:val .*got '2'"),
    ("1 1:1 2:x 3:1", r"x\.svm:line 3: token 2 \(field f2\) .*got '2:x'"),
    ("1 1:1 2:1 0:3:1", r"x\.svm:line 3: token 3 \(field f3\) .*got '0:3:1'"),
])
def test_libsvm_bad_lines_name_file_and_line(tmp_path, bad, msg):
    p = _write(tmp_path / "x.svm", ["1 1:1 2:1 3:1", "0 4:1 5:1 6:1", bad, "1 7:1 8:1 9:1"])
    with pytest.raises(CtrError, match=msg):
        read_all(p)
    batch, stats = read_all(p, skip_bad_rows=True)
    assert stats.skipped == 1 and batch.label.tolist() == [1, 0, 1]
    assert batch.cat[0].to_pylist() == ["1", "4", "7"]


def test_libsvm_first_valid_line_fixes_field_count(tmp_path):
    p = _write(tmp_path / "x.svm", ["bad 1:1", "1 1:1 2:1", "0 3:1 4:1"])
    r = LibSVMReader(p, skip_bad_rows=True)
    assert r.n_fields == 2
    batch, _ = read_all(p, skip_bad_rows=True)
    assert batch.label.tolist() == [1, 0]
    with pytest.raises(CtrError, match=r"x\.svm:line 1: expected a label and 2 tokens .*got 1"):
        read_all(p)
    p2 = _write(tmp_path / "y.svm", ["x 1", "y 2"])
    with pytest.raises(CtrError, match=r"no valid line .*y\.svm:line 1: label must be"):
        LibSVMReader(p2)


def test_libsvm_missing_empty_blank_and_truncated_gzip(tmp_path):
    with pytest.raises(CtrError, match=r"nope\.svm: data file not found"):
        LibSVMReader(tmp_path / "nope.svm")
    (tmp_path / "e.svm").write_text("")
    with pytest.raises(CtrError, match=r"e\.svm: data file is empty"):
        LibSVMReader(tmp_path / "e.svm")
    (tmp_path / "b.svm").write_text("\n\n  \n")
    with pytest.raises(CtrError, match=r"b\.svm: no data lines"):
        LibSVMReader(tmp_path / "b.svm")
    lines = [f"{i % 2} {i % 7}:1 {i % 11}:1 {i % 13}:1" for i in range(20000)]
    data = gzip.compress("\n".join(lines).encode())
    cut = tmp_path / "cut.svm.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CtrError, match=r"cut\.svm\.gz: near line \d+: cannot read"):
        read_all(cut, fmt="libsvm")
    with pytest.raises(CtrError, match=r"cut\.svm\.gz"):
        read_all(cut)


# ----------------------------------------------------------------------------- Parquet

def _table(n=10):
    return pa.table({
        "click": pa.array([i % 2 for i in range(n)], pa.int64()),
        "user": pa.array([f"u{i % 3}" if i != 4 else None for i in range(n)], pa.string()),
        "item_code": pa.array([i * 10 for i in range(n)], pa.int32()),
        "price": pa.array([float(i) if i != 2 else None for i in range(n)], pa.float64()),
        "flag": pa.array([i % 3 == 0 for i in range(n)]),
        "brand": pa.array([f"b{i % 2}" for i in range(n)]).dictionary_encode(),
        "hist": pa.array([list(range(i % 4)) if i != 5 else None for i in range(n)], pa.list_(pa.int64())),
        "ts": pa.array(range(n), pa.int64()).cast(pa.timestamp("s")),
    })


def test_parquet_roles_from_schema(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(_table(), p)
    r = ParquetReader(p, categorical=["item_code"])
    assert r.label_name == "click"
    assert r.cat_names == ["user", "item_code", "brand"] and r.num_names == ["price", "flag"]
    assert r.seq_name == "hist" and [name for name, _ in r.ignored] == ["ts"]
    b = _concat(list(r))
    assert b[0].tolist() == [i % 2 for i in range(10)]
    assert b[2][0][4] == "" and b[2][0][0] == "u0" and b[2][1][3] == "30" and b[2][2][:2] == ["b0", "b1"]
    assert np.isnan(b[1][2, 0]) and b[1][3].tolist() == [3.0, 1.0]
    assert b[3][3] == ["0", "1", "2"] and b[3][5] == [] and b[3][0] == []
    r2 = ParquetReader(p)  # without categorical=, the int column is numeric
    assert "item_code" in r2.num_names and field_names(r2)["sequence"] == "hist"


def test_parquet_batches_equal_whole_and_folder(tmp_path):
    t = _table(1000)
    p = tmp_path / "t.parquet"
    pq.write_table(t, p, row_group_size=128)
    whole = _concat(list(ParquetReader(p)))
    parts = list(ParquetReader(p, batch_size=37))
    assert len(parts) > 20 and parts[1].first_line == 38
    small = _concat(parts)
    np.testing.assert_array_equal(whole[0], small[0])
    np.testing.assert_array_equal(whole[1], small[1])
    assert whole[2] == small[2] and whole[3] == small[3]
    d = tmp_path / "folder"
    d.mkdir()
    pq.write_table(t.slice(0, 600), d / "part-0.parquet")
    pq.write_table(t.slice(600), d / "part-1.parquet")
    assert detect_format(d) == "parquet"
    batch, stats = read_all(d)
    np.testing.assert_array_equal(batch.label, whole[0])
    assert batch.seq.to_pylist() == whole[3] and stats.rows == 1000


def test_parquet_label_choice_and_validation(tmp_path):
    t = _table().append_column("label", pa.array([1, 0, 1, 0, 2, 1, 0, 1, 0, 1]))
    p = tmp_path / "t.parquet"
    pq.write_table(t, p)
    with pytest.raises(CtrError, match=r"t\.parquet:row 5: label 'label' must be 0 or 1, got 2"):
        read_all(p)
    batch, stats = read_all(p, skip_bad_rows=True)
    assert stats.skipped == 1 and len(batch.label) == 9 and len(batch.seq) == 9
    r = ParquetReader(p, label="click")
    assert r.label_name == "click" and "label" in r.num_names
    lab = _table().set_column(0, "click", pa.array([0, 1, None, 1, 0, 1, 0, 1, 0, 1], pa.int64()))
    pq.write_table(lab, tmp_path / "n.parquet")
    with pytest.raises(CtrError, match=r"n\.parquet:row 3: label 'click' must be 0 or 1, got None"):
        read_all(tmp_path / "n.parquet")
    pq.write_table(_table().drop_columns(["click"]), tmp_path / "x.parquet")
    with pytest.raises(CtrError, match=r"x\.parquet: no label column"):
        ParquetReader(tmp_path / "x.parquet")
    with pytest.raises(CtrError, match=r"label column 'y' not in the file"):
        ParquetReader(p, label="y")


def test_parquet_missing_empty_corrupt_and_two_sequences(tmp_path):
    with pytest.raises(CtrError, match=r"nope\.parquet: data file not found"):
        ParquetReader(tmp_path / "nope.parquet")
    (tmp_path / "e.parquet").write_bytes(b"")
    with pytest.raises(CtrError, match=r"e\.parquet: data file is empty"):
        ParquetReader(tmp_path / "e.parquet")
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CtrError, match=r"c\.parquet: cannot read as Parquet"):
        ParquetReader(tmp_path / "c.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CtrError, match=r"empty_dir: folder has no \*\.parquet files"):
        ParquetReader(tmp_path / "empty_dir")
    t = _table().append_column("hist2", pa.array([["a"]] * 10, pa.list_(pa.string())))
    pq.write_table(t, tmp_path / "s.parquet")
    with pytest.raises(CtrError, match=r"several list columns \['hist', 'hist2'\]"):
        ParquetReader(tmp_path / "s.parquet")
    r = ParquetReader(tmp_path / "s.parquet", sequence="hist2")
    assert r.seq_name == "hist2" and "hist" in [name for name, _ in r.ignored]
    with pytest.raises(CtrError, match="several list columns"):
        read_all(tmp_path / "s.parquet")
    # folder with mismatched schemas
    d = tmp_path / "mix"
    d.mkdir()
    pq.write_table(_table(), d / "a.parquet")
    pq.write_table(_table().drop_columns(["price"]), d / "b.parquet")
    with pytest.raises(CtrError, match=r"b\.parquet: schema differs"):
        ParquetReader(d)


# ----------------------------------------------------------------------------- detection / registry

def test_detect_format_and_registry(tmp_path):
    assert set(READERS) >= {"criteo", "avazu", "libsvm", "parquet"}
    rows = [_avazu_row(0), _avazu_row(1)]
    assert detect_format(_write(tmp_path / "h.csv", [",".join(AVAZU_COLUMNS), *rows])) == "avazu"
    assert detect_format(_write(tmp_path / "n.txt", rows)) == "avazu"
    assert detect_format(_write(tmp_path / "s.txt", ["1 3:1 5:1", "0 3:1 6:1"])) == "libsvm"
    assert detect_format(_write(tmp_path / "f.txt", ["-1 0:3:1 1:5:1"])) == "libsvm"
    for name in ("a.svm", "a.libsvm", "a.libfm", "a.ffm", "a.libfm.gz"):
        assert detect_format(tmp_path / name) == "libsvm"
    crit = "\t".join(["1"] + ["3"] * 13 + ["abcdef01"] * 26)
    assert detect_format(_write(tmp_path / "c.tsv", [crit])) == "criteo"
    assert detect_format(_write(tmp_path / "c2.csv", [crit])) == "criteo"
    pq.write_table(_table(), tmp_path / "noext")
    assert detect_format(tmp_path / "noext") == "parquet"
    assert detect_format(tmp_path / "x.parquet") == "parquet"
    gz = tmp_path / "s.txt.gz"
    gz.write_bytes(gzip.compress(b"1 3:1 5:1\n"))
    assert detect_format(gz) == "libsvm"
    assert isinstance(open_reader(tmp_path / "s.txt"), LibSVMReader)
    assert isinstance(open_reader(tmp_path / "n.txt"), AvazuReader)
    assert isinstance(open_reader(tmp_path / "noext"), ParquetReader)
    with pytest.raises(CtrError, match="unknown data format 'xml'"):
        open_reader(tmp_path / "n.txt", fmt="xml")


# ----------------------------------------------------------------------------- MovieLens builder

def _movielens(tmp_path, ratings):
    rp = _write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp",
                                           *(f"{u},{m},{r},{t}" for u, m, r, t in ratings)])
    mp = _write(tmp_path / "movies.csv", [
        "movieId,title,genres",
        '1,Toy Story (1995),Adventure|Animation|Children',
        '2,"American President, The (1995)",Comedy|Drama|Romance',
        "3,No Year Film,(no genres listed)",
        "4,Some Series (2006–2007),Drama",
        "5,Trailing Space (2001) ,Horror",
    ])
    return rp, mp


RATINGS = [  # user, movie, rating, timestamp (not sorted on purpose)
    (1, 3, 4.0, 500), (1, 1, 5.0, 100), (1, 2, 3.5, 300), (1, 4, 4.5, 700), (1, 5, 1.0, 900),
    (2, 2, 4.0, 200), (2, 1, 2.0, 200), (2, 3, 4.0, 600), (2, 9, 3.0, 800),
    (3, 5, 5.0, 400), (3, 4, 0.5, 1000),
]


def test_movielens_builder_features_history_and_splits(tmp_path):
    rp, mp = _movielens(tmp_path, RATINGS)
    meta = build_movielens(rp, mp, tmp_path / "task", max_history=3, val_frac=0.2, test_frac=0.2)
    out = tmp_path / "task"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert sum(s["rows"] for s in meta["splits"].values()) == len(RATINGS) == meta["rows"]
    rows = []
    for split in ("train", "val", "test"):
        r = ParquetReader(out / f"{split}.parquet")
        assert r.cat_names == ["userId", "movieId", "genre"] and r.num_names == ["user_n_prev", "movie_year"]
        assert r.seq_name == "history" and r.label_name == "label"
        t = pq.read_table(out / f"{split}.parquet").to_pylist()
        b = _concat(list(r))
        assert b[0].tolist() == [x["label"] for x in t]
        rows += [dict(x, split=split, ts=int(x["timestamp"].timestamp())) for x in t]
    by_event = {(int(x["userId"]), int(x["movieId"])): x for x in rows}
    truth = {(u, m): (r, t) for u, m, r, t in RATINGS}
    for (u, m), x in by_event.items():
        r, t = truth[(u, m)]
        assert x["label"] == int(r >= 4) and x["ts"] == t
        earlier = sorted((tt, mm) for (uu, mm), (_, tt) in truth.items() if uu == u and (tt, mm) < (t, m))
        assert x["user_n_prev"] == len(earlier)
        assert x["history"] == [str(mm) for _, mm in earlier][-3:]  # strictly earlier, most recent last, truncated
    assert by_event[(1, 5)]["history"] == ["2", "3", "4"]  # 4 earlier events, the oldest (movie 1) dropped
    assert by_event[(2, 2)]["history"] == ["1"]  # same timestamp: ties ordered by movieId
    assert by_event[(2, 1)]["history"] == []
    assert by_event[(1, 1)]["genre"] == "Adventure" and by_event[(2, 2)]["genre"] == "Comedy"
    assert by_event[(1, 3)]["genre"] == "" and by_event[(2, 9)]["genre"] == ""  # no genres / not in movies.csv
    assert by_event[(1, 2)]["movie_year"] == 1995 and by_event[(1, 4)]["movie_year"] == 2006
    assert by_event[(1, 5)]["movie_year"] == 2001 and np.isnan(by_event[(1, 3)]["movie_year"])
    # time-ordered splits: everything in train is older than val, val older than test
    ts = {s: [x["ts"] for x in rows if x["split"] == s] for s in ("train", "val", "test")}
    assert all(len(v) for v in ts.values())
    assert max(ts["train"]) < min(ts["val"]) and max(ts["val"]) < min(ts["test"])
    assert ts["test"] == sorted(ts["test"])  # rows in time order
    assert meta["splits"]["train"]["ctr"] == pytest.approx(np.mean([x["label"] for x in rows if x["split"] == "train"]))


def test_movielens_builder_errors(tmp_path):
    rp, mp = _movielens(tmp_path, RATINGS)
    with pytest.raises(CtrError, match=r"nope\.csv: file not found"):
        build_movielens(tmp_path / "nope.csv", mp, tmp_path / "o")
    bad = _write(tmp_path / "bad.csv", ["userId,movieId,rating,timestamp", "1,2,4.0,10", "1,x,3.0,11"])
    with pytest.raises(CtrError, match=r"bad\.csv:line 3, field movieId: expected an integer, got 'x'"):
        build_movielens(bad, mp, tmp_path / "o")
    cols = _write(tmp_path / "cols.csv", ["user,movieId,rating,timestamp", "1,2,4.0,10"])
    with pytest.raises(CtrError, match=r"cols\.csv: missing column\(s\) \['userId'\]"):
        build_movielens(cols, mp, tmp_path / "o")
    with pytest.raises(CtrError, match="val_frac and test_frac"):
        build_movielens(rp, mp, tmp_path / "o", val_frac=0.6, test_frac=0.5)


# ----------------------------------------------------------------------------- every text reader

def _criteo_line(i: int) -> bytes:
    return ("\t".join(["1" if i % 2 else "0"] + [str(i)] * 13 + [f"c{i}"] * 26) + "\n").encode()


@pytest.mark.parametrize("fmt", ["criteo", "avazu", "libsvm"])
@pytest.mark.parametrize("where", ["categorical", "first field"])
def test_a_line_that_is_not_utf8_is_named_by_file_and_line_or_skipped(tmp_path, fmt, where):
    """Latin-1 bytes in a later chunk of the file: the error names the file's line (not the chunk's row)
    and the field; with --skip-bad-rows exactly that row is dropped and counted, the others are intact."""
    n, bad_at = 40, 29  # 1-based data line of the bad row, well past the first chunk
    if fmt == "criteo":
        lines = [_criteo_line(i) for i in range(n)]
        field = "C1" if where == "categorical" else "label"
        lines[bad_at - 1] = (lines[bad_at - 1].replace(b"c28", b"caf\xe9", 1) if where == "categorical"
                             else b"\xff" + lines[bad_at - 1][1:])
        header, cls = [], "CriteoReader"
    elif fmt == "avazu":
        lines = [(_avazu_row(i, click=str(i % 2)) + "\n").encode() for i in range(n)]
        field = "site_id" if where == "categorical" else "click"
        lines[bad_at - 1] = (lines[bad_at - 1].replace(b"site", b"s\xe9te", 1) if where == "categorical"
                             else lines[bad_at - 1].replace(b",0,", b",\xff,", 1))
        header, cls = [(",".join(AVAZU_COLUMNS) + "\n").encode()], "AvazuReader"
    else:
        lines = [f"{i % 2} 1:{i} 2:{i + 1} 3:1\n".encode() for i in range(n)]
        field = None  # libSVM lines are decoded whole
        lines[bad_at - 1] = (lines[bad_at - 1].replace(b"2:", b"2:\xe9", 1) if where == "categorical"
                             else b"\xff" + lines[bad_at - 1][1:])
        header, cls = [], "LibSVMReader"
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(b"".join(header + lines))
    line_no = bad_at + len(header)
    reader = {"CriteoReader": CriteoReader, "AvazuReader": AvazuReader, "LibSVMReader": LibSVMReader}[cls]
    pattern = rf"bad\.{fmt}:line {line_no}" + (rf", field {field}" if field else "") + ": not UTF-8 text"
    with pytest.raises(CtrError, match=pattern):
        list(reader(path, block_size=256))
    r = reader(path, skip_bad_rows=True, block_size=256)
    batches = list(r)
    assert len(batches) >= 2 and r.stats.skipped == 1 and "not UTF-8" in r.stats.skipped_examples[0]
    labels = np.concatenate([b.label for b in batches])
    assert labels.tolist() == [i % 2 for i in range(n) if i != bad_at - 1]
    # the rows after the bad one keep their own values (nothing shifted)
    if fmt != "libsvm":
        whole = _concat(batches)[2]
        col = 0 if fmt == "criteo" else AVAZU_CAT_COLS.index("device_ip")
        expect = [f"c{i}" for i in range(n)] if fmt == "criteo" else [f"ip{i}" for i in range(n)]
        assert whole[col] == expect[: bad_at - 1] + expect[bad_at:]

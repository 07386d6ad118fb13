"""JSON Lines reader: roles from the values, bad lines by file and line, gzip, detection, fit/encode/prepare."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.prepared import prepare as prep
from ctr_ensemble.data.prepared.shards import Prepared
from ctr_ensemble.data.readers import concat_batches, detect_format, open_reader, read_all
from ctr_ensemble.data.readers import jsonl
from ctr_ensemble.data.readers.jsonl import JSONLReader
from ctr_ensemble.errors import CtrError


def _rows(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = int(rng.integers(0, 40))
        out.append({"click": int(rng.random() < (0.7 if u % 3 == 0 else 0.2)), "user": f"u{u}",
                    "site": None if i % 17 == 0 else f"s{rng.integers(0, 9)}",
                    "price": None if i % 13 == 0 else round(float(rng.lognormal(1, 1)), 3),
                    "hist": [f"m{int(x)}" for x in rng.integers(0, 30, int(rng.integers(0, 6)))]})
    return out


def _write(path, rows, extra_lines=()):
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _arrays_equal(a, b):
    fa, fb = a.feeds(), b.feeds()
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    np.testing.assert_array_equal(a.label, b.label)


def test_roles_values_and_missing(tmp_path):
    rows = [{"label": 1, "user": "u1", "n": 3, "flag": True, "hist": ["a", 7], "meta": {"x": 1}},
            {"label": 0.0, "user": None, "hist": None},  # null and absent keys are missing values
            {"label": "1", "user": "u2", "n": 2.5, "flag": False, "hist": [], "late": None}]
    p = _write(tmp_path / "a.jsonl", rows, ["", "  "])  # blank lines are ignored
    r = open_reader(p)
    assert isinstance(r, JSONLReader) and r.label_name == "label" and r.seq_name == "hist"
    assert (r.cat_names, r.num_names, r.ignored) == (["user", "late"], ["n", "flag"], ["meta"])
    batch, stats = read_all(p)
    assert batch.label.tolist() == [1, 0, 1] and stats.rows == 3 and stats.skipped == 0
    np.testing.assert_array_equal(batch.num, [[3, 1], [np.nan, np.nan], [2.5, 0]])
    assert batch.cat[0].to_pylist() == ["u1", "", "u2"] and batch.cat[1].to_pylist() == ["", "", ""]
    assert batch.seq.to_pylist() == [["a", "7"], [], []]


def test_chunked_equals_whole_and_gzip(tmp_path):
    p = _write(tmp_path / "x.jsonl", _rows(1000))
    whole, chunks = list(JSONLReader(p)), list(JSONLReader(p, block_size=2048))
    assert len(whole) == 1 and len(chunks) > 10
    assert chunks[1].first_line == 1 + len(chunks[0].label)
    a, b = read_all(p)[0], concat_batches(chunks)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    g = read_all(gz)[0]
    for other in (b, g):
        np.testing.assert_array_equal(other.label, a.label)
        np.testing.assert_array_equal(other.num, a.num)
        assert [c.to_pylist() for c in other.cat] == [c.to_pylist() for c in a.cat]
        assert other.seq.to_pylist() == a.seq.to_pylist()
    assert np.concatenate([c.label for c in chunks]).tolist() == a.label.tolist()


@pytest.mark.parametrize("bad, msg", [
    ('{"click": 1, "user": "u1"', r"x\.jsonl:line 3: not valid JSON"),
    ('[1, "u1"]', r"x\.jsonl:line 3: expected a JSON object, got list"),
    ('{"click": 2, "user": "u1"}', r"x\.jsonl:line 3, field click: label must be 0 or 1, got 2"),
    ('{"user": "u1"}', r"x\.jsonl:line 3, field click: label must be 0 or 1, got null"),
    ('{"click": 1, "user": 5}', r"x\.jsonl:line 3, field user: expected a string \(categorical\), got 5"),
    ('{"click": 1, "price": "3"}', r"x\.jsonl:line 3, field price: expected a number \(numeric\)"),
    ('{"click": 1, "hist": "m1"}', r"x\.jsonl:line 3, field hist: expected a list \(sequence\)"),
    ('{"click": 1, "hist": [{"m": 1}]}', r"x\.jsonl:line 3, field hist: history items must be strings"),
    ('{"click": 1, "colour": "red"}', r"x\.jsonl:line 3: key\(s\) \['colour'\] not in the first lines' keys"),
    (b'{"click": 1, "user": "caf\xe9"}', r"x\.jsonl:line 3: not UTF-8 text"),
])
def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path, monkeypatch, bad, msg):
    monkeypatch.setattr(jsonl, "_PEEK_LINES", 2)  # the keys and roles come from lines 1-2
    good = [json.dumps(r) for r in _rows(3)]
    p = tmp_path / "x.jsonl"
    bad = bad if isinstance(bad, bytes) else bad.encode()
    p.write_bytes(b"\n".join([good[0].encode(), good[1].encode(), bad, good[2].encode()]) + b"\n")
    with pytest.raises(CtrError, match=msg):
        read_all(p)
    batch, stats = read_all(p, skip_bad_rows=True)
    assert stats.skipped == 1 and len(batch.label) == 3
    assert batch.cat[0].to_pylist() == [r["user"] for r in _rows(3)]


def test_line_numbers_in_a_later_chunk(tmp_path):
    rows = [json.dumps(r) for r in _rows(300)]
    rows[250] = '{"click": 1, "user": 9}'
    p = _write(tmp_path / "x.jsonl", rows)
    with pytest.raises(CtrError, match=r"x\.jsonl:line 251, field user"):
        list(JSONLReader(p, block_size=1024))
    r = JSONLReader(p, block_size=1024, skip_bad_rows=True)
    assert sum(len(b.label) for b in r) == 299 and r.stats.skipped == 1


def test_missing_empty_no_label_two_lists_and_truncated_gzip(tmp_path):
    with pytest.raises(CtrError, match=r"nope\.jsonl: data file not found"):
        JSONLReader(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CtrError, match=r"e\.jsonl: data file is empty"):
        JSONLReader(tmp_path / "e.jsonl")
    (tmp_path / "b.jsonl").write_text("\n \n")
    with pytest.raises(CtrError, match=r"b\.jsonl: no data lines"):
        JSONLReader(tmp_path / "b.jsonl")
    with pytest.raises(CtrError, match=r"no JSON object among the first 1000 lines; first problem: .*j\.jsonl:line 1"):
        JSONLReader(_write(tmp_path / "j.jsonl", ["not json", "[1]"]))
    with pytest.raises(CtrError, match=r"n\.jsonl: no label key .*keys: \['user'\]"):
        JSONLReader(_write(tmp_path / "n.jsonl", ['{"user": "u"}']))
    two = _write(tmp_path / "t.jsonl", ['{"label": 1, "a": ["x"], "b": ["y"]}'])
    with pytest.raises(CtrError, match=r"several list keys \['a', 'b'\]"):
        JSONLReader(two)
    r = JSONLReader(two, sequence="b")
    assert r.seq_name == "b" and r.ignored == ["a"]
    assert JSONLReader(two, label="label", sequence="a").cat_names == []
    data = gzip.compress("\n".join(json.dumps(r) for r in _rows(20000)).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CtrError, match=r"cut\.jsonl\.gz: near line \d+: cannot read"):
        read_all(cut)


def test_detection_by_suffix_and_first_line(tmp_path):
    row = json.dumps({"click": 1, **{f"k{i}": "v" for i in range(23)}})  # 23 commas: would pass avazu's sniff
    for name in ("a.jsonl", "a.ndjson", "a.JSONL.gz"):
        assert detect_format(tmp_path / name) == "jsonl"
    assert detect_format(_write(tmp_path / "plain.txt", [row])) == "jsonl"
    gz = tmp_path / "events.gz"
    gz.write_bytes(gzip.compress((row + "\n").encode()))
    assert detect_format(gz) == "jsonl"
    assert isinstance(open_reader(tmp_path / "plain.txt"), JSONLReader)
    assert detect_format(_write(tmp_path / "c.tsv", ["\t".join(["1"] + ["3"] * 13 + ["ab"] * 26)])) == "criteo"


def test_fit_and_encode_equal_the_same_rows_as_parquet(tmp_path):
    rows = _rows()
    src = _write(tmp_path / "train.jsonl", rows)
    table = pa.table({"click": pa.array([r["click"] for r in rows], pa.int64()),
                      "user": pa.array([r["user"] for r in rows], pa.string()),
                      "site": pa.array([r["site"] for r in rows], pa.string()),
                      "price": pa.array([r["price"] for r in rows], pa.float64()),
                      "hist": pa.array([r["hist"] for r in rows], pa.list_(pa.string()))})
    pq.write_table(table, tmp_path / "train.parquet")
    spec = fit(src, min_count=2, seq_max_len=4)
    ref = fit(tmp_path / "train.parquet", min_count=2, seq_max_len=4)
    assert spec.fitted_on["format"] == "jsonl" and spec.fitted_on["rows"] == 3000
    assert [f.vocab for f in spec.categorical] == [f.vocab for f in ref.categorical]
    assert [(f.name, f.mean, f.std) for f in spec.numeric] == [(f.name, f.mean, f.std) for f in ref.numeric]
    assert spec.sequence == ref.sequence and set(spec.input_names) == {"cat_ids", "num", "seq_ids", "seq_len"}
    _arrays_equal(encode_file(src, spec), encode_file(tmp_path / "train.parquet", spec))


def test_data_prepare_in_pieces_equals_encode_file(tmp_path):
    rows = [json.dumps(r) for r in _rows()]
    rows[2500] = "{broken"  # in a later piece: with skip_bad_rows counted, its line found when needed
    src = _write(tmp_path / "train.jsonl", rows)
    opts = prep.PrepareOptions(min_count=2, chunk_mb=0.05, workers=1, seq_max_len=4, skip_bad_rows=True)
    r = prep.prepare([src], tmp_path / "p", opts, progress=False)
    assert r.shards > 3 and r.rows == 2999 and r.skipped == 1
    p = Prepared(tmp_path / "p", verify="full")
    ref = encode_file(src, p.spec, skip_bad_rows=True)
    feeds, want = p.feeds(), ref.feeds()
    for k in want:
        np.testing.assert_array_equal(feeds[k], want[k], err_msg=k)
    np.testing.assert_array_equal(p.labels(), ref.label)
    with pytest.raises(CtrError, match=r"train\.jsonl:line 2501: not valid JSON"):
        prep.prepare([src], tmp_path / "q", prep.PrepareOptions(min_count=2, chunk_mb=0.05, seq_max_len=4),
                     progress=False)

import gzip

import numpy as np
import pytest

from ctr_ensemble.data.encode import Encoder
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.readers import read_all
from ctr_ensemble.data.readers.criteo import CAT_COLS, N_CAT, N_NUM, CriteoReader
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.data.synth import SynthWorld, generate
from ctr_ensemble.errors import CtrError
from tests.conftest import tiny_synth


def _row(label="1", num=None, cat=None):
    num = num if num is not None else [str(i) for i in range(N_NUM)]
    cat = cat if cat is not None else [f"{i:08x}" for i in range(N_CAT)]
    return "\t".join([label, *num, *cat])


def _write(tmp_path, lines, name="d.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_synth_is_seeded_and_writes_true_p(tmp_path):
    cfg = tiny_synth(train=500, val=10, test=300)
    m1 = generate(tmp_path / "a", cfg)
    m2 = generate(tmp_path / "b", cfg)
    assert (tmp_path / "a" / "test.tsv").read_bytes() == (tmp_path / "b" / "test.tsv").read_bytes()
    p = np.load(tmp_path / "a" / "test.p.npy")
    assert p.shape == (300,) and ((p > 0) & (p < 1)).all()
    assert m1["splits"]["test"]["oracle_auc"] == m2["splits"]["test"]["oracle_auc"] > 0.6
    batch, _ = read_all(tmp_path / "a" / "test.tsv")
    assert len(batch.label) == 300 and np.isnan(batch.num).any()  # missing numerics present


def test_synth_world_has_zipf_frequencies_and_target_ctr():
    world = SynthWorld(tiny_synth())
    freq = np.sort(world.freq[2])[::-1]
    assert freq[0] > 10 * freq[len(freq) // 2]  # heavy head
    _, _, p, y, _ = world.sample(np.random.default_rng(0), 20000)
    assert abs(p.mean() - world.cfg.target_ctr) < 0.03


def test_reader_streams_in_chunks_identically(tiny_data):
    whole, _ = read_all(tiny_data / "val.tsv")
    chunks = list(CriteoReader(tiny_data / "val.tsv", block_size=4096))
    assert len(chunks) > 5
    np.testing.assert_array_equal(np.concatenate([c.label for c in chunks]), whole.label)
    np.testing.assert_array_equal(np.concatenate([c.num for c in chunks]), whole.num)


def test_wrong_column_count_names_file_and_line(tmp_path):
    p = _write(tmp_path, [_row(), _row(), _row(cat=["a"] * (N_CAT - 1))])
    with pytest.raises(CtrError, match=r"d\.tsv:line 3: expected 40 .*got 39"):
        read_all(p)


def test_bad_number_and_bad_label_name_line_and_field(tmp_path):
    num = [str(i) for i in range(N_NUM)]
    num[4] = "12x"
    p = _write(tmp_path, [_row(), _row(num=num)])
    with pytest.raises(CtrError, match=r"line 2, field I5: expected a number or empty, got '12x'"):
        read_all(p)
    p = _write(tmp_path, [_row(label="2")], name="l.tsv")
    with pytest.raises(CtrError, match=r"l\.tsv:line 1: label must be 0 or 1, got '2'"):
        read_all(p)


def test_skip_bad_rows_counts_instead_of_failing(tmp_path):
    num = [str(i) for i in range(N_NUM)]
    num[0] = "abc"
    p = _write(tmp_path, [_row(), _row(cat=["a"]), _row(num=num), _row(label="0")])
    batch, stats = read_all(p, skip_bad_rows=True)
    assert len(batch.label) == 2 and stats.skipped == 2
    assert batch.label.tolist() == [1, 0]


@pytest.mark.parametrize("block_size", [1 << 20, 700])
def test_line_numbers_stay_right_after_rows_the_parser_dropped(tmp_path, block_size):
    rows = [_row(label=str(i % 2), cat=[f"r{i}"] * N_CAT) for i in range(20)]
    rows[3] = _row(cat=["a"] * (N_CAT - 2))  # line 4: wrong column count, dropped by the parser
    rows[6] = _row(label="7")  # line 7: must still be called line 7
    num = [str(i) for i in range(N_NUM)]
    num[2] = "x"
    rows[15] = _row(num=num)  # line 16
    p = _write(tmp_path, rows)
    r = CriteoReader(p, block_size=block_size, skip_bad_rows=True)
    batches = list(r)
    assert sum(len(b.label) for b in batches) == 17 and r.stats.skipped == 3
    assert sorted(e.split("d.tsv:")[1].split(":")[0].split(",")[0] for e in r.stats.skipped_examples) == \
        ["line 16", "line 4", "line 7"]
    kept = [t for b in batches for t in b.cat[0].to_pylist()]
    assert kept == [f"r{i}" for i in range(20) if i not in (3, 6, 15)]
    rows[3] = _row()
    with pytest.raises(CtrError, match=r"d\.tsv:line 7: label must be 0 or 1, got '7'"):
        list(CriteoReader(_write(tmp_path, rows), block_size=block_size))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # pyarrow cannot decode the bad row for its handler
def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(CtrError, match="not found"):
        read_all(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(CtrError, match="empty"):
        read_all(tmp_path / "empty.tsv")
    bad = tmp_path / "bin.tsv"
    bad.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(CtrError, match="bin.tsv"):
        read_all(bad)


def test_criteo_missing_values_are_nan_and_empty_token(tmp_path):
    num = [""] * N_NUM
    cat = [""] * N_CAT
    batch, _ = read_all(_write(tmp_path, [_row(num=num, cat=cat)]))
    assert np.isnan(batch.num).all()
    assert batch.cat[0][0].as_py() == ""


def test_spec_min_count_oov_and_missing(tmp_path):
    rows = []
    for i in range(10):
        cat = ["frequent"] * N_CAT
        cat[0] = "rare" if i == 0 else ("" if i < 5 else "frequent")
        num = ["" if i % 2 else str(i) for _ in range(N_NUM)]
        rows.append(_row(label=str(i % 2), num=num, cat=cat))
    spec = fit(_write(tmp_path, rows), min_count=2)
    c0 = spec.categorical[0]
    assert c0.vocab == ["frequent", ""]  # by count, "rare" (1 < min_count) dropped
    assert spec.numeric[0].mean == pytest.approx(np.mean(np.log1p([0, 2, 4, 6, 8])))
    test_rows = [_row(cat=["rare"] + ["unseen"] * (N_CAT - 1)), _row(cat=[""] + ["frequent"] * (N_CAT - 1))]
    batch, _ = read_all(_write(tmp_path, test_rows, name="t.tsv"))
    ids, num = Encoder(spec).encode(batch)
    assert ids[0].tolist() == [0] * N_CAT  # rare and unseen → OOV 0
    assert ids[1, 0] == 2 and ids[1, 1] == 1
    assert num.dtype == np.float32 and ids.dtype == np.int64


def test_spec_roundtrip_and_rejects_foreign_json(tmp_path, tiny_spec):
    tiny_spec.save(tmp_path / "s.json")
    back = FeatureSpec.load(tmp_path / "s.json")
    assert back.fingerprint() == tiny_spec.fingerprint() and back.cat_sizes == tiny_spec.cat_sizes
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(CtrError, match="not a ctr-ensemble feature spec"):
        FeatureSpec.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(CtrError, match="not valid JSON"):
        FeatureSpec.load(tmp_path / "y.json")


def test_vocab_is_fitted_on_train_only(tiny_data, tiny_spec):
    test_batch, _ = read_all(tiny_data / "test.tsv")
    ids, _ = Encoder(tiny_spec).encode(test_batch)
    train_tokens = set(tiny_spec.categorical[2].vocab)
    unseen = [t for t in test_batch.cat[2].to_pylist() if t not in train_tokens]
    assert (ids[:, 2] == 0).sum() == len(unseen)


def test_reads_gzip_and_reports_truncated_gzip(tmp_path, tiny_data):
    data = (tiny_data / "val.tsv").read_bytes()
    gz = tmp_path / "v.tsv.gz"
    gz.write_bytes(gzip.compress(data))
    batch, _ = read_all(gz)
    assert len(batch.label) == 1500
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(gzip.compress(data)[: len(data) // 10])
    with pytest.raises(CtrError, match="cut.tsv.gz"):
        read_all(cut)
    assert len(CAT_COLS) == N_CAT

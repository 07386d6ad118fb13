"""Synthetic CTR data with a known click probability per row.

The generator draws a fixed *world* (per-category effects, latent factors, numeric
response curves) from a seed, then samples i.i.d. rows from it:

    logit = b + Σ_f a_f[c_f]                              first order, every categorical field
              + Σ_(f,g)∈P β·<u_f[c_f], u_g[c_g]>          pairwise (FM-like, low rank)
              + Σ_(f,g,h)∈T γ·z_f[c_f]·z_g[c_g]·z_h[c_h]  third order
              + Σ_j α_j·tanh((t_j − m_j)/s_j)             numeric, t_j = sign(x)·log1p(|x|)
              + Σ_(j,f)∈Q η·t̃_j·z_f[c_f]                 numeric × categorical
    p = sigmoid(logit),  label ~ Bernoulli(p)

Categories follow Zipf-like frequencies over Criteo-like cardinalities; some
categorical and numeric fields are often missing (missingness has its own effect).
Rows are written in the Criteo TSV layout (label, I1..I13, C1..C26, no header) and
the true p goes to a side file ``<split>.p.npy``, so the oracle AUC is known.

With ``seq_max_len > 0`` every row also gets a behaviour sequence ``history`` (item tokens,
oldest first) and the files are Parquet (``<split>.parquet``: label, I1..I13, C1..C26,
history list<string>). Each row has a hidden taste (one of ``seq_clusters``); most of its
items come from that taste's items, and

    logit += δ·<Σ_i r^(L−1−i)·v[item_i] / Σ_i r^(L−1−i), u[c_t]>  + mean item effect

over the ``seq_max_len`` most recent items (recency decay r), with c_t the row's value of
one low-cardinality "target" field: the history matters through its recent items and
through their interaction with the candidate, as in a real sequential CTR task.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from ctr_ensemble.data.readers.criteo import CAT_COLS, LABEL, N_CAT, N_NUM, NUM_COLS

# Criteo-like cardinalities, scaled to data sets of 10^5..10^6 rows.
DEFAULT_CARDINALITIES = (
    1400, 550, 60000, 25000, 300, 24, 12000, 630, 3, 40000, 5000, 50000, 3100,
    27, 14000, 45000, 10, 4600, 2000, 4, 48000, 17, 15, 35000, 100, 25000,
)


@dataclass
class SynthConfig:
    """Knobs of the synthetic world.

    The defaults are tuned so that the signal is learnable from ~10^5 rows: interactions live
    between low-cardinality fields and rare ids carry little signal, as hashed ids do in real logs.
    """

    seed: int = 7
    cardinalities: tuple[int, ...] = DEFAULT_CARDINALITIES
    zipf_exponent: float = 1.15
    target_ctr: float = 0.25
    rank: int = 4
    n_pairs: int = 14
    n_triples: int = 4
    n_num_cat: int = 4
    first_order_scale: float = 0.7
    pair_scale: float = 0.6
    triple_scale: float = 0.35
    numeric_scale: float = 0.6
    num_cat_scale: float = 0.25
    tail_scale: float = 10.0  # effects of the k-th most frequent id shrink as (1 + k/tail_scale)^-tail_power
    tail_power: float = 1.0
    max_interaction_card: int = 100  # only fields up to this cardinality take part in interactions
    splits: dict[str, int] = field(
        default_factory=lambda: {"train": 160_000, "val": 20_000, "test": 20_000}
    )
    seq_max_len: int = 0  # > 0: emit a behaviour sequence (Parquet output); items beyond it have no effect
    seq_name: str = "history"
    seq_items: int = 2000
    seq_clusters: int = 16
    seq_mean_len: float = 12.0  # mean history length (exponential-Poisson mix: many short, some beyond seq_max_len)
    seq_scale: float = 1.2
    seq_decay: float = 0.85


class SynthWorld:
    """The fixed parameters from which rows are drawn (everything seeded)."""

    def __init__(self, cfg: SynthConfig):
        if len(cfg.cardinalities) != N_CAT:
            raise ValueError(f"need {N_CAT} cardinalities, got {len(cfg.cardinalities)}")
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        card = np.asarray(cfg.cardinalities)
        self.freq = []
        self.first = []
        self.latent = []
        self.scalar = []
        for v in card:
            ranks = rng.permutation(v)  # which id is the k-th most frequent
            w = 1.0 / (ranks + 1.0) ** cfg.zipf_exponent
            self.freq.append(w / w.sum())
            # Rare categories carry less signal, as hashed ids do in real logs; the
            # +1 slot is the effect of the field being missing.
            shrink = (1.0 + ranks / cfg.tail_scale) ** -cfg.tail_power
            scale = cfg.first_order_scale / np.sqrt(1 + np.log10(v))
            self.first.append(np.append(rng.normal(0, scale, v) * shrink, rng.normal(0, scale)))
            lat = rng.normal(0, 1 / np.sqrt(cfg.rank), (v + 1, cfg.rank))
            lat[:v] *= shrink[:, None]
            self.latent.append(lat)
            sc = rng.normal(0, 1, v + 1)
            sc[:v] *= shrink
            self.scalar.append(sc)
        self.cat_missing = np.zeros(N_CAT)
        for f in rng.choice(N_CAT, 7, replace=False):
            self.cat_missing[f] = rng.uniform(0.05, 0.45)
        low = [f for f in range(N_CAT) if card[f] <= cfg.max_interaction_card]
        self.pairs = [tuple(rng.choice(low, 2, replace=False)) for _ in range(cfg.n_pairs)]
        self.triples = [tuple(rng.choice(low, 3, replace=False)) for _ in range(cfg.n_triples)]
        self.num_cat = [(int(rng.integers(N_NUM)), int(rng.choice(low))) for _ in range(cfg.n_num_cat)]
        self.num_mu = rng.uniform(0.5, 4.0, N_NUM)
        self.num_sigma = rng.uniform(0.6, 1.6, N_NUM)
        self.num_missing = rng.uniform(0.0, 0.45, N_NUM)
        self.num_alpha = rng.normal(0, cfg.numeric_scale, N_NUM)
        self.num_center = self.num_mu + rng.normal(0, 0.5, N_NUM)
        self.num_width = rng.uniform(0.5, 1.5, N_NUM)
        self.num_missing_effect = rng.normal(0, cfg.numeric_scale, N_NUM)
        # Field-specific affine bijections of the id give Criteo-like 8-hex tokens.
        self.token_mult = rng.integers(1, 2**31, N_CAT) * 2 + 1
        self.token_add = rng.integers(0, 2**32, N_CAT)
        self._vocab: dict[int, np.ndarray] = {}
        if cfg.seq_max_len:
            self._init_sequence(rng, low)
        self.bias = 0.0
        self.bias = self._calibrate_bias(np.random.default_rng(cfg.seed + 1))

    def _init_sequence(self, rng: np.random.Generator, low: list[int]) -> None:
        cfg = self.cfg
        self.item_cluster = rng.permutation(cfg.seq_items) % cfg.seq_clusters
        self.cluster_items = [np.flatnonzero(self.item_cluster == k) for k in range(cfg.seq_clusters)]
        centers = rng.normal(0, 1 / np.sqrt(cfg.rank), (cfg.seq_clusters, cfg.rank))
        self.item_latent = centers[self.item_cluster] + rng.normal(0, 0.3 / np.sqrt(cfg.rank), (cfg.seq_items, cfg.rank))
        self.item_first = rng.normal(0, 0.3, cfg.seq_items)
        self.seq_target = int(low[0])
        w = 1.0 / (np.arange(cfg.seq_items) + 1.0) ** cfg.zipf_exponent
        self.item_freq = w / w.sum()

    def _sample_sequence(self, rng: np.random.Generator, cats: np.ndarray, logit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Histories for ``len(cats)`` rows (offsets (n+1,), items); adds their effect to ``logit`` in place."""
        cfg = self.cfg
        n = len(cats)
        lengths = rng.poisson(rng.exponential(cfg.seq_mean_len, n))  # heavy-tailed; ~1/(1+mean) empty
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        row = np.repeat(np.arange(n), lengths)
        taste = rng.integers(cfg.seq_clusters, size=n)[row]
        items = rng.choice(cfg.seq_items, len(row), p=self.item_freq)  # 20 %: anything popular
        own = rng.random(len(row)) < 0.8
        for k in range(cfg.seq_clusters):  # 80 %: an item of the row's taste
            pick = own & (taste == k)
            members = self.cluster_items[k]
            items[pick] = members[rng.integers(len(members), size=pick.sum())]
        rev = lengths[row] - 1 - (np.arange(len(row)) - offsets[:-1][row])  # 0 = most recent
        w = np.where(rev < cfg.seq_max_len, cfg.seq_decay ** rev, 0.0)
        wsum = np.bincount(row, w, minlength=n)
        taste_vec = np.stack([np.bincount(row, w * self.item_latent[items, r], minlength=n) for r in range(cfg.rank)], 1)
        taste_vec /= np.maximum(wsum, 1e-12)[:, None]
        first = np.bincount(row, w * self.item_first[items], minlength=n) / np.maximum(wsum, 1e-12)
        target = self.latent[self.seq_target][cats[:, self.seq_target]]  # (n, rank)
        logit += cfg.seq_scale * np.einsum("nr,nr->n", taste_vec, target) * np.sqrt(cfg.rank) + first
        return offsets, items

    def _calibrate_bias(self, rng: np.random.Generator) -> float:
        logit = self._sample(rng, 50_000)[3]
        lo, hi = -10.0, 10.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (1 / (1 + np.exp(-(logit + mid)))).mean() < self.cfg.target_ctr:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def tokens(self, f: int, ids: np.ndarray) -> np.ndarray:
        """Hex tokens for category ids of field ``f`` (uint32 affine bijection)."""
        h = (ids.astype(np.uint64) * np.uint64(self.token_mult[f]) + np.uint64(self.token_add[f])) % np.uint64(2**32)
        return np.char.mod("%08x", h.astype(np.int64))

    def _sample(self, rng: np.random.Generator, n: int):
        cfg = self.cfg
        cats = np.empty((n, N_CAT), dtype=np.int64)
        for f, v in enumerate(cfg.cardinalities):
            c = rng.choice(v, n, p=self.freq[f])
            c[rng.random(n) < self.cat_missing[f]] = v  # v = missing
            cats[:, f] = c
        logit = np.full(n, self.bias)
        for f in range(N_CAT):
            logit += self.first[f][cats[:, f]]
        for f, g in self.pairs:
            logit += cfg.pair_scale * np.einsum("nr,nr->n", self.latent[f][cats[:, f]], self.latent[g][cats[:, g]])
        for f, g, h in self.triples:
            logit += cfg.triple_scale * self.scalar[f][cats[:, f]] * self.scalar[g][cats[:, g]] * self.scalar[h][cats[:, h]]
        num = np.floor(np.exp(rng.normal(self.num_mu, self.num_sigma, (n, N_NUM))))
        num[:, 1] -= 3  # like Criteo's I2, one field takes small negative values
        t = np.sign(num) * np.log1p(np.abs(num))
        missing = rng.random((n, N_NUM)) < self.num_missing
        resp = self.num_alpha * np.tanh((t - self.num_center) / self.num_width)
        logit += np.where(missing, self.num_missing_effect, resp).sum(1)
        for j, f in self.num_cat:
            tz = np.where(missing[:, j], 0.0, (t[:, j] - self.num_mu[j]) / self.num_sigma[j])
            logit += cfg.num_cat_scale * tz * self.scalar[f][cats[:, f]]
        num[missing] = np.nan
        seq = self._sample_sequence(rng, cats, logit) if cfg.seq_max_len else None
        return cats, num, missing, logit, seq

    def sample(self, rng: np.random.Generator, n: int):
        """Draw ``n`` rows: (category ids with ``V_f`` = missing, numerics with NaN, p, label, history
        (offsets, item ids) or None)."""
        cats, num, _, logit, seq = self._sample(rng, n)
        p = 1 / (1 + np.exp(-logit))
        label = (rng.random(n) < p).astype(np.int64)
        return cats, num, p, label, seq

    def to_table(self, cats: np.ndarray, num: np.ndarray, label: np.ndarray, seq=None) -> pa.Table:
        cols = {LABEL: pa.array(label)}
        for j, name in enumerate(NUM_COLS):
            x = num[:, j]
            cols[name] = pa.array(np.nan_to_num(x).astype(np.int64), mask=np.isnan(x))
        for f, name in enumerate(CAT_COLS):
            v = self.cfg.cardinalities[f]
            ids = cats[:, f]
            if f not in self._vocab:
                self._vocab[f] = self.tokens(f, np.arange(v)).astype(object)
            vocab = self._vocab[f]
            tok = np.where(ids < v, vocab[np.minimum(ids, v - 1)], "")
            cols[name] = pa.array(tok, type=pa.string())
        if seq is not None:
            offsets, items = seq
            tokens = pa.array(np.char.mod("m%05d", items).astype(object), type=pa.string())
            cols[self.cfg.seq_name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tokens)
        return pa.table(cols)


def generate(out_dir: str | Path, cfg: SynthConfig, chunk_rows: int = 50_000) -> dict:
    """Write ``<split>.tsv`` (``<split>.parquet`` with a sequence) + ``<split>.p.npy`` per split and
    ``meta.json``; return meta (``meta["splits"][split]["file"]`` names the data file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = SynthWorld(cfg)
    meta = {"generator": "ctr-ensemble synth v1", "config": asdict(cfg), "splits": {}}
    suffix = "parquet" if cfg.seq_max_len else "tsv"
    for k, (split, n) in enumerate(cfg.splits.items()):
        rng = np.random.default_rng([cfg.seed, k + 2])
        ps, labels = [], []
        tmp = out / f".{split}.{suffix}.part"
        schema = world.to_table(*_empty(cfg)).schema
        if cfg.seq_max_len:
            writer = pq.ParquetWriter(tmp, schema)
        else:
            opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
            writer = pacsv.CSVWriter(tmp, schema, write_options=opts)
        with writer as w:
            for start in tqdm(range(0, n, chunk_rows), desc=f"synth {split}", unit="chunk"):
                cats, num, p, label, seq = world.sample(rng, min(chunk_rows, n - start))
                w.write_table(world.to_table(cats, num, label, seq))
                ps.append(p)
                labels.append(label)
        tmp.replace(out / f"{split}.{suffix}")
        p = np.concatenate(ps)
        y = np.concatenate(labels)
        np.save(out / f"{split}.p.npy", p)
        meta["splits"][split] = {
            "rows": int(n),
            "file": f"{split}.{suffix}",
            "p_file": f"{split}.p.npy",
            "ctr": float(y.mean()),
            "oracle_auc": float(roc_auc_score(y, p)) if 0 < y.sum() < n else None,
        }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _empty(cfg: SynthConfig):
    seq = (np.zeros(1, np.int64), np.zeros(0, np.int64)) if cfg.seq_max_len else None
    return np.zeros((0, N_CAT), np.int64), np.zeros((0, N_NUM)), np.zeros(0, np.int64), seq

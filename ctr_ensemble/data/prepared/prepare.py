"""``data prepare``: raw files of any size → encoded NumPy shards + a manifest, in bounded memory, resumable.

The inputs (one or more files of one format, read by the readers of ``data.readers``) are cut into
chunks by the reader (``Reader.spans``): byte ranges of about ``chunk_mb`` ending at line ends for plain
text (Criteo, Avazu, libSVM), groups of row groups for Parquet, and one chunk per file for gzip (a
compressed stream cannot be entered half-way). Each chunk becomes one shard,
``shards/part-NNNNN.<column>.npy`` (the folder's layout and file entries: ``manifest.py``):

    cat_ids  (n, n_cat) int32      num      (n, n_num) float32 (raw, NaN = missing)
    label    (n,)       uint8      seq_ids  (n, max_len) int32   seq_len (n, 1) int32   (with a sequence)

int32/uint8 on disk halve the size; the training loader widens each batch to the model's int64/float32.

Raw data is read **once**. Pass 1 (parallel over chunks) parses a chunk, dictionary-encodes every
categorical column (local ids into the chunk's distinct tokens, whose counts are the vocabulary
statistics, ``fit.ChunkCounts``) and writes the shard with local ids plus the chunk's counts.
Then the vocabularies are fitted from the chunk counts one field at a time (``fit.CountMerger``;
same result as ``fit.fit`` on the whole input), and pass 2 maps every shard's local ids to
vocabulary ids through a per-chunk lookup table (no raw data involved). With ``spec`` given (val/test
files encoded with the train vocabulary) pass 1 writes final ids directly.

Resumable: every finished chunk is recorded in ``_work/progress.json`` (written atomically; every file
is written to a temporary name and renamed), so a run killed half-way continues where it stopped and
never re-reads a finished chunk. ``manifest.json`` (written last) lists each shard's rows and each
file's size and CRC-32; ``Prepared`` (``shards.py``) checks them and names a missing or corrupt file,
and running ``data prepare`` again on a finished folder re-encodes only the damaged shards.

Memory: each worker holds one chunk (about 6× ``chunk_mb`` at the peak, parsed columns included);
the parent holds the progress state, and while fitting, one field's distinct-token counts at a time
(about ``len(token) + 12`` bytes per distinct token, 2-3× that during a merge; ``max_distinct`` caps it).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from tqdm.auto import tqdm

from ctr_ensemble.data.encode import Encoder, window_sequence
from ctr_ensemble.data.fit import (DEFAULT_SEQ_MAX_LEN, ChunkCounts, CountMerger, FitAccumulator, check_fit_options,
                                   resolve_min_count, token_partition)
from ctr_ensemble.data.prepared.manifest import (MANIFEST, PREPARED_FORMAT, PREPARED_VERSION, SHARDS, SPEC_FILE,
                                                 STORAGE_DTYPES, shard_file, verify_files, write_json_atomic, write_npy)
from ctr_ensemble.data.readers import open_reader
from ctr_ensemble.data.readers.base import Span, concat_batches, count_lines_before, field_names
from ctr_ensemble.data.spec import OOV_ID, FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.files import write_atomic

WORK = "_work"
PROGRESS = "progress.json"
# Count entries (token, chunk) one merge takes in before a field is merged in hash partitions instead:
# ~240 B per distinct token at a merge's peak (bench-data's probe) keeps the parent near 1 GB.
PARTITION_ENTRIES = 4_000_000


@dataclass
class PrepareOptions:
    fmt: str = "auto"
    skip_bad_rows: bool = False
    chunk_mb: float = 64  # raw MB per chunk (text formats); Parquet row groups are grouped to about this size
    workers: int = 1  # processes for the per-chunk work (1 = in this process)
    min_count: int | str = "auto"  # fit.DEFAULT_MIN_COUNT: resolved on the rows counted in pass 1
    seq_max_len: int = DEFAULT_SEQ_MAX_LEN
    use_sequence: bool = True
    max_distinct: int = 0  # cap on distinct tokens counted per field (0 = exact)

    def identity(self) -> dict:
        """What must not change between a run and its resume (workers and chunk size of a planned run may)."""
        d = asdict(self)
        d.pop("workers")
        return d


# ---------------------------------------------------------------------------------------------- plan
def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_chunks(inputs: list[Path], fmt: str, chunk_bytes: int,
                skip_bad_rows: bool = False) -> tuple[str, dict, list[tuple[Span, Path, int]]]:
    """(format, field names, chunks as (span, input, bytes)) for the inputs; every input must have the
    first one's fields. ``bytes`` is raw bytes for text, uncompressed row-group bytes for Parquet."""
    spans: list[tuple[Span, Path, int]] = []
    fmt0, names0 = None, None
    for path in inputs:
        reader = open_reader(path, fmt, skip_bad_rows)
        names = field_names(reader)
        if fmt0 is None:
            fmt0, names0 = reader.format, names
        elif reader.format != fmt0 or names != names0:
            raise CtrError(f"{path}: format/fields ({reader.format}: {names}) differ from {inputs[0]} "
                           f"({fmt0}: {names0}); all inputs of one prepare must share them")
        spans += [(sp, path, b) for sp, b in reader.spans(chunk_bytes)]
    return fmt0, names0, spans


# ---------------------------------------------------------------------------------------------- chunk work
@dataclass(frozen=True)
class ChunkTask:
    """Everything a worker needs for one chunk (picklable)."""

    index: int
    span: Span
    input_path: str  # the input the span belongs to (a Parquet folder, or the file itself)
    out: str
    fmt: str
    skip_bad_rows: bool
    with_sequence: bool
    seq_max_len: int
    spec_path: str | None  # given: write final ids; None: write local ids + the chunk's counts (fitting)


_ENCODERS: dict[str, Encoder] = {}


def _encoder(spec_path: str) -> Encoder:
    if spec_path not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[spec_path] = Encoder(FeatureSpec.load(spec_path))
    return _ENCODERS[spec_path]


def _read_span(task: ChunkTask):
    """All rows of the chunk as one RawBatch (or None) and its read stats. A chunk whose first line is not
    known yet is read with lines counted from its start; only if an error or a skipped row needs a line
    number are the lines before it counted and the chunk read again."""
    reader = open_reader(task.input_path, task.fmt, task.skip_bad_rows)
    span = task.span
    guessed = span.first_line == 0
    if guessed:  # lines counted from the chunk start; counted exactly below only if a message needs them
        span = replace(span, first_line=1)
    try:
        part = reader.part(span)
        batch = concat_batches(list(part))
        if guessed and part.stats.skipped:
            raise _NeedLineNumbers
    except (CtrError, _NeedLineNumbers):
        if not guessed:
            raise
        part = reader.part(replace(span, first_line=1 + count_lines_before(span.file, span.start)))
        batch = concat_batches(list(part))  # raises the same error, now with the file's line numbers
    return batch, part.stats


class _NeedLineNumbers(Exception):
    pass


def _local_sequence(batch, cc: ChunkCounts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_len) int32 of local item ids + 1 (0 = padding), (B, 1) int32 lengths."""
    ids, length = window_sequence(cc.seq_items.astype(np.int32) + 1, cc.seq_lengths, max_len)
    return ids, length.astype(np.int32)


def lookup_table(values: pa.Array, vocab: pa.Array, pad: bool = False) -> np.ndarray:
    """Local id → vocabulary id (int32; OOV 0) for a chunk's distinct ``values``; with ``pad`` a leading
    0 entry so that local id + 1 indexes it and 0 stays the padding."""
    ids = pc.fill_null(pc.add(pc.index_in(values, value_set=vocab), 1), OOV_ID).to_numpy(zero_copy_only=False)
    ids = ids.astype(np.int32)
    return np.concatenate([[0], ids]).astype(np.int32) if pad else ids


def run_chunk(task: ChunkTask) -> dict:
    """Pass 1 for one chunk: read, count, write the shard (final ids with a spec, local ids + counts without)."""
    t0 = time.perf_counter()
    batch, stats = _read_span(task)
    out = Path(task.out)
    info = {"index": task.index, "rows": 0, "skipped": stats.skipped, "skipped_examples": stats.skipped_examples,
            "files": {}}
    if batch is None:
        info["seconds"] = time.perf_counter() - t0
        return info
    cc = ChunkCounts.of(batch, task.with_sequence)
    n = cc.rows
    info["rows"] = n
    info["num_sums"] = cc.num_sums.tolist()
    info["positives"] = cc.positives
    local = np.stack(cc.cat_ids, axis=1) if cc.cat_ids else np.zeros((n, 0), np.int32)
    seq = _local_sequence(batch, cc, task.seq_max_len) if task.with_sequence else None
    if task.with_sequence:
        info["seq_hist"] = np.bincount(cc.seq_lengths).tolist()
    files, i = info["files"], task.index
    files["num"] = write_npy(out, shard_file(i, "num"), batch.num.astype(np.float32))
    files["label"] = write_npy(out, shard_file(i, "label"), batch.label.astype(np.uint8))
    if seq is not None:
        files["seq_len"] = write_npy(out, shard_file(i, "seq_len"), seq[1])
    if task.spec_path is not None:
        files.update(_write_final_ids(out, i, local, cc.cat_counts, seq, cc.seq_counts, _encoder(task.spec_path)))
    else:  # drafts for pass 2, checked like shard files on resume
        drafts = info["drafts"] = {"cat_local": write_npy(out, _draft(i, "cat_local.npy"), local)}
        if seq is not None:
            drafts["seq_local"] = write_npy(out, _draft(i, "seq_local.npy"), seq[0])
        tables = cc.cat_counts + ([cc.seq_counts] if task.with_sequence else [])
        sink = io.BytesIO()
        with ipc.new_file(sink, tables[0].schema) as w:
            for t in tables:
                w.write_table(t)
        drafts["counts"] = {"file": _draft(i, "counts.arrow"), **write_atomic(out / _draft(i, "counts.arrow"), sink.getvalue())}
    info["seconds"] = time.perf_counter() - t0
    return info


def _write_final_ids(out: Path, index: int, local: np.ndarray, counts: list[pa.Table], seq, seq_counts,
                     enc: Encoder) -> dict:
    files = {}
    ids = np.empty_like(local)
    for f, (table, vocab) in enumerate(zip(counts, enc.vocab_arrays)):
        ids[:, f] = lookup_table(table["value"].combine_chunks(), vocab)[local[:, f]]
    files["cat_ids"] = write_npy(out, shard_file(index, "cat_ids"), ids)
    if seq is not None:
        lut = lookup_table(seq_counts["value"].combine_chunks(), enc.seq_vocab_array, pad=True)
        files["seq_ids"] = write_npy(out, shard_file(index, "seq_ids"), lut[seq[0]])
    return files


def _draft(i: int, what: str) -> str:
    return f"{WORK}/part-{i:05d}.{what}"


def read_counts(path: Path, fields: list[int] | None = None) -> list[pa.Table]:
    """A chunk's (value, count) tables (memory-mapped), one per field, or only ``fields``."""
    with ipc.open_file(pa.memory_map(str(path))) as r:
        return [pa.Table.from_batches([r.get_batch(f)]) for f in (fields if fields is not None else range(r.num_record_batches))]


@dataclass(frozen=True)
class RemapTask:
    index: int
    out: str
    spec_path: str
    with_sequence: bool


def run_remap(task: RemapTask) -> dict:
    """Pass 2 for one chunk: local ids → vocabulary ids (reads only the chunk's draft and counts)."""
    t0 = time.perf_counter()
    out, i = Path(task.out), task.index
    local = np.load(out / _draft(i, "cat_local.npy"))
    tables = read_counts(out / _draft(i, "counts.arrow"))
    seq = (np.load(out / _draft(i, "seq_local.npy")), None) if task.with_sequence else None
    enc = _encoder(task.spec_path)
    n_cat = local.shape[1]
    files = _write_final_ids(out, task.index, local, tables[:n_cat], seq, tables[n_cat] if seq else None, enc)
    return {"index": task.index, "files": files, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- driver
class _Runner:
    """Runs chunk jobs in this process (workers <= 1) or in one spawn pool kept for every pass, at most
    2×workers in flight; ``on_done`` sees each result in the parent as it arrives."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, fn: Callable, tasks: list, on_done: Callable[[dict], None]) -> None:
        if self.workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                on_done(fn(t))
            return
        if self.pool is None:  # fork + pyarrow's threads is unsafe: spawn
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
        pending, todo = set(), list(tasks)
        try:
            while todo or pending:
                while todo and len(pending) < 2 * self.workers:
                    pending.add(self.pool.submit(fn, todo.pop(0)))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    on_done(fut.result())
        except BrokenProcessPool as e:
            raise CtrError("a data prepare worker process stopped abruptly (killed, or out of memory: lower "
                           "--chunk-mb or --workers); finished chunks are saved: run the same command again to resume") from e
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


@dataclass
class PrepareResult:
    out: Path
    rows: int
    skipped: int
    shards: int
    chunks_run: int  # chunks read from the raw input by this run
    chunks_resumed: int  # chunks found finished by an earlier run (not read again)
    seconds: float
    spec_fitted: bool
    checked: bool = False  # a finished folder: every shard file's size and CRC-32 checked (damaged ones re-encoded)
    phases: dict = field(default_factory=dict)  # seconds per phase of this run: read, fit, remap, finish

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _files_ok(out: Path, files: dict) -> bool:
    """Every listed file exists with its recorded size (the cheap check; CRCs are checked by ``verify``)."""
    return all((out / f["file"]).is_file() and (out / f["file"]).stat().st_size == f["bytes"] for f in files.values())


def _chunk_done(out: Path, info: dict | None) -> bool:
    return info is not None and _files_ok(out, info["files"]) and _files_ok(out, info.get("drafts", {}))


def _span(c: dict) -> Span:
    return Span(**{**c["span"], "row_groups": tuple(c["span"]["row_groups"])})


def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions, spec: str | Path | None = None,
            progress: bool = True) -> PrepareResult:
    """Encode ``inputs`` into ``out`` (see the module doc). With ``spec`` (a feature spec JSON) the ids come
    from it; otherwise it is fitted on the inputs in the same read and written to ``out/feature_spec.json``.
    Running it again continues an interrupted run, or on a finished folder re-encodes damaged shards."""
    t_start = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise CtrError("data prepare: give at least one input file")
    out = Path(out)
    check_fit_options(opts.min_count, opts.seq_max_len)
    if opts.chunk_mb <= 0:
        raise CtrError(f"chunk_mb must be > 0, got {opts.chunk_mb}")
    given = FeatureSpec.load(spec) if spec is not None else None
    for p in inputs:
        if not p.exists():
            raise CtrError(f"{p}: data file not found")
    ident = {"inputs": [_file_identity(p) for p in inputs], "options": opts.identity(),
             "spec": given.fingerprint() if given else None}
    if (out / MANIFEST).is_file():
        return _repair(out, ident, opts, progress, t_start)
    progress_path = out / WORK / PROGRESS
    if out.exists() and any(out.iterdir()) and not progress_path.is_file():
        raise CtrError(f"{out}: folder exists and is not a (partial) `data prepare` output; choose an empty or new folder")
    if progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state["identity"] != ident:
            raise CtrError(f"{out}: holds an unfinished prepare of other inputs or options (differs in "
                           f"{_diff(state['identity'], ident)}); run it with the same ones, or delete {out} to start over")
    else:
        fmt, names, chunks = plan_chunks(inputs, opts.fmt, max(1, int(opts.chunk_mb * (1 << 20))), opts.skip_bad_rows)
        seq_name = names["sequence"] if opts.use_sequence else None
        seq_len = opts.seq_max_len
        if given is not None:
            Encoder(given).check_fields(open_reader(inputs[0], fmt, opts.skip_bad_rows), str(inputs[0]))
            seq_name = given.sequence.name if given.sequence else None
            seq_len = given.sequence.max_len if given.sequence else seq_len
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        (out / WORK).mkdir(exist_ok=True)
        if given is not None:
            given.save(out / SPEC_FILE)
        state = {"identity": ident, "format": fmt, "fields": names, "sequence": seq_name, "seq_max_len": seq_len,
                 "chunks": [{"span": asdict(sp), "input": str(p), "bytes": b} for sp, p, b in chunks],
                 "pass1": {}, "pass2": {}, "spec_fitted": False}
        write_json_atomic(progress_path, state)

    def save_state() -> None:
        write_json_atomic(progress_path, state)

    n_chunks = len(state["chunks"])
    done = {int(k) for k, v in state["pass1"].items() if _chunk_done(out, v)}
    for k in set(map(int, state["pass1"])) - done:
        tqdm.write(f"{out}: chunk {k} was recorded as done but a file of it is missing or damaged; reading it again")
        del state["pass1"][str(k)]
    if state["pass1"] or state["pass2"]:
        tqdm.write(f"{out}: resuming: {len(done)} of {n_chunks} chunks already read, not read again")
    spec_path = str(out / SPEC_FILE)
    with_seq = state["sequence"] is not None
    tasks = [ChunkTask(i, _span(c), c["input"], str(out), state["format"], opts.skip_bad_rows, with_seq,
                       state["seq_max_len"], spec_path if given is not None else None)
             for i, c in enumerate(state["chunks"]) if i not in done]
    phases = {"plan": time.perf_counter() - t_start}
    with _Runner(opts.workers) as runner:
        _passes(out, state, opts, inputs, given, tasks, done, runner, save_state, progress, phases)
    t0 = time.perf_counter()
    manifest = _write_manifest(out, state)
    shutil.rmtree(out / WORK, ignore_errors=True)
    phases["finish"] = time.perf_counter() - t0
    return PrepareResult(out=out, rows=manifest["rows"], skipped=manifest["skipped"], shards=len(manifest["shards"]),
                         chunks_run=len(tasks), chunks_resumed=len(done), seconds=time.perf_counter() - t_start,
                         spec_fitted=given is None, phases=phases)


def _passes(out: Path, state: dict, opts: PrepareOptions, inputs: list[Path], given: FeatureSpec | None,
            tasks: list[ChunkTask], done: set[int], runner: _Runner, save_state: Callable[[], None], progress: bool,
            phases: dict) -> None:
    """Pass 1 (read every unfinished chunk), then when fitting: the vocabularies and pass 2 (ids)."""
    n_chunks = len(state["chunks"])
    rows_run, t_run = 0, time.perf_counter()
    with tqdm(total=sum(c["bytes"] for c in state["chunks"]), initial=sum(state["chunks"][k]["bytes"] for k in done),
              unit="B", unit_scale=True, disable=not progress, smoothing=0.1,
              desc=f"prepare {out.name}: read+{'encode' if given is not None else 'count'}") as bar:

        def done_chunk(info: dict) -> None:
            nonlocal rows_run
            state["pass1"][str(info["index"])] = info
            save_state()
            rows_run += info["rows"]
            bar.update(state["chunks"][info["index"]]["bytes"])
            bar.set_postfix_str(f"{rows_run:,} rows, {rows_run / max(time.perf_counter() - t_run, 1e-9):,.0f} rows/s")

        runner.run(run_chunk, tasks, done_chunk)
    phases["read"] = time.perf_counter() - t_run
    if given is None:
        t0 = time.perf_counter()
        if not state["spec_fitted"] or not (out / SPEC_FILE).is_file():
            _fit_from_chunks(out, state, opts, inputs).save(out / SPEC_FILE)
            state["spec_fitted"] = True
            save_state()
        phases["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        todo = [RemapTask(i, str(out), str(out / SPEC_FILE), state["sequence"] is not None) for i in range(n_chunks)
                if state["pass1"][str(i)]["rows"] and not _chunk_done(out, state["pass2"].get(str(i)))]
        with tqdm(total=n_chunks, initial=n_chunks - len(todo), unit="chunk", disable=not progress,
                  desc=f"prepare {out.name}: vocabulary ids") as bar:

            def done_remap(info: dict) -> None:
                state["pass2"][str(info["index"])] = info
                save_state()
                bar.update(1)

            runner.run(run_remap, todo, done_remap)
        phases["remap"] = time.perf_counter() - t0


def _diff(a: dict, b: dict) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))) or "?"


def _fit_from_chunks(out: Path, state: dict, opts: PrepareOptions, inputs: list[Path]) -> FeatureSpec:
    """The feature spec from the chunks' counts, one field at a time (memory: one field's distinct tokens)."""
    names = state["fields"]
    acc = FitAccumulator(names["categorical"], names["numeric"], state["sequence"], opts.max_distinct)
    infos = [state["pass1"][str(i)] for i in range(len(state["chunks"]))]
    with_rows = [i for i, info in enumerate(infos) if info["rows"]]
    for i in with_rows:
        info = infos[i]
        acc.add_sums(info["rows"], np.asarray(info["num_sums"]).reshape(3, -1),
                     np.asarray(info["seq_hist"], np.int64) if "seq_hist" in info else None,
                     info.get("positives"))  # absent in a chunk read before label_mean was recorded
    n_fields = len(names["categorical"]) + (1 if state["sequence"] else 0)
    min_count = resolve_min_count(opts.min_count, acc.rows)  # every chunk is counted: rows are known
    paths = [out / _draft(i, "counts.arrow") for i in with_rows]
    entries = _count_entries(paths, n_fields)
    for f in tqdm(range(n_fields), desc=f"prepare {out.name}: fit vocabularies", unit="field", leave=False):
        parts = 1 if opts.max_distinct else -(-entries[f] // PARTITION_ENTRIES)
        if parts <= 1:
            merger = acc.merger(f)
            for p in paths:
                merger.add(read_counts(p, [f])[0])
            acc.finish_field(f, min_count)
            continue
        # A large field: merge it in hash partitions, one at a time, keeping only the tokens that reach
        # min_count; memory is bounded by PARTITION_ENTRIES whatever the number of distinct tokens.
        kept, distinct = [], 0
        for part in range(parts):
            merger = CountMerger()
            for p in paths:
                t = read_counts(p, [f])[0]
                merger.add(t.filter(pa.array(token_partition(t["value"].combine_chunks(), parts) == part)))
            counts = merger.result()
            distinct += counts.num_rows
            kept.append(counts.filter(pc.greater_equal(counts["count"], min_count)))
        acc.finish_field(f, min_count, pa.concat_tables(kept), distinct)
    fitted_on = {"file": str(inputs[0]) if len(inputs) == 1 else [str(p) for p in inputs], "format": state["format"],
                 "rows": acc.rows, "skipped_rows": sum(v["skipped"] for v in infos)}
    seq_ignored = names["sequence"] if state["sequence"] is None else None
    return acc.spec(opts.min_count, state["seq_max_len"], fitted_on, ignored_sequence=seq_ignored, source=str(inputs[0]))


def _count_entries(paths: list[Path], n_fields: int) -> list[int]:
    """Per field: count-table rows summed over the chunks (what a merge of that field takes in)."""
    total = [0] * n_fields
    for p in paths:
        with ipc.open_file(pa.memory_map(str(p))) as r:
            for f in range(n_fields):
                total[f] += r.get_batch(f).num_rows
    return total


def _write_manifest(out: Path, state: dict) -> dict:
    spec = FeatureSpec.load(out / SPEC_FILE)
    shards, skipped, examples = [], 0, []
    for i, c in enumerate(state["chunks"]):
        info = state["pass1"][str(i)]
        skipped += info["skipped"]
        examples += info["skipped_examples"][: max(0, 5 - len(examples))]
        if not info["rows"]:
            continue
        files = {**info["files"], **(state["pass2"][str(i)]["files"] if str(i) in state["pass2"] else {})}
        shards.append({"index": i, "rows": info["rows"], "skipped": info["skipped"], "input": c["input"],
                       "span": c["span"], "files": dict(sorted(files.items()))})
    columns = {"cat_ids": [spec.n_cat], "num": [spec.n_num], "label": []}
    if state["sequence"] is not None:
        columns |= {"seq_ids": [state["seq_max_len"]], "seq_len": [1]}
    manifest = {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "spec_file": SPEC_FILE,
                "spec_fingerprint": spec.fingerprint(), "input_format": state["format"],
                "inputs": state["identity"]["inputs"], "options": state["identity"]["options"],
                "given_spec": state["identity"]["spec"], "seq_max_len": state["seq_max_len"],
                "rows": sum(s["rows"] for s in shards), "skipped": skipped, "skipped_examples": examples,
                "columns": {k: {"dtype": np.dtype(STORAGE_DTYPES[k]).str, "shape": v} for k, v in columns.items()},
                "shards": shards}
    write_json_atomic(out / MANIFEST, manifest, what="prepared-data manifest")
    return manifest


def _repair(out: Path, ident: dict, opts: PrepareOptions, progress: bool, t_start: float) -> PrepareResult:
    """A finished folder: check every shard file (size and CRC-32); re-encode the damaged shards from the
    raw input with the folder's own spec (deterministic, so the files come out identical)."""
    manifest = json.loads((out / MANIFEST).read_text())
    want = {"inputs": manifest["inputs"], "options": manifest["options"], "spec": manifest.get("given_spec")}
    if want["options"] != ident["options"] or [i["path"] for i in want["inputs"]] != [i["path"] for i in ident["inputs"]]:
        raise CtrError(f"{out}: already prepared from other inputs or options (differs in {_diff(want, ident)}); "
                       "choose a new folder, or run with the same inputs and options to check and repair it")
    bad = verify_files(out, manifest, progress=progress)
    idx: list[int] = []
    if bad:
        if want["inputs"] != ident["inputs"]:
            raise CtrError(f"{out}: shard(s) {', '.join(sorted(bad))} are damaged and the input changed since the "
                           "prepare (size or modification time); prepare again into a new folder")
        spec = FeatureSpec.load(out / SPEC_FILE)
        idx = sorted({s["index"] for s in manifest["shards"] for f in s["files"].values() if f["file"] in bad})
        tqdm.write(f"{out}: re-encoding damaged shard(s) {idx} from the raw input")
        chunks = {s["index"]: s for s in manifest["shards"]}
        tasks = [ChunkTask(i, _span(chunks[i]), chunks[i]["input"], str(out), manifest["input_format"],
                           manifest["options"]["skip_bad_rows"], spec.sequence is not None, manifest["seq_max_len"],
                           str(out / SPEC_FILE)) for i in idx]
        for t in tasks:
            info = run_chunk(t)
            want_files = chunks[t.index]["files"]
            if {k: (v["bytes"], v["crc32"]) for k, v in info["files"].items()} != \
                    {k: (v["bytes"], v["crc32"]) for k, v in want_files.items()}:
                raise CtrError(f"{out}: re-encoding shard {t.index} from {t.input_path} gave other bytes than the "
                               "manifest records; the input must have changed; prepare again into a new folder")
    return PrepareResult(out=out, rows=manifest["rows"], skipped=manifest["skipped"], shards=len(manifest["shards"]),
                         chunks_run=len(idx), chunks_resumed=len(manifest["shards"]) - len(idx),
                         seconds=time.perf_counter() - t_start, spec_fitted=manifest.get("given_spec") is None, checked=True)

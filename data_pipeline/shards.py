"""Token shards: the on-disk format written by ``llmstack data prepare`` and its readers.

A shard directory holds ``manifest.json`` and ``shard_NNNNN.bin`` files. One shard file::

    offset 0    header, 256 bytes, little-endian:
                  magic b"LLMSHRD\\0" | version u32 | token itemsize u32 (2: uint16, 4: uint32)
                  | vocab_size u64 | num_docs u64 | num_tokens u64 | tokenizer hash (32 bytes ASCII)
                  | zeros up to 256 (reserved)
    offset 256  tokens: num_tokens x itemsize, every document's ids back to back
    then        index: (num_docs + 1) x u64 token offsets (8-byte aligned); doc i is
                tokens[index[i]:index[i+1]], index[num_docs] = num_tokens

Documents are stored without BOS/EOS: the stream adds them at read time, so one prepare serves
runs with and without BOS. uint16 is used whenever the vocabulary fits (half the bytes). Reading
is ``np.memmap``: opening a shard costs nothing and random access by document is O(1), which is
what lets the stream layer skip straight to a resume cursor.

Preparation is parallel and its output does not depend on the number of worker processes:
shard k holds the records [k*D, (k+1)*D) of the sources in order (D = docs_per_shard), and
worker w writes the shards k = w, w+P, w+2P, ... Every worker walks all records (cheap: no
decoding) and decodes and tokenizes only those of its shards, so each record is tokenized once
and each bad record is counted once.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from multiprocessing.pool import ThreadPool
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from data_pipeline.sources import BadRecord, DataError, ErrorLog, FileFault, Source, Unit, location

MAGIC = b"LLMSHRD\0"
VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQQQ32s")
MANIFEST = "manifest.json"
FORMAT = "llmstack-shards"
# Present in an output directory while `prepare` writes it; names the files there as ours when a
# prepare is interrupted before its manifest (see `_claim_output`).
PREPARING = ".llmstack-prepare-in-progress"
_SHARD_NAME = re.compile(r"shard_\d{5,}\.bin(\.tmp)?")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _index_offset(num_tokens: int, itemsize: int) -> int:
    end = HEADER_BYTES + num_tokens * itemsize
    return -(-end // 8) * 8


class ShardWriter:
    """Append documents (token ids) to one shard file; ``close`` makes it appear atomically."""

    def __init__(self, path: str | os.PathLike, vocab_size: int, tokenizer_hash: str):
        self.path, self.vocab_size, self.hash = Path(path), vocab_size, tokenizer_hash
        self.dtype = token_dtype(vocab_size)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.file.write(b"\0" * HEADER_BYTES)  # real header written last, when counts are known
        self.offsets = [0]

    def add(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
        self.file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.offsets.append(self.offsets[-1] + arr.size)

    def close(self) -> dict:
        n_tokens, n_docs = self.offsets[-1], len(self.offsets) - 1
        pad = _index_offset(n_tokens, self.dtype.itemsize) - (HEADER_BYTES + n_tokens * self.dtype.itemsize)
        self.file.write(b"\0" * pad)
        self.file.write(np.asarray(self.offsets, dtype="<u8").tobytes())
        self.file.seek(0)
        self.file.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, n_docs, n_tokens,
                                     self.hash.encode("ascii")))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "docs": n_docs, "tokens": n_tokens}


def read_header(path: str | os.PathLike) -> dict:
    """The header of a shard file as a dict; DataError if it is not a complete shard."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < _HEADER.size or raw[:8] != MAGIC:
        raise DataError(f"{path} is not an llmstack token shard (bad magic)")
    _, version, itemsize, vocab, docs, tokens, h = _HEADER.unpack(raw[:_HEADER.size])
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this llmstack reads version {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: bad token size {itemsize}")
    if size < _index_offset(tokens, itemsize) + 8 * (docs + 1):
        raise DataError(f"{path} is truncated ({size} bytes)")
    return {"version": version, "itemsize": itemsize, "vocab_size": vocab, "docs": docs, "tokens": tokens,
            "tokenizer_hash": h.rstrip(b"\0").decode("ascii")}


class ShardReader:
    """Memory-mapped read access to one shard: ``len(r)`` documents, ``r[i]`` their ids."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.header = h = read_header(path)
        dtype = np.dtype("<u2" if h["itemsize"] == 2 else "<u4")
        self.tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(h["tokens"],)) \
            if h["tokens"] else np.zeros(0, dtype)
        self.index = np.memmap(path, dtype="<u8", mode="r", offset=_index_offset(h["tokens"], h["itemsize"]),
                               shape=(h["docs"] + 1,))

    def __len__(self) -> int:
        return self.header["docs"]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[int(self.index[i]):int(self.index[i + 1])]


def check_tokenizer(found: str, expected: str | None, what: str) -> None:
    """Refuse token ids made by a different tokenizer (they would be silently wrong text)."""
    if expected is not None and found != expected:
        raise DataError(f"{what} was made with tokenizer {found}, but this run's tokenizer is {expected}; "
                        "re-run `llmstack data prepare` with this tokenizer (or set tokenizer.path to the one used)")


@dataclass
class ShardFile(Unit):
    """A shard as a source unit: seekable by document index; records are already token ids."""

    loc = "doc"
    _reader: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self):  # memmaps are reopened in each process, not pickled
        return {**self.__dict__, "_reader": None}

    def reader(self) -> ShardReader:
        if self._reader is None:
            self._reader = ShardReader(self.path)
        return self._reader

    def records(self, start=0, end=None, first=True):
        r = self.reader()
        end = len(r) if end is None else min(end, len(r))
        for i in range(start, end):
            yield i, r[i]

    def decode(self, raw):
        return raw


def read_manifest(path: str | os.PathLike) -> dict:
    """manifest.json of a shard directory; DataError if absent or not ours."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} has no readable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{file} is not an llmstack shard manifest")
    return manifest


def is_shard_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shard_units(path: str | os.PathLike, tokenizer_hash: str | None) -> list[ShardFile]:
    """The shards of a directory as units, checking every header against ``tokenizer_hash``."""
    manifest = read_manifest(path)
    check_tokenizer(manifest["tokenizer"]["hash"], tokenizer_hash, f"shards in {path}")
    units = []
    for entry in manifest["shards"]:
        file = Path(path) / entry["file"]
        if not file.is_file():
            raise DataError(f"{file} is listed in {MANIFEST} but missing")
        h = read_header(file)
        check_tokenizer(h["tokenizer_hash"], tokenizer_hash, f"shard {file}")
        units.append(ShardFile(str(file), size=h["docs"]))
    return units


# ---------------------------------------------------------------------------------------------
# Preparation (text -> shards), in parallel worker processes


@dataclass
class _Job:
    sources: list[Source]
    out: str
    tokenizer_path: str
    docs_per_shard: int
    worker: int
    workers: int
    on_error: str


def _records(sources: list[Source]) -> Iterator[tuple[int, int, Unit, int, Any]]:
    """(global record number, source index, unit, position, raw) over all sources in order;
    a FileFault is yielded in place of a raw record (it takes no record number)."""
    n = 0
    for si, src in enumerate(sources):
        for unit in src.units:
            try:
                for pos, raw in unit.records(0):
                    yield n, si, unit, pos, raw
                    n += 1
            except FileFault as e:
                yield n, si, unit, e.pos, e


def _prepare_worker(job: _Job, progress=None) -> dict:
    from data_pipeline.tokenizer import load_tokenizer

    if job.workers > 1:  # one process per core already: no thread pool inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(job.tokenizer_path)
    errors, shards = ErrorLog(), []
    per_source = [{"docs": 0, "tokens": 0} for _ in job.sources]
    writer, current, batch = None, -1, []

    def flush():
        n = 0
        for (si, text), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
            writer.add(ids)
            per_source[si]["docs"] += 1
            per_source[si]["tokens"] += len(ids)
            n += len(ids)
        if progress is not None:
            with progress.get_lock():
                progress.value += n
        batch.clear()

    for n, si, unit, pos, raw in _records(job.sources):
        k = n // job.docs_per_shard
        if k % job.workers != job.worker:
            continue
        try:
            if isinstance(raw, FileFault):  # owned like the record that would have come next
                raise raw
            doc = unit.decode(raw)
        except (BadRecord, FileFault) as e:
            if job.on_error == "fail" and e.kind != "empty_text":
                raise DataError(f"{location(unit.path, unit.loc, pos)}: {e.detail}") from None
            errors.add(unit.path, unit.loc, pos, e.kind, e.detail)
            doc = None
        if isinstance(raw, FileFault):  # takes no record number: opens no shard
            continue
        if k != current:  # every record number of shard k opens it, so shards are contiguous
            if writer is not None:
                flush()
                shards.append(writer.close())
            writer = ShardWriter(Path(job.out) / f"shard_{k:05d}.bin", tok.vocab_size, tok.hash)
            current = k
        if doc is None:
            continue
        if isinstance(doc, str):
            batch.append((si, doc))
            if len(batch) >= 256:
                flush()
        else:  # a shard source re-prepared: already token ids, kept in order
            flush()
            writer.add(doc)
            per_source[si]["docs"] += 1
            per_source[si]["tokens"] += len(doc)
    if writer is not None:
        flush()
        shards.append(writer.close())
    return {"shards": shards, "errors": errors.to_dict(), "per_source": per_source}


def _init_worker(counter):
    global _PROGRESS
    _PROGRESS = counter


def _run_job(job: _Job) -> dict:
    return _prepare_worker(job, _PROGRESS)


_PROGRESS = None


def prepare(sources: list[Source], out: str | os.PathLike, tokenizer_path: str, *, workers: int = 1,
            docs_per_shard: int = 65536, on_error: str = "skip",
            report: Callable[[str], None] | None = None) -> dict:
    """Tokenize ``sources`` into shards under ``out`` plus manifest.json; returns the manifest.

    ``workers`` processes run in parallel (1: in this process). The output is identical for
    any number of workers. ``report`` receives a progress line (tokens, tokens/s) every 10 s.
    ``out`` must lie apart from every input (`check_output_apart`); of its contents only the
    files of an earlier prepare are replaced (`_claim_output`), other files are left alone.
    """
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    out = Path(out)
    check_output_apart(out, sources)
    out.mkdir(parents=True, exist_ok=True)
    _claim_output(out)
    jobs = [_Job(sources, str(out), tokenizer_path, docs_per_shard, w, workers, on_error) for w in range(workers)]
    t0 = time.perf_counter()
    counter = mp.get_context("fork").Value("q", 0)

    def wait(pending) -> None:
        while not pending.ready():
            pending.wait(10.0)
            if report and not pending.ready():
                n = counter.value
                report(f"prepare: {n:,} tokens written, {n / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

    # one worker runs in a thread of this process (tokenization releases the GIL), so that the
    # progress lines come the same way as from a pool
    pool_cls = ThreadPool if workers == 1 else mp.get_context("fork").Pool
    with pool_cls(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.map_async(_run_job, jobs)
        wait(pending)
        results = pending.get()  # re-raises a worker's DataError here
    errors = ErrorLog()
    shards = sorted((s for r in results for s in r["shards"]), key=lambda s: s["file"])
    per_source = [{"docs": 0, "tokens": 0} for _ in sources]
    for r in results:
        errors.merge(r["errors"])
        for acc, got in zip(per_source, r["per_source"]):
            acc["docs"] += got["docs"]
            acc["tokens"] += got["tokens"]
    manifest = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"hash": tok.hash, "path": str(tokenizer_path), "vocab_size": tok.vocab_size},
        "dtype": token_dtype(tok.vocab_size).name, "docs_per_shard": docs_per_shard,
        "docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "sources": [{"path": s.spec, "text_field": s.text_field, "units": len(s.units), **c} for s, c in zip(sources, per_source)],
        "skipped": errors.total, "errors": errors.to_dict(),
        "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)  # the manifest appears last: a directory with one is complete
    (out / PREPARING).unlink(missing_ok=True)
    return manifest


def _local_paths(source: Source) -> list[Path]:
    spec = source.spec[3:].split(":")[0] if source.spec.startswith("hf:") else source.spec
    paths = [spec] if not spec.startswith("builtin") and os.path.exists(spec) else []
    paths += [u.path for u in source.units if os.path.exists(u.path)]  # files of a glob, shards, caches
    return [Path(p).resolve() for p in paths]


def check_output_apart(out: Path, sources: list[Source]) -> None:
    """DataError if the output directory is, is inside, or contains a local input of ``sources``:
    preparing would then replace (or mix its shards into) the data it reads."""
    where = out.resolve()
    for s in sources:
        for p in _local_paths(s):
            if where == p or p in where.parents or where in p.parents:
                raise DataError(f"data.out {out} {'is' if where == p else 'overlaps'} the input {p} (source "
                                f"{s.spec}): write the shards to a directory apart from every source")


def _claim_output(out: Path) -> None:
    """Remove an earlier prepare's files from ``out``, and nothing that prepare did not write.

    Ours: the shards a manifest of ours lists, and any shard file while the in-progress marker
    (written here before anything is deleted, removed after the new manifest) says a prepare
    was interrupted. A foreign manifest or shard files nothing names as ours are a DataError:
    another tool's data, or shards of unknown origin, are never deleted or mixed with ours.
    """
    ours: set[str] = set()
    if (out / MANIFEST).exists():
        try:
            manifest = read_manifest(out)
        except DataError:
            raise DataError(f"data.out {out} holds a {MANIFEST} that is not an llmstack shard manifest: "
                            "choose another directory") from None
        ours = {e["file"] for e in manifest.get("shards", []) if _SHARD_NAME.fullmatch(str(e.get("file")))}
    interrupted = (out / PREPARING).is_file()
    # only names our writers use can collide with the new shards; other files are left alone
    found = sorted(p.name for p in out.iterdir() if _SHARD_NAME.fullmatch(p.name))
    if strays := [n for n in found if not (out / n).is_file() or (n not in ours and not interrupted)]:
        more = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
        raise DataError(f"data.out {out} holds {strays[0]}{more}, which no manifest of an earlier prepare lists; "
                        f"remove {'them' if more else 'it'} or choose another directory (shards of unknown origin "
                        "are not overwritten)")
    (out / PREPARING).write_text(json.dumps({"format": FORMAT, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    (out / MANIFEST).unlink(missing_ok=True)  # first: without it the directory reads as incomplete
    for name in found:
        (out / name).unlink()


def inspect(path: str | os.PathLike, top: int = 20) -> dict:
    """Counts, document-length percentiles and the most frequent token ids of a shard directory."""
    manifest = read_manifest(path)
    readers = [ShardReader(Path(path) / s["file"]) for s in manifest["shards"]]
    vocab = manifest["tokenizer"]["vocab_size"]
    counts = np.zeros(vocab, dtype=np.int64)
    lengths = []
    for r in readers:
        for a in range(0, len(r.tokens), 1 << 24):  # bounded memory whatever the shard size
            counts += np.bincount(np.asarray(r.tokens[a:a + (1 << 24)]), minlength=vocab)[:vocab]
        lengths.append(np.diff(np.asarray(r.index, dtype=np.int64)))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    order = np.argsort(-counts, kind="stable")[:top]
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 100)} if len(lengths) else {}
    return {"manifest": manifest, "readers": readers, "doc_length": pct,
            "distinct_tokens": int((counts > 0).sum()),
            "top_tokens": [(int(i), int(counts[i])) for i in order if counts[i] > 0]}

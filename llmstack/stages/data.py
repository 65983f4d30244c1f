"""`llmstack data prepare | inspect`, and the data pipeline as training stages build it.

Training stages call :func:`resolve_sources` and :func:`loader`; both turn the data layer's
errors (a missing file, a foreign shard, a bad record under on_error=fail) into a UsageError
(one message, exit status 2).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline import shards
from data_pipeline.sources import MAX_RECORD_BYTES, DataError, ErrorLog, Source, resolve_source
from data_pipeline.stream import Loader, StreamConfig, auto_workers
from llmstack.config import DataConfig, DataPrepareConfig, SourceConfig
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.train.trainer import Callback


class DataStop(UsageError):
    """Bad data met by one rank's loader: that rank prints it (the others may not see it)."""

    every_rank = True


def resolve_sources(specs: list[SourceConfig], tokenizer_hash: str | None,
                    max_record_bytes: int = MAX_RECORD_BYTES) -> list[Source]:
    """Resolve source specs (listing files now; rank 0 first, so it builds shared caches).
    ``max_record_bytes``: data.max_record_bytes (longer JSONL lines are bad records)."""
    out = []
    with env.rank0_first("resolving the data sources"):
        for spec in specs:
            try:
                out.append(resolve_source(spec.path, spec.text_field, spec.weight, tokenizer_hash, max_record_bytes))
            except FileNotFoundError as e:
                raise UsageError(f"data source not found: {e}") from None
            except (DataError, ValueError) as e:
                raise UsageError(f"data source {spec.path}: {e}") from None
    return out


def stream_config(data: DataConfig, seed: int) -> StreamConfig:
    return StreamConfig(seq_len=data.seq_len, streams=data.streams, seed=seed, bos=data.bos,
                        shuffle=data.shuffle, shuffle_windows=data.shuffle_windows, doc_mask=data.doc_mask)


class Batches:
    """A Loader whose data errors become DataStop; what the training loop iterates."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.loader)
        except DataError as e:
            raise DataStop(f"data: {e}") from None


def _report(line: str) -> None:
    print(f"[rank {env.rank()}] {line}" if env.world_size() > 1 else line, file=sys.stderr, flush=True)


# Host threads a rank on a GPU keeps busy itself: the Python loop that makes the batches and
# launches the kernels, and the CUDA driver's copies. Its torch threads are mostly idle there.
GPU_RANK_THREADS = 2


def loader_workers(data: DataConfig, world: int, *, cores: int | None = None, reserved: int | None = None) -> int:
    """data.num_workers, with `auto` resolved for this rank: the cores it has (its share of the
    machine, env.cores_per_process) beyond the threads it computes with (torch's threads on CPU,
    GPU_RANK_THREADS on a GPU) become loader workers, at most 4, dividing data.streams / world
    (data_pipeline.stream.auto_workers). The batches are the same for any number of workers."""
    if data.num_workers != "auto":
        return data.num_workers
    import torch

    if reserved is None:
        reserved = torch.get_num_threads() if env.device().type == "cpu" else GPU_RANK_THREADS
    return auto_workers(data.streams, world, env.cores_per_process() if cores is None else cores, reserved)


def loader(data: DataConfig, sources: list[Source], tokenizer, seed: int, *, micro_batch: int,
           num_workers: int | None = None, state: dict | None = None) -> Batches:
    """This rank's micro-batches of `sources` (state: a merged data state to resume from)."""
    world = env.world_size()
    try:
        return Batches(Loader(sources, stream_config(data, seed), tokenizer.path, tokenizer.hash,
                              micro_batch=micro_batch, rank=env.rank(), world=world,
                              num_workers=loader_workers(data, world) if num_workers is None else num_workers,
                              state=state, on_error=data.on_error, report=_report))
    except DataError as e:
        raise UsageError(f"data: {e}") from None


class DataStats(Callback):
    """Trainer callback: every metrics line also gets the tokens taken from each source and the
    records skipped so far, summed over ranks (on_log runs on every rank at the same steps)."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def on_log(self, trainer, record: dict) -> None:
        import torch

        local = [*self.loader.source_tokens(), self.loader.errors.total]
        total = env.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=env.device())).tolist()
        record["source_tokens"] = {s.spec: int(n) for s, n in zip(self.loader.sources, total)}
        if total[-1]:
            record["skipped_records"] = int(total[-1])


@dataclass
class PretrainData:
    train: Batches  # this rank's training micro-batches (from the resumed position)
    val: list[dict]  # this rank's share of the fixed validation batches
    manifest: dict  # what run.json records of the data


def pretrain_data(data: DataConfig, tokenizer, seed: int, micro_batch: int, eval_batches: int,
                  state: dict | None = None, resume_from=None) -> PretrainData:
    """Sources resolved (files listed, shards checked against the tokenizer), the validation
    sample, and the training loader (from `state`, the data position of the checkpoint resumed)."""
    train_sources = resolve_sources(data.sources, tokenizer.hash, data.max_record_bytes)
    val_sources = resolve_sources(data.val_sources, tokenizer.hash, data.max_record_bytes)
    val = validation_batches(data, val_sources, tokenizer, seed, micro_batch=micro_batch, batches=eval_batches)
    try:
        batches = loader(data, train_sources, tokenizer, seed, micro_batch=micro_batch, state=state)
    except UsageError as e:
        if state is None:
            raise
        from llmstack.train.run import separate_run_hint

        raise UsageError(f"cannot resume from {resume_from}: {e}; {separate_run_hint(resume_from)}") from None
    manifest = {"seq_len": data.seq_len, "streams": data.streams, "sources": [s.model_dump() for s in data.sources],
                "files": {s.spec: len(s.units) for s in train_sources}, "val_sources": [s.spec for s in val_sources],
                "fingerprint": batches.loader.fp, "num_workers": batches.loader.workers}
    return PretrainData(train=batches, val=val, manifest=manifest)


def validation_batches(data: DataConfig, sources: list[Source], tokenizer, seed: int, *, micro_batch: int,
                       batches: int) -> list[dict]:
    """This rank's share of the first ``batches`` global validation batches, fixed for a run.

    Validation is a small fixed sample, so it is read as one stream from the start of the
    validation data (contiguous text, in file order) rather than as the first window of each of
    many streams, which would over-represent document beginnings. Every rank reads the same
    windows and keeps positions p % world == rank, so the sample is the same for any world size.
    """
    world, rank = env.world_size(), env.rank()
    cfg = StreamConfig(seq_len=data.seq_len, streams=1, seed=seed, bos=data.bos, shuffle=False, shuffle_windows=1,
                       doc_mask=data.doc_mask)
    try:
        whole = Loader(sources, cfg, tokenizer.path, tokenizer.hash, micro_batch=micro_batch * world,
                       on_error=data.on_error, report=_report)
        out = []
        for _ in range(batches):
            batch = next(whole, None)
            if batch is None:
                raise UsageError(f"validation data: only {len(out)} batches of {micro_batch * world} x {data.seq_len} "
                                 f"tokens, train.eval_batches={batches} asks for more: lower train.eval_batches or "
                                 f"train.micro_batch, or give more validation text (data.val_sources)")
            out.append({k: v[rank::world] for k, v in batch.items()})
        return out
    except DataError as e:
        raise UsageError(f"validation data: {e}") from None


def prepare(cfg: DataPrepareConfig) -> dict:
    """Tokenize data.sources into shards under data.out (parallel over data.num_workers processes)."""
    from llmstack.stages import common

    if not cfg.data.out:
        raise UsageError("data.out is required: the directory to write the shards to")
    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)
    sources = resolve_sources(cfg.data.sources, tokenizer.hash, cfg.data.max_record_bytes)
    workers = env.available_cores() if cfg.data.num_workers == "auto" else max(1, cfg.data.num_workers)
    print(f"data prepare: {', '.join(s.spec for s in sources)} -> {cfg.data.out} "
          f"({sum(len(s.units) for s in sources)} inputs, {workers} processes, tokenizer {tokenizer.hash})", flush=True)
    t0 = time.perf_counter()
    try:
        manifest = shards.prepare(sources, cfg.data.out, tokenizer.path, workers=workers,
                                  docs_per_shard=cfg.data.docs_per_shard, on_error=cfg.data.on_error,
                                  report=lambda line: print(line, flush=True))
    except DataError as e:
        raise UsageError(f"data prepare: {e}") from None
    seconds = time.perf_counter() - t0
    if manifest["docs"] == 0:  # nothing to train on is a failed preparation, not an empty success
        log = ErrorLog()
        log.merge(manifest.get("errors", {}))
        why = (f"every record was skipped, {log.total} bad inputs (data.on_error=skip):\n  " + "\n  ".join(log.report())
               if log.total else "the sources hold no records")
        raise UsageError(f"data prepare: no documents were read from {', '.join(s.spec for s in sources)}; {why}")
    print(f"wrote {len(manifest['shards'])} shards, {manifest['docs']:,} documents, {manifest['tokens']:,} tokens "
          f"({manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s) to {cfg.data.out}")
    _print_skipped(manifest)
    return manifest


def _print_skipped(manifest: dict) -> None:
    log = ErrorLog()
    log.merge(manifest.get("errors", {}))
    if log.total:
        print(f"skipped {log.total} bad records (data.on_error=skip):")
        for line in log.report():
            print(f"  {line}")


def _bar(frac: float, width: int = 30) -> str:
    return "#" * max(1, round(frac * width)) if frac > 0 else ""


def inspect(path: str, tokenizer_path: str | None = None, samples: int = 3, top: int = 20) -> None:
    """Print counts, per-source totals, histograms and decoded samples of a shard directory."""
    from data_pipeline.tokenizer import load_tokenizer

    if not Path(path).is_dir():
        raise UsageError(f"not a directory: {path}")
    try:
        info = shards.inspect(path, top=top)
    except DataError as e:
        raise UsageError(str(e)) from None
    m = info["manifest"]
    tok_info = m["tokenizer"]
    print(f"shards: {path}: {len(m['shards'])} files, dtype {m['dtype']}, tokenizer {tok_info['hash']} "
          f"(vocab {tok_info['vocab_size']}), made {m.get('created', '?')}")
    print(f"documents: {m['docs']:,}   tokens: {m['tokens']:,}   skipped records: {m.get('skipped', 0):,}")
    for s in m["sources"]:
        print(f"  source {s['path']}: {s['docs']:,} documents, {s['tokens']:,} tokens")
    tok, why = None, ""
    tok_path = tokenizer_path or tok_info.get("path")
    try:
        tok = load_tokenizer(tok_path)
        if tok.hash != tok_info["hash"]:
            tok, why = None, f"tokenizer at {tok_path} is {tok.hash}, not {tok_info['hash']}"
    except (FileNotFoundError, OSError, TypeError):
        why = f"tokenizer not found at {tok_path!r} (pass --tokenizer DIR)"
    if why:
        print(f"(ids are not decoded: {why})")

    lengths = [int(x) for r in info["readers"] for x in (r.index[1:] - r.index[:-1])]
    print("document length (tokens): " + "  ".join(f"{k} {v:,}" for k, v in info["doc_length"].items()))
    if lengths:
        buckets: dict[int, int] = {}
        for n in lengths:
            b = 0 if n == 0 else int(math.log2(n))
            buckets[b] = buckets.get(b, 0) + 1
        most = max(buckets.values())
        for b in sorted(buckets):
            lo, hi = (0, 1) if b == 0 else (2 ** b, 2 ** (b + 1) - 1)
            print(f"  {lo:>7,}-{hi:<7,} {buckets[b]:>9,}  {_bar(buckets[b] / most)}")
    total = max(m["tokens"], 1)
    print(f"token histogram: {info['distinct_tokens']:,} distinct ids of {tok_info['vocab_size']:,}; most frequent:")
    most = info["top_tokens"][0][1] if info["top_tokens"] else 1
    for i, n in info["top_tokens"]:
        shown = repr(tok.id_to_token(i)) if tok else ""
        print(f"  {i:>7} {n:>12,} {100 * n / total:6.2f}%  {_bar(n / most, 20):<20} {shown}")
    print("samples:")
    shown_docs = 0
    for r in info["readers"]:
        for d in range(len(r)):
            if shown_docs >= samples:
                break
            ids = r[d]
            text = tok.decode(ids[:200].tolist()) if tok else " ".join(map(str, ids[:40].tolist()))
            print(f"  [{Path(r.path).name} doc {d}, {len(ids)} tokens] {text[:300]!r}")
            shown_docs += 1
    _print_skipped(m)

"""Streaming data: tokenize -> pack -> split across ranks x loader workers -> resumable state.

Documents are read lazily, tokenized and packed on the fly in DataLoader worker processes, and
the batches a run sees do not depend on how many ranks or workers produce them.

The design, and why:

- **V streams** (``data.streams``, default 64, independent of the world size). Every source's
  documents are split into V disjoint shares, one per stream (packing.py says how: contiguous
  regions of seekable files, records dealt round-robin from compressed ones). Stream s mixes its
  shares of the sources and packs them into windows of seq_len + 1 tokens on its own, so its
  output is a pure function of (seed, sources, weights, seq_len, V, s): nothing another stream
  does can change it.
- **Shuffle.** A stream makes its windows B = ``data.shuffle_windows`` at a time and emits each
  block in a seeded random order. Without it a stream emits the consecutive windows of one
  document after another, so only V documents are "in flight" at any moment and the gradients of
  nearby steps are correlated; with it about V*B/(windows per document) are. (A global shuffle
  across streams would break the rank/worker split below; this one stays inside a stream.)
- **Global order.** Global position p is the (p // V)-th emission of stream p % V. Global batch b
  is positions [b*G, (b+1)*G) for a global batch of G sequences, whatever the world size.
- **Ranks.** Rank r of R takes positions p with p % R == r, i.e. the streams s with s % R == r
  (needs R | V). It gets exactly G / R positions of each global batch, so micro-batches have
  equal sizes; the loss is a mean over the global batch, so the *set* of sequences of each
  global batch is what must not depend on R, and it does not.
- **Workers.** The rank's n-th item is position r + n*R, from its (n mod V/R)-th stream. A
  DataLoader over an IterableDataset takes items round-robin from its W workers, so worker w is
  given exactly the streams its items come from (needs W | V/R) and produces them in order: no
  two workers ever read the same document, and the rank's item sequence is the same for any W.
- **Mixing.** Stream s picks the source of its j-th window (in packing order) with the point
  u = frac(c + s/V + j*phi) (phi the golden ratio, c from the seed) against the cumulative
  weights. This Weyl sequence is equidistributed with discrepancy O(log j / j), so token shares
  match the weights far more closely than independent draws (O(1/sqrt(j))), and at a fixed j the
  V streams' points are evenly spaced. Each window holds one source's tokens, so shares of
  windows are shares of tokens. The state is the counter.
- **State.** Per stream: windows emitted (in total and per source) and, per source, the cursor
  where the current shuffle block starts (epoch, unit, position of the document holding the
  block's first token, token offset into it). The checkpoint holds all V stream states plus the
  global position; a restarted run (any R, any W) gives each stream's state to whichever process
  now serves it. Resuming re-makes at most one block per stream: one document per (stream,
  source) is re-read at its cursor (seekable units seek, sequential ones skip lines without
  decoding them), nothing before it. Each item carries its stream's state after it was produced, so
  the state recorded in the main process is that of the items the loop actually consumed,
  however far the workers have read ahead.
- **Epochs.** Each stream restarts a source when its share ends (``repeat``), with a new seeded
  unit order and new rotations. With ``repeat=False`` a stream ends when all its sources are
  exhausted; the tokens left in each (stream, source) that do not fill a window are the
  remainder, counted in the state (nothing else is ever dropped).

Memory does not grow with the corpus: each stream buffers a few windows of tokens, each open
unit one read buffer. The one exception is bounded by document-length noise, not corpus size:
for compressed files the records of streams that lag behind the fastest stream of a process
wait in that process's queues (packing.DealtReader).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.packing import Context, Packer
from data_pipeline.sources import DataError, ErrorLog, Source

STATE_VERSION = 1
CHUNK_ITEMS = 16  # items per message from a loader worker
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
_DONE_FLOOR = (1 << 62, 0, 0)


@dataclass(frozen=True)
class StreamConfig:
    """What the global order depends on (with the sources and the tokenizer)."""

    seq_len: int
    streams: int = 64
    seed: int = 0
    bos: bool = False
    shuffle: bool = True  # a new seeded unit (file) order each epoch
    shuffle_windows: int = 64  # each stream emits its windows in seeded random order within blocks of this many
    doc_mask: bool = False  # emit position_ids + segment_ids (does not change the order)


def fingerprint(sources: list[Source], cfg: StreamConfig, tokenizer_hash: str) -> tuple[str, dict]:
    """(hash, readable summary) of everything a resume cursor is only valid for."""
    summary = {"seq_len": cfg.seq_len, "streams": cfg.streams, "seed": cfg.seed, "bos": cfg.bos,
               "shuffle": cfg.shuffle, "shuffle_windows": cfg.shuffle_windows, "tokenizer": tokenizer_hash,
               "sources": [[s.spec, s.weight, s.text_field, len(s.units)] for s in sources]}
    full = {**summary, "units": [s.ident() for s in sources]}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16], summary


@functools.lru_cache(maxsize=16)
def _mix_offset(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"llmstack-mix-{seed}".encode()).digest()[:8], "little")


def mix_point(seed: int, s: int, k: int, V: int) -> float:
    """The Weyl point u in [0, 1) that picks the source of stream s's k-th window."""
    return ((_mix_offset(seed) + (s << 64) // V + k * _GOLDEN) % (1 << 64)) / float(1 << 64)


def choose_source(u: float, weights: list[float], active: list[int]) -> int:
    """The source whose slice of the cumulative (renormalized) weights contains u."""
    total = sum(weights[i] for i in active)
    acc = 0.0
    for i in active:
        acc += weights[i] / total
        if u < acc:
            return i
    return active[-1]


def fresh_state(n_sources: int) -> dict:
    """The state of a stream that has produced nothing yet: k windows emitted, n per source, and
    each source's cursor where the current block of windows starts (see _Stream)."""
    return {"k": 0, "n": [0] * n_sources, "src": [[0, 0, 0, 0, 0, 0, False] for _ in range(n_sources)]}


def _identity(x):
    return x


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGUSR1: a scheduler signals every process of a job,
    and a worker killed by it would fail the training process (DataLoader reports the dead
    worker) while it finishes its step and saves its checkpoint. The training process stops its
    workers when it exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class RankStream(IterableDataset):
    """The items (one packed window each) of one rank, in the rank's order; see module doc.

    Iterated in the main process (0 workers) or by each DataLoader worker, which then serves only
    its own streams. A DataError in a worker is sent as an item, so the main process can raise
    it with its message intact.
    """

    def __init__(self, sources: list[Source], cfg: StreamConfig, tokenizer_path: str, *, rank: int, world: int,
                 start_item: int, states: dict[int, dict], repeat: bool, on_error: str):
        self.sources, self.cfg, self.tokenizer_path = sources, cfg, tokenizer_path
        self.rank, self.world, self.start_item, self.states = rank, world, start_item, states
        self.repeat, self.on_error = repeat, on_error

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            yield from self._produce(0, 1)
            return
        # Workers are processes, one per core: a tokenizer thread pool in each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Items travel in chunks: one inter-process message per item would cost more than
        # reading a window from shards. The main process deals them back out round-robin.
        chunk: list[dict] = []
        try:
            for item in self._produce(info.id, info.num_workers):
                chunk.append(item)
                if len(chunk) == CHUNK_ITEMS:
                    yield {"w": info.id, "items": chunk, "last": False}
                    chunk = []
        except DataError as e:
            yield {"error": str(e)}
            return
        yield {"w": info.id, "items": chunk, "last": True}

    def _produce(self, w: int, W: int) -> Iterator[dict]:
        from data_pipeline.tokenizer import load_tokenizer

        cfg, R, r, V = self.cfg, self.world, self.rank, self.cfg.streams
        Q = V // R
        # item n of this rank comes from local stream n % Q; worker w makes items start+w, start+w+W, ...
        mine = [r + q * R for q in range(Q) if (q - self.start_item) % W == w]
        ctx = Context(self.sources, load_tokenizer(self.tokenizer_path), seq_len=cfg.seq_len, streams=V,
                      seed=cfg.seed, bos=cfg.bos, shuffle=cfg.shuffle, repeat=self.repeat, on_error=self.on_error)
        for i in range(len(self.sources)):
            ctx.floors[i] = {s: _DONE_FLOOR if self.states[s]["src"][i][6] else tuple(self.states[s]["src"][i][:3])
                             for s in mine}
        streams = {s: _Stream(ctx, s, self.states[s], cfg, [src.weight for src in self.sources]) for s in mine}
        ctx.packers = [p for st in streams.values() for p in st.packers]
        alive, n = set(mine), self.start_item + w
        while alive:
            s = r + (n % Q) * R
            n += W
            if s not in alive:
                continue
            st = streams[s]
            got = st.next()
            if got is None:  # the stream ended (repeat=False): send its final state (remainders)
                alive.discard(s)
                yield self._item(ctx, s, st.state(), final=True)
                continue
            (tokens, seg), src, raw_index = got
            item = self._item(ctx, s, st.state(), tokens=tokens, k=raw_index, src=src)
            if seg is not None:
                seg = seg[:-1]
                starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
                item["seg"], item["pos"] = seg, np.arange(len(seg)) - starts[seg]
            yield item

    @staticmethod
    def _item(ctx: Context, s: int, state: dict, **fields) -> dict:
        """An item: a window (or only a final state) plus stream s's state after it, and the
        errors and tokenizer work of this process since the previous item."""
        item = {"s": s, "state": state, "errors": ctx.errors.to_dict() if ctx.errors.files else None,
                "tokenized": ctx.tokenized, **fields}
        if ctx.errors.files:
            ctx.errors = ErrorLog()
        ctx.tokenized = 0
        return item


class _Stream:
    """One stream: its packers (one per source), the mixing, and the block shuffle.

    Raw window j (in packing order) takes its source from the mixing point of j. Windows are
    made B = shuffle_windows at a time and block m is emitted in the order of a permutation
    seeded by (seed, stream, m), so consecutive emissions of a stream come from different
    documents. The state records the cursors at the start of the current block; resuming in the
    middle of a block re-makes that block (at most B windows) and continues in it.
    """

    def __init__(self, ctx: Context, s: int, state: dict, cfg: StreamConfig, weights: list[float]):
        self.s, self.cfg, self.weights = s, cfg, weights
        B, T = cfg.shuffle_windows, cfg.seq_len
        # each packer is topped up by about what one block takes from it, so making a block
        # costs one tokenizer call for the whole stream rather than one per few windows
        share = [w / sum(weights) for w in weights]
        self.packers = [Packer(ctx, s, i, list(c), target=math.ceil(B * share[i] + 2) * T)
                        for i, c in enumerate(state["src"])]
        self.k, self.n = state["k"], list(state["n"])
        self.block: list | None = None  # windows of the current block (None: not made yet)
        self.block_start = [list(c) for c in state["src"]]

    def _make_block(self, m: int) -> None:
        B, V = self.cfg.shuffle_windows, self.cfg.streams
        self.block_start = [p.cursor() for p in self.packers]
        self.block = []
        for j in range(m * B, (m + 1) * B):
            active = [i for i, p in enumerate(self.packers) if not p.done]
            got = None
            while active and got is None:
                src = choose_source(mix_point(self.cfg.seed, self.s, j, V), self.weights, active)
                got = self.packers[src].take(self.cfg.doc_mask)
                if got is None:  # that source is exhausted in this stream (repeat=False)
                    active.remove(src)
            if got is None:
                break
            self.block.append((got, src, j))
        self.order = np.random.default_rng([self.cfg.seed % (1 << 63), self.s, m]).permutation(len(self.block))

    def next(self):
        """((tokens, seg), source, raw window index) of the next emission, or None at the end."""
        m, i = divmod(self.k, self.cfg.shuffle_windows)
        if self.block is None or self.m != m:
            self._make_block(m)
            self.m = m
        if i >= len(self.block):
            return None
        got = self.block[self.order[i]]
        self.k += 1
        self.n[got[1]] += 1
        return got

    def state(self) -> dict:
        """k, n, and the cursors to rebuild from: the current block's start while it is being
        emitted; once it is all out, the packers' cursors (the next block's start, or the end)."""
        whole = self.block is not None and self.k - self.m * self.cfg.shuffle_windows >= len(self.block)
        return {"k": self.k, "n": list(self.n), "src": [p.cursor() for p in self.packers] if whole else self.block_start}


class Loader:
    """One rank's micro-batches of the global order, with a resumable state and statistics.

    ``next(loader)`` is a dict of tensors: input_ids, labels (B, T); with doc_mask also
    position_ids (B, T) (restarting in every document) and segment_ids (B, T) (a token attends
    to the earlier tokens with its own id; see models.layers.SegmentPlan). ``state_dict()`` is this rank's part of the state; merge
    all ranks' parts with :func:`merge_states` and pass the result as ``state`` to resume on any
    number of ranks and workers.
    """

    def __init__(self, sources: list[Source], cfg: StreamConfig, tokenizer_path: str, tokenizer_hash: str, *,
                 micro_batch: int, rank: int = 0, world: int = 1, num_workers: int = 0, state: dict | None = None,
                 repeat: bool = True, on_error: str = "skip", with_meta: bool = False,
                 report: Callable[[str], None] | None = None):
        V = cfg.streams
        if V % (world * max(num_workers, 1)):
            raise DataError(f"data.streams={V} must be a multiple of world size x max(num_workers, 1) = "
                            f"{world} x {max(num_workers, 1)}; the global order depends on data.streams, so keep it "
                            "fixed for a run and choose the ranks and workers to divide it (e.g. data.streams="
                            f"{_suggest(world * max(num_workers, 1))})")
        self.sources, self.cfg, self.micro, self.rank, self.world = sources, cfg, micro_batch, rank, world
        self.with_meta, self.report = with_meta, report
        self.fp, self.summary = fingerprint(sources, cfg, tokenizer_hash)
        self.position = 0
        streams = state.get("streams", {}) if state else {}
        if state is not None:
            self._check(state)
            self.position = state["position"]
            if self.position % world:
                raise DataError(f"the data state is at global position {self.position}, not a multiple of the world "
                                f"size {world}: it was saved mid-batch")
        self.states = {s: streams.get(str(s)) or fresh_state(len(sources)) for s in range(rank, V, world)}
        self.errors = ErrorLog()
        self.tokenized_docs = 0  # documents this rank's workers tokenized (lookahead included)
        self._warned: set[str] = set()
        dataset = RankStream(sources, cfg, tokenizer_path, rank=rank, world=world, start_item=self.position // world,
                             states=self.states, repeat=repeat, on_error=on_error)
        self.workers = num_workers
        if num_workers == 0:
            self._it = iter(dataset)
        else:
            # Items come round-robin from the workers, so a worker busy tokenizing a batch holds the
            # others up unless they may run ahead: let each buffer ~4 windows of each of its streams.
            per_worker = V // world // num_workers
            self._chunks = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                                           worker_init_fn=_ignore_stop_signals,
                                           prefetch_factor=max(2, 4 * per_worker // CHUNK_ITEMS)))
            # not a method of self: a generator holding self would make a reference cycle, and a
            # cycle's collection may close the worker queues before DataLoader can stop its workers
            self._it = _from_workers(self._chunks, num_workers)

    def _check(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or "fingerprint" not in state:
            raise DataError("the checkpoint's data state is not from this data pipeline version")
        if state["fingerprint"] != self.fp:
            old = state.get("summary", {})
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.summary.items() if old.get(k) != v]
            raise DataError("the data changed since the checkpoint, so its position does not apply ("
                            + ("; ".join(diff) or "the files of the sources changed (names or sizes)") + ")")

    def __iter__(self):
        return self

    def _next_item(self) -> dict:
        item = next(self._it)
        if "error" in item:
            raise DataError(item["error"])
        self.states[item["s"]] = item["state"]
        self.tokenized_docs += item["tokenized"]
        if item["errors"]:
            self.errors.merge(item["errors"])
            new = [p for p in item["errors"] if p not in self._warned]
            if new and self.report:
                self._warned.update(new)
                for line in ErrorLog.report(_subset(self.errors, new)):
                    self.report(f"data: {line}")
        if item.get("final"):  # not a position of the order: carries a finished stream's state
            return self._next_item()
        self.position += self.world
        return item

    def __next__(self) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(self.micro):
            try:
                items.append(self._next_item())
            except StopIteration:
                break
        if not items:
            raise StopIteration
        tokens = torch.from_numpy(np.stack([it["tokens"] for it in items])).long()
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        if self.cfg.doc_mask:
            # segment ids, not a (B, 1, T, T) mask: the model attends within documents from them
            batch["position_ids"] = torch.from_numpy(np.stack([it["pos"] for it in items])).long()
            batch["segment_ids"] = torch.from_numpy(np.stack([it["seg"] for it in items])).long()
        if self.with_meta:
            for key, name in (("s", "stream"), ("k", "index"), ("src", "source")):
                batch[name] = torch.tensor([it[key] for it in items])
        return batch

    def state_dict(self) -> dict:
        """This rank's streams, the global position, and the data fingerprint (JSON-able)."""
        return {"version": STATE_VERSION, "fingerprint": self.fp, "summary": self.summary, "position": self.position,
                "streams": {str(s): st for s, st in self.states.items()}}

    def source_tokens(self) -> list[int]:
        """Tokens (windows x seq_len) taken from each source by this rank's streams so far."""
        return [sum(st["n"][i] for st in self.states.values()) * self.cfg.seq_len for i in range(len(self.sources))]

    def remainder_tokens(self) -> int:
        return sum(c[5] for st in self.states.values() for c in st["src"])


def _from_workers(chunks: Iterator[dict], W: int) -> Iterator[dict]:
    """Items from the workers' chunks in the rank's order: worker 0, 1, ..., W-1, 0, ...
    (worker w makes the rank's items start+w, start+w+W, ...)."""
    queues: list[deque] = [deque() for _ in range(W)]
    ended: set[int] = set()
    turn = 0
    while len(ended) < W or any(queues):
        while not queues[turn] and turn not in ended:
            chunk = next(chunks, None)
            if chunk is None:  # every worker has finished
                return
            if "error" in chunk:
                raise DataError(chunk["error"])
            queues[chunk["w"]].extend(chunk["items"])
            if chunk["last"]:
                ended.add(chunk["w"])
        if queues[turn]:
            yield queues[turn].popleft()
        turn = (turn + 1) % W


def _subset(log: ErrorLog, files: list[str]) -> ErrorLog:
    out = ErrorLog()
    out.files = {f: log.files[f] for f in files}
    return out


def _suggest(n: int) -> int:
    return max(64, n) if max(64, n) % n == 0 else n * -(-64 // n)


MAX_AUTO_WORKERS = 4  # tokenizing a few streams per worker keeps up with a GPU; more only costs memory


def auto_workers(streams: int, world: int, cores: int, reserved: int, cap: int = MAX_AUTO_WORKERS) -> int:
    """Loader workers for a rank with `cores` cores of which it computes with `reserved` threads:
    the cores left over, at most `cap`, lowered to a divisor of the rank's streams count
    (streams / world), so that streams stays a multiple of world x workers; 0 when no core is
    spare, or when world does not divide streams (Loader reports that). The batches do not
    depend on the number of workers (module doc), so the choice changes speed only."""
    if world < 1 or streams % world:
        return 0
    per_rank, n = streams // world, min(cap, cores - reserved)
    while n > 0 and per_rank % n:
        n -= 1
    return max(n, 0)


def merge_states(states: Iterable[dict]) -> dict:
    """One state from every rank's ``state_dict()`` (they own disjoint streams)."""
    states = list(states)
    first = states[0]
    for st in states[1:]:
        if st["fingerprint"] != first["fingerprint"] or st["position"] != first["position"]:
            raise DataError("ranks disagree on the data state (different data or position)")
    merged = dict(first, streams={})
    for st in states:
        merged["streams"].update(st["streams"])
    return merged


# ---------------------------------------------------------------------------------------------
# Small in-memory helpers (evaluation scores whole texts, the quickstart reports an entropy)


def _encoded_documents(texts: Iterable[str], tokenizer, batch_docs: int) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS, encoded `batch_docs` at a time (encode_batch uses every core)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            yield from (np.asarray([*ids, tokenizer.eos_id], dtype=np.int64) for ids in tokenizer.encode_batch(batch))
            batch.clear()
    if batch:
        yield from (np.asarray([*ids, tokenizer.eos_id], dtype=np.int64) for ids in tokenizer.encode_batch(batch))


def tokenize_documents(texts: Iterable[str], tokenizer, batch_docs: int = 256) -> np.ndarray:
    """All documents' ids, each followed by EOS, as one flat int64 array (held in memory)."""
    chunks = list(_encoded_documents(texts, tokenizer, batch_docs))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def token_counts(texts: Iterable[str], tokenizer, batch_docs: int = 256) -> np.ndarray:
    """Per-id counts over documents (each with its EOS), streamed: memory is one vocabulary."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for ids in _encoded_documents(texts, tokenizer, batch_docs):
        counts += np.bincount(ids, minlength=len(counts))
    return counts


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution of `tokens`: the loss of the best
    context-free predictor, a floor any model that learned nothing beyond frequencies sits at."""
    return entropy_of_counts(np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size))


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution given by non-negative counts."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class PackedSequences:
    """A flat token array cut into sequences of seq_len+1 tokens that overlap by one token
    (sequence i covers tokens[i*T : i*T+T+1]); the tail that does not fill one is
    `remainder_tokens`. Used to score a whole text in memory (evaluation)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_sequences = max(0, (len(tokens) - 1) // seq_len)
        self.remainder_tokens = len(tokens) - (self.num_sequences * seq_len + 1) if self.num_sequences else len(tokens)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

"""What one stream reads and packs: its documents of each source, tokenized in batches, cut into
windows of seq_len + 1 tokens.

The stream layer (stream.py) decides which streams a process serves; everything here is per
process and is shared by the streams it serves:

- ``stream_docs`` walks one source for one stream: epoch after epoch, units in the epoch's
  seeded order, and in each unit the stream's share: a contiguous region of a seekable unit
  (region j of V goes to stream (j + rotation) % V), or the records of a sequential unit whose
  index i has (i + rotation) % V == stream. The rotation is drawn per (epoch, unit), so a small
  unit does not always feed the same few streams and every stream meets every document sooner or
  later when the data repeats.
- ``DealtReader`` reads a sequential unit once for all streams of this process and queues each
  stream's records. Streams move at slightly different speeds (documents differ in length), so
  the queues hold the records between the slowest and fastest stream of the process.
- ``Packer`` holds one stream's tokenized documents of one source and emits windows: window n
  covers tokens [n*T, n*T + T + 1) of the stream's token sequence (documents each followed by
  EOS, BOS first if asked). Consecutive windows overlap by one token, so inputs (first T) and
  targets (last T) each cover every token exactly once. Its cursor (document position + token
  offset of the first token not yet used as input) is all that is needed to resume: the
  document there is re-read and re-tokenized, nothing before it.
- ``Context.fill`` tokenizes for many packers at once: one ``encode_batch`` call over the
  documents every low packer needs, which keeps the tokenizer's thread pool busy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from data_pipeline.sources import BadRecord, DataError, ErrorLog, FileFault, Source, location

_END = object()  # queue marker: the unit ended for this stream
MIN_BATCH_CHARS = 1 << 19  # text per encode_batch call, enough to spread over the tokenizer's threads


@dataclass(slots=True)
class Doc:
    """A document of one stream and where it came from (epoch, index in epoch order, position)."""

    e: int
    f: int
    pos: int
    text: str | None = None
    ids: Any = None  # np.int32 tokens with BOS/EOS once tokenized


class Context:
    """Per-process state shared by the streams it serves: tokenizer, epoch plans, readers."""

    def __init__(self, sources: list[Source], tokenizer, *, seq_len: int, streams: int, seed: int,
                 bos: bool, shuffle: bool, repeat: bool, on_error: str):
        self.sources, self.tok, self.T, self.V = sources, tokenizer, seq_len, streams
        self.seed, self.bos, self.shuffle, self.repeat, self.on_error = seed, bos, shuffle, repeat, on_error
        self.errors = ErrorLog()
        self.packers: list[Packer] = []
        self.dealers: dict[int, DealtReader] = {}
        self.floors: dict[int, dict[int, tuple]] = {}  # source -> stream -> first position it needs
        self._plans: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._has_docs: set[int] = set()
        self.chars_per_token = 4.0
        self.tokenized = 0  # documents tokenized (a resume should add only a few)

    def plan(self, i: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit order, rotation per position in that order) of source i in epoch e."""
        key = (i, e)
        if key not in self._plans:
            if len(self._plans) > 64:
                self._plans.clear()
            n = len(self.sources[i].units)
            rng = np.random.default_rng([self.seed % (1 << 63), i, e])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._plans[key] = (order, rng.integers(0, self.V, n))
        return self._plans[key]

    def bad(self, unit, pos: int, kind: str, detail: str) -> None:
        """Count a skipped record, or stop (on_error=fail) naming file and line."""
        if self.on_error == "fail" and kind != "empty_text":
            raise DataError(f"{location(unit.path, unit.loc, pos)}: {detail}")
        self.errors.add(unit.path, unit.loc, pos, kind, detail)

    def dealer(self, i: int) -> DealtReader:
        if i not in self.dealers:
            self.dealers[i] = DealtReader(self, i, self.floors[i])
        return self.dealers[i]

    def check_has_docs(self, i: int) -> None:
        """A stream went a whole epoch without a document of source i: fine for a small source
        (it meets one in a later epoch), endless for a source with no usable document at all."""
        if i in self._has_docs:
            return
        for unit in self.sources[i].units:
            try:
                for _, raw in unit.records(0):
                    try:
                        if unit.decode(raw) is not None:
                            self._has_docs.add(i)
                            return
                    except BadRecord:
                        pass
            except FileFault:
                pass
        raise DataError(f"source {self.sources[i].spec} has no usable documents")

    def fill(self, packer: Packer, need: int) -> None:
        """Top up ``packer`` to at least ``need`` tokens, and with it the packers that are running
        low, so that one encode_batch call gets enough documents to keep the tokenizer's threads
        busy (and its per-call cost small). Each packer is topped up to its ``target`` (what its
        stream takes from it per shuffle block, at least 8 windows), emptiest first, until the
        batch holds MIN_BATCH_CHARS characters and no packer is below 3 windows."""
        w = self.T + 1
        volume = packer.pull(max(need, packer.target))
        group = [packer]
        for p in sorted((p for p in self.packers if p is not packer and not p.exhausted), key=lambda p: p.ntok / p.target):
            if p.ntok >= p.target or (p.ntok >= 3 * w and volume >= MIN_BATCH_CHARS):
                break
            volume += p.pull(p.target)
            group.append(p)
        docs = [d for p in group for d in p.pending if d.ids is None]
        if docs:
            encoded = self.tok.encode_batch([d.text for d in docs])
            self.tokenized += len(docs)
            chars = tokens = 0
            for d, ids in zip(docs, encoded):
                chars, tokens = chars + len(d.text), tokens + len(ids) + 1
                d.ids, d.text = self._wrap(ids), None
            self.chars_per_token = 0.8 * self.chars_per_token + 0.2 * chars / max(tokens, 1)
        for p in group:
            p.commit()

    def _wrap(self, ids) -> np.ndarray:
        """Token ids of a document body -> int32 array with BOS (optional) and EOS."""
        n = len(ids)
        out = np.empty(n + 1 + self.bos, dtype=np.int32)
        if self.bos:
            out[0] = self.tok.bos_id
        out[self.bos:self.bos + n] = ids
        out[-1] = self.tok.eos_id
        return out


def stream_docs(ctx: Context, s: int, i: int, e: int, f: int, pos: int) -> Iterator[Doc]:
    """Documents of source i for stream s, from epoch e, unit f of its order, position pos."""
    src, V = ctx.sources[i], ctx.V
    while True:
        order, rot = ctx.plan(i, e)
        found = False
        for fi in range(f, len(order)):
            unit = src.units[int(order[fi])]
            start = pos if fi == f else 0
            if unit.seekable:
                j = (s - int(rot[fi])) % V
                a, b = j * unit.size // V, (j + 1) * unit.size // V
                records = unit.records(max(a, start), b, first=j == 0)
            else:
                records = ctx.dealer(i).records(s, e, fi, start)
            try:
                for p, raw in records:
                    if isinstance(raw, FileFault):  # dealt by the reader to its owning stream
                        ctx.bad(unit, raw.pos, raw.kind, raw.detail)
                        continue
                    try:
                        doc = unit.decode(raw)
                    except BadRecord as err:
                        ctx.bad(unit, p, err.kind, err.detail)
                        continue
                    if doc is None:
                        continue
                    found = True
                    if isinstance(doc, str):
                        yield Doc(e, fi, p, text=doc)
                    else:  # shards: token ids already
                        yield Doc(e, fi, p, ids=ctx._wrap(doc))
            except FileFault as err:
                ctx.bad(unit, err.pos, err.kind, err.detail)
        if not ctx.repeat:
            return
        if not found:
            ctx.check_has_docs(i)
        e, f, pos = e + 1, 0, 0


class DealtReader:
    """Reads the sequential units of one source once for all streams of this process.

    Records go to the queue of the stream that owns them, if this process serves it and the
    stream has not already passed that position (``floors``: where each stream resumes).
    """

    def __init__(self, ctx: Context, i: int, floors: dict[int, tuple]):
        self.ctx, self.i = ctx, i
        self.queues = {s: deque() for s in floors}
        self.floors = dict(floors)
        self.e, self.f, self.start = min(floors.values())
        self.gen = None
        self.rot = 0
        self.finished = False

    def records(self, s: int, e: int, f: int, pos: int) -> Iterator[tuple[int, Any]]:
        """(position, raw or FileFault) of stream s's records in unit f of epoch e, from pos."""
        self.floors[s] = (e, f, pos)
        q = self.queues[s]
        while True:
            while not q:
                if not self._advance(q):
                    return
            key, raw = q.popleft()
            if key[:2] < (e, f) or (key[:2] == (e, f) and raw is not _END and key[2] < pos):
                continue  # stale: queued before this stream moved past it
            if raw is _END:
                return
            yield key[2], raw

    def _push(self, s: int, key: tuple, raw) -> None:
        if s in self.queues and key >= self.floors[s]:
            self.queues[s].append((key, raw))

    def _open_next(self) -> bool:
        """Open the next sequential unit at or after (e, f); False when the data ends."""
        while True:
            order, rot = self.ctx.plan(self.i, self.e)
            while self.f < len(order):
                unit = self.ctx.sources[self.i].units[int(order[self.f])]
                if not unit.seekable:
                    self.unit, self.rot = unit, int(rot[self.f])
                    self.gen = unit.records(self.start)
                    self.start = 0
                    return True
                self.f += 1
            if not self.ctx.repeat:
                return False
            self.e, self.f, self.start = self.e + 1, 0, 0

    def _end_unit(self) -> None:
        for s in self.queues:
            self._push(s, (self.e, self.f, 1 << 62), _END)
        self.gen, self.f = None, self.f + 1

    def _advance(self, q: deque) -> bool:
        """Read until ``q`` has an entry; False if the data ended first."""
        V = self.ctx.V
        while not q:
            if self.gen is None and (self.finished or not self._open_next()):
                self.finished = True
                return False
            try:
                for pos, raw in self.gen:
                    self._push((pos + self.rot) % V, (self.e, self.f, pos), raw)
                    if q:
                        break
                else:
                    self._end_unit()
            except FileFault as err:
                self._push((err.pos + self.rot) % V, (self.e, self.f, err.pos), err)
                self._end_unit()
        return True


class Packer:
    """One stream's documents of one source, packed into windows of T + 1 tokens.

    ``cursor`` is [epoch, unit index in epoch order, position, token offset, windows emitted,
    remainder, done]; the first four say where the next window starts.
    """

    def __init__(self, ctx: Context, s: int, i: int, cursor: list, target: int | None = None):
        self.ctx = ctx
        self.target = max(target or 0, 8 * (ctx.T + 1))  # tokens to hold after a top-up (Context.fill)
        e, f, pos, tok, self.seqs, self.remainder, self.done = cursor
        self.start = [e, f, pos, tok]
        self.skip = tok  # tokens of the first document already consumed before a resume
        self.docs = None if self.done else stream_docs(ctx, s, i, e, f, pos)
        self.buf: deque = deque()  # [Doc, offset of its first unconsumed token]
        self.pending: list[Doc] = []
        self.ntok = 0
        self.exhausted = self.done

    def cursor(self) -> list:
        if self.buf:
            d, off = self.buf[0]
            where = [d.e, d.f, d.pos, off]
        else:
            where = self.start
        return [*where, self.seqs, self.remainder, self.done]

    def pull(self, target: int) -> int:
        """Read documents (not yet tokenized) until about ``target`` tokens would be buffered;
        returns the characters read (token ids count as characters for the batch size)."""
        est, chars = self.ntok, 0
        while est < target and not self.exhausted:
            try:
                d = next(self.docs)
            except StopIteration:
                self.exhausted = True
                break
            self.pending.append(d)
            if d.ids is not None:
                est += len(d.ids)
            else:
                chars += len(d.text)
                est += len(d.text) / self.ctx.chars_per_token
        return chars

    def commit(self) -> None:
        """Move tokenized pending documents into the buffer."""
        for d in self.pending:
            off = 0
            if self.skip:
                off, self.skip = self.skip, 0
                if off >= len(d.ids):
                    raise DataError("the data no longer matches the resume cursor (document shorter than its offset)")
            self.buf.append([d, off])
            self.ntok += len(d.ids) - off
        self.pending.clear()

    def take(self, want_seg: bool):
        """The next window as (tokens (T+1,), segment index per token or None); None at the end
        of the data (finite mode), leaving the unused tokens counted in ``remainder``."""
        T = self.ctx.T
        if self.done:
            return None
        while self.ntok < T + 1:
            if self.exhausted and not self.pending:
                self.done, self.remainder = True, self.ntok
                self.buf.clear()
                self.start = [0, 0, 0, 0]
                return None
            self.ctx.fill(self, T + 1)
        out = np.empty(T + 1, dtype=np.int32)
        seg = np.empty(T + 1, dtype=np.int32) if want_seg else None
        n = 0
        for k, (d, off) in enumerate(self.buf):
            m = min(len(d.ids) - off, T + 1 - n)
            out[n:n + m] = d.ids[off:off + m]
            if want_seg:
                seg[n:n + m] = k
            n += m
            if n == T + 1:
                break
        # advance by T: the last token of this window is the first of the next
        drop = T
        while drop:
            entry = self.buf[0]
            avail = len(entry[0].ids) - entry[1]
            if avail <= drop:
                self.buf.popleft()
                drop -= avail
            else:
                entry[1] += drop
                drop = 0
        self.ntok -= T
        self.seqs += 1
        return out, seg

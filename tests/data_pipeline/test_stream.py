"""The streaming pipeline in one process: global order, resume, coverage, mixing, document masks.

Ranks are simulated by building one Loader per rank (the pipeline never talks to other ranks;
tests/distributed/test_data_runs.py repeats the determinism and resume checks with real processes).
DataLoader workers are real processes.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from data_pipeline.sources import DataError, resolve_source
from data_pipeline.stream import Loader, StreamConfig, merge_states
from data_pipeline.tokenizer import load_tokenizer
from tests.data_pipeline import corpus


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A: a glob of a plain .jsonl (seekable) and a .jsonl.gz (dealt); B: a parquet file (dealt)."""
    d = tmp_path_factory.mktemp("corpus")
    a = corpus.texts(60, seed=2, hi=120, tag="a")
    b = corpus.texts(40, seed=3, hi=120, tag="b")
    corpus.write_jsonl(d / "a1.jsonl", a[:35])
    corpus.write_jsonl_gz(d / "a2.jsonl.gz", a[35:])
    corpus.write_parquet(d / "b.parquet", b, row_group_size=8)
    return d, a, b


def sources_of(d, wa=0.6, wb=0.4):
    return [resolve_source(str(d / "a*.jsonl*"), weight=wa), resolve_source(str(d / "b.parquet"), weight=wb)]


def loaders(srcs, tok, cfg, G, R, W, state=None, **kw):
    return [Loader(srcs, cfg, tok.path, tok.hash, micro_batch=G // R, rank=r, world=R, num_workers=W, state=state, **kw)
            for r in range(R)]


def global_batches(ls, G, n) -> list[torch.Tensor]:
    """n global batches assembled from every rank's micro-batch in position order (rank r's
    j-th row of its b-th micro-batch is position b*G + r + j*R)."""
    R, out = len(ls), []
    for _ in range(n):
        rows = {}
        for r, loader in enumerate(ls):
            x = next(loader)["input_ids"]
            for j in range(len(x)):
                rows[r + j * R] = x[j]
        out.append(torch.stack([rows[p] for p in range(G)]))
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_global_batches_do_not_depend_on_ranks_or_workers(two_sources, tok):
    cfg = StreamConfig(seq_len=32, streams=8, seed=5)
    srcs = sources_of(two_sources[0])
    ref = global_batches(loaders(srcs, tok, cfg, 8, 1, 0), 8, 12)
    for R, W in [(1, 2), (2, 0), (2, 2), (4, 1), (8, 0)]:
        assert same(global_batches(loaders(srcs, tok, cfg, 8, R, W), 8, 12), ref), (R, W)
    other_seed = global_batches(loaders(srcs, tok, StreamConfig(seq_len=32, streams=8, seed=6), 8, 1, 0), 8, 12)
    assert not same(other_seed, ref)


def test_resume_with_other_ranks_and_workers(two_sources, tok):
    cfg = StreamConfig(seq_len=32, streams=8, seed=5)
    srcs = sources_of(two_sources[0])
    ref = global_batches(loaders(srcs, tok, cfg, 8, 1, 0), 8, 30)
    first = loaders(srcs, tok, cfg, 8, 2, 1)
    assert same(global_batches(first, 8, 17), ref[:17])
    state = merge_states(loader.state_dict() for loader in first)
    assert state["position"] == 17 * 8 and len(state["streams"]) == 8
    for R, W in [(1, 2), (4, 0), (2, 1)]:
        assert same(global_batches(loaders(srcs, tok, cfg, 8, R, W, state=state), 8, 13), ref[17:]), (R, W)


def test_resume_tokenizes_only_the_documents_it_needs(tmp_path, tok):
    """Skipping to a cursor seeks (or skips lines), it does not re-tokenize the prefix. (With
    data.shuffle_windows=B a resume also re-makes the current block: at most B windows per stream.)"""
    corpus.write_jsonl(tmp_path / "a.jsonl", corpus.texts(600, seed=4, lo=60, hi=120))
    corpus.write_jsonl_gz(tmp_path / "b.jsonl.gz", corpus.texts(600, seed=5, lo=60, hi=120))
    srcs = [resolve_source(str(tmp_path / "a.jsonl")), resolve_source(str(tmp_path / "b.jsonl.gz"))]
    cfg = StreamConfig(seq_len=32, streams=8, seed=1, shuffle_windows=1)
    (straight,) = loaders(srcs, tok, cfg, 8, 1, 0)
    ref = global_batches([straight], 8, 301)
    (resumed,) = loaders(srcs, tok, cfg, 8, 1, 0, state=_state_after(srcs, tok, cfg, 300))
    assert same(global_batches([resumed], 8, 1), ref[300:])
    # each of the 8 streams x 2 sources re-reads its current document plus up to 8 windows ahead
    assert resumed.tokenized_docs <= 8 * 2 * 3, resumed.tokenized_docs
    assert straight.tokenized_docs >= 5 * resumed.tokenized_docs  # what re-reading the prefix would cost


def _state_after(srcs, tok, cfg, n):
    (loader,) = loaders(srcs, tok, cfg, 8, 1, 0)
    global_batches([loader], 8, n)
    return loader.state_dict()


def test_one_epoch_covers_every_token_exactly_once(two_sources, tok):
    """repeat=False over 2 ranks x 2 workers: every document's tokens appear once, in order
    within their stream, except each (stream, source)'s final remainder, which is counted."""
    d, a, b = two_sources
    cfg = StreamConfig(seq_len=32, streams=8, seed=7)
    ls = loaders(sources_of(d), tok, cfg, 8, 2, 2, repeat=False, with_meta=True)
    windows = defaultdict(list)
    for loader in ls:
        for batch in loader:
            for row, s, k, src in zip(batch["input_ids"], batch["stream"], batch["index"], batch["source"]):
                windows[(int(s), int(src))].append((int(k), row.tolist()))
    expected = Counter(corpus.doc_tokens(tok, a) + corpus.doc_tokens(tok, b))
    complete, tails = Counter(), []
    for key, ws in windows.items():
        assert [k for k, _ in sorted(ws)] == sorted({k for k, _ in ws}), "a window came twice"
        seq = [t for _, row in sorted(ws) for t in row]
        cur: list[int] = []
        for t in seq:
            cur.append(t)
            if t == tok.eos_id:
                complete[tuple(cur)] += 1
                cur = []
        tails.append(tuple(cur))
    remainder = sum(loader.remainder_tokens() for loader in ls)
    assert not complete - expected, "a document appeared that is not in the corpus, or twice"
    missing = expected - complete
    inputs = sum(len(row) for ws in windows.values() for _, row in ws)
    assert inputs + remainder == sum(len(doc) * n for doc, n in expected.items())
    # what is missing is exactly the remainder: the unfinished document of each (stream, source)
    # continues in it, and documents wholly inside it were never emitted
    assert sum(len(doc) * n for doc, n in missing.items()) == sum(map(len, tails)) + remainder
    pool = list(missing.elements())
    tails = [t for t in tails if t]
    assert _match(tails, pool), "an unfinished document is not one of the missing ones"
    assert remainder < 8 * 2 * (32 + 1)  # at most one window's worth per (stream, source)


def _match(tails: list[tuple], docs: list[tuple]) -> bool:
    """Can every tail be the beginning of a different document? (bipartite matching by
    augmenting paths: short tails may fit several documents)"""
    owner: dict[int, int] = {}

    def assign(t: int, seen: set) -> bool:
        for d, doc in enumerate(docs):
            if d not in seen and doc[:len(tails[t])] == tails[t]:
                seen.add(d)
                if d not in owner or assign(owner[d], seen):
                    owner[d] = t
                    return True
        return False

    return all(assign(t, set()) for t in range(len(tails)))


def test_mixing_token_shares_follow_weights(tmp_path, tok):
    """0.7 / 0.3 by tokens over 10^5 tokens, although source A's documents are 20x shorter."""
    corpus.write_jsonl(tmp_path / "short.jsonl", corpus.texts(2000, seed=8, lo=3, hi=15))
    corpus.write_jsonl(tmp_path / "long.jsonl", corpus.texts(100, seed=9, lo=200, hi=400))
    srcs = [resolve_source(str(tmp_path / "short.jsonl"), weight=0.7),
            resolve_source(str(tmp_path / "long.jsonl"), weight=0.3)]
    cfg = StreamConfig(seq_len=64, streams=16, seed=3)
    (loader,) = loaders(srcs, tok, cfg, 16, 1, 0, with_meta=True)
    counts = Counter()
    while sum(counts.values()) < 100_000:
        batch = next(loader)
        for src in batch["source"].tolist():
            counts[src] += cfg.seq_len
    total = sum(counts.values())
    shares = [counts[0] / total, counts[1] / total]
    assert abs(shares[0] - 0.7) < 0.02 and abs(shares[1] - 0.3) < 0.02, shares
    assert loader.source_tokens() == [counts[0], counts[1]]


def test_doc_mask_gives_each_document_its_own_context(tmp_path, tok):
    """With data.doc_mask the packed row's logits equal each document's alone."""
    from llmstack.models.gpt import GPT, gpt_config_from_preset

    cfg = StreamConfig(seq_len=32, streams=8, seed=2, doc_mask=True, bos=True)
    path = corpus.write_jsonl(tmp_path / "short.jsonl", corpus.texts(100, seed=1, lo=1, hi=12))
    (loader,) = loaders([resolve_source(str(path))], tok, cfg, 4, 1, 0)
    batch = next(loader)
    ids, pos, seg = batch["input_ids"], batch["position_ids"], batch["segment_ids"]
    assert seg.shape == (4, 32) and "attn_mask" not in batch  # ids, never a dense (B, 1, T, T) mask
    torch.manual_seed(0)
    model = GPT(gpt_config_from_preset("gpt2-tiny", tok.vocab_size, n_layer=2, d_model=32, n_head=4, max_seq_len=32))
    model.init_weights()
    model.eval()
    boundaries = 0
    with torch.no_grad():
        packed = model(ids, position_ids=pos, segment_ids=seg)
        for r in range(len(ids)):
            starts = [0] + [t for t in range(1, 32) if pos[r, t] == 0] + [32]
            for a, b in zip(starts, starts[1:]):
                assert pos[r, a:b].tolist() == list(range(b - a))
                if a > 0:  # a new document begins after EOS, with BOS
                    boundaries += 1
                    assert ids[r, a - 1] == tok.eos_id and ids[r, a] == tok.bos_id
                torch.testing.assert_close(packed[r, a:b], model(ids[r:r + 1, a:b])[0], rtol=1e-4, atol=1e-5)
    assert boundaries > 0


def test_streams_must_be_divisible_by_ranks_times_workers(two_sources, tok):
    with pytest.raises(DataError, match=r"data.streams=6 must be a multiple of world size x max\(num_workers, 1\) = 2 x 2"):
        Loader(sources_of(two_sources[0]), StreamConfig(seq_len=32, streams=6), tok.path, tok.hash,
               micro_batch=2, rank=0, world=2, num_workers=2)


def test_resume_refuses_changed_data(two_sources, tok, tmp_path):
    srcs = sources_of(two_sources[0])
    cfg = StreamConfig(seq_len=32, streams=8, seed=5)
    (loader,) = loaders(srcs, tok, cfg, 8, 1, 0)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"seq_len: 32 -> 64"):
        loaders(srcs, tok, StreamConfig(seq_len=64, streams=8, seed=5), 8, 1, 0, state=state)
    with pytest.raises(DataError, match=r"sources: .*0\.6.*->.*0\.5"):
        loaders(sources_of(two_sources[0], 0.5, 0.5), tok, cfg, 8, 1, 0, state=state)
    cfg24 = StreamConfig(seq_len=32, streams=24, seed=5)
    (loader,) = loaders(srcs, tok, cfg24, 8, 1, 0)
    next(loader)  # 8 positions: not a whole number of rows for 3 ranks
    with pytest.raises(DataError, match="not a multiple of the world size 3"):
        loaders(srcs, tok, cfg24, 9, 3, 0, state=loader.state_dict())


def test_windows_overlap_by_one_token(two_sources, tok):
    """Labels are the inputs shifted by one within a stream's consecutive windows."""
    cfg = StreamConfig(seq_len=16, streams=1, seed=0, shuffle_windows=1)  # emitted in packing order
    (loader,) = loaders([resolve_source(str(two_sources[0] / "a1.jsonl"))], tok, cfg, 2, 1, 0)
    b1, b2 = next(loader), next(loader)
    ids = torch.cat([b1["input_ids"], b2["input_ids"]]).flatten().numpy()
    labels = torch.cat([b1["labels"], b2["labels"]]).flatten().numpy()
    np.testing.assert_array_equal(ids[1:], labels[:-1])
    expected = np.concatenate([np.array(t) for t in corpus.doc_tokens(tok, corpus.texts(60, seed=2, hi=120, tag="a")[:35])])
    np.testing.assert_array_equal(ids, expected[:64])

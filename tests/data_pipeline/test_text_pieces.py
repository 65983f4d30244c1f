""".txt documents read in pieces: memory and resume cost do not grow with the file, and the
pieces tokenize exactly as the whole file does (a byte-level BPE tokenizer splits at a newline
followed by a printable character). PIECE_BYTES is made small so small files have many pieces."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from data_pipeline import shards, sources
from data_pipeline.sources import DataError, ErrorLog, iter_documents, resolve_source
from data_pipeline.stream import Loader, StreamConfig
from data_pipeline.tokenizer import load_tokenizer

PIECE = 2048


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", PIECE)


@pytest.fixture(scope="module")
def txt_files(tmp_path_factory):
    """Three files of 40-70 KB: stdlib docstrings and comments (indented lines, blank lines,
    code), with emoji, CJK and a long whitespace run mixed in."""
    d = tmp_path_factory.mktemp("txt")
    docs = list(sources.builtin_texts("validation"))
    texts, k = [], 0
    for n, name in zip((40_000, 55_000, 70_000), ("a", "b", "c")):
        parts = []
        while sum(map(len, parts)) < n:
            parts.append(docs[k % len(docs)])
            parts.append(["  emoji 🙂 here\n", "中文的文本\n", "\t\t    \n\n   \n", "naïve café\r\n"][k % 4])
            k += 1
        text = "\n".join(parts)
        (d / f"{name}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return d, texts


def test_pieces_are_small_and_reassemble_the_file(txt_files):
    d, texts = txt_files
    unit = resolve_source(str(d / "c.txt")).units[0]
    recs = list(unit.records(0))
    data = (d / "c.txt").read_bytes()
    assert len(recs) > 20 and all(len(raw[1]) <= PIECE for _, raw in recs[:-1])
    assert b"".join(raw[1] for _, raw in recs[:-1]) == data
    assert [p for p, _ in recs[:-1]] == [raw[0] for _, raw in recs[:-1]]
    assert recs[-1] == (len(data), (len(data), None))
    pieces = [unit.decode(raw) for _, raw in recs]
    assert pieces[0].head and not any(p.head for p in pieces[1:])
    assert pieces[-1].tail and pieces[-1].text == "" and not any(p.tail for p in pieces[:-1])
    # a reader that starts at a piece's position cuts the same pieces from there on
    assert list(unit.records(recs[7][0])) == recs[7:]
    # whole documents (joined) or the pieces' texts, as the caller asks
    assert list(sources.iter_texts(str(d / "*.txt"))) == texts
    assert "".join(sources.iter_texts(str(d / "c.txt"), pieces=True)) == texts[2]


def test_pieces_tokenize_like_the_whole_file(txt_files, tok):
    """One epoch, every stream's packed tokens: each file appears as encode(whole file) + EOS
    (except the counted final remainder of each stream)."""
    d, texts = txt_files
    expected = [tok.encode(t) + [tok.eos_id] for t in texts]
    cfg = StreamConfig(seq_len=16, streams=4, seed=3)
    loader = Loader([resolve_source(str(d / "*.txt"))], cfg, tok.path, tok.hash, micro_batch=4, rank=0, world=1,
                    num_workers=0, repeat=False, with_meta=True)
    windows = defaultdict(list)
    for batch in loader:
        for row, s, k in zip(batch["input_ids"], batch["stream"], batch["index"]):
            windows[int(s)].append((int(k), row.tolist()))
    seen = []
    for ws in windows.values():
        seq = [t for _, row in sorted(ws) for t in row]
        while seq:
            end = seq.index(tok.eos_id) + 1 if tok.eos_id in seq else len(seq)
            seen.append(seq[:end])
            seq = seq[end:]
    assert len(seen) == len(expected)
    for doc in expected:
        match = [s for s in seen if doc[:len(s)] == s]
        assert len(match) == 1 and len(doc) - len(match[0]) <= cfg.seq_len, "pieces tokenized differently"
    assert sum(map(len, seen)) + loader.remainder_tokens() == sum(map(len, expected))


def test_resume_inside_a_text_file_rereads_one_piece(txt_files, tok):
    d, _ = txt_files
    srcs = [resolve_source(str(d / "*.txt"))]
    cfg = StreamConfig(seq_len=32, streams=4, seed=1, shuffle_windows=1)

    def make(state=None, workers=0):
        return Loader(srcs, cfg, tok.path, tok.hash, micro_batch=4, rank=0, world=1, num_workers=workers, state=state)

    straight = make()
    ref = [next(straight)["input_ids"] for _ in range(140)]
    first = make()
    for _ in range(120):
        next(first)
    resumed = make(first.state_dict())
    assert all(np.array_equal(next(resumed)["input_ids"], ref[120 + i]) for i in range(20))
    assert resumed.tokenized_docs <= 4 * 3, resumed.tokenized_docs  # per stream: its piece and the next
    assert straight.tokenized_docs >= 2 * resumed.tokenized_docs
    with_workers = make(first.state_dict(), workers=2)
    assert all(np.array_equal(next(with_workers)["input_ids"], ref[120 + i]) for i in range(20))


def test_doc_mask_spans_pieces_of_one_document(txt_files, tok):
    """Positions restart and BOS appears only where a document starts (after EOS), never at a
    piece boundary inside a file."""
    d, _ = txt_files
    cfg = StreamConfig(seq_len=64, streams=4, seed=2, doc_mask=True, bos=True)
    loader = Loader([resolve_source(str(d / "*.txt"))], cfg, tok.path, tok.hash, micro_batch=4, rank=0, world=1,
                    num_workers=0, repeat=False)
    rows = 0
    for batch in loader:
        ids, pos = batch["input_ids"], batch["position_ids"]
        for r in range(len(ids)):
            rows += 1
            for t in range(1, ids.shape[1]):
                restart = bool(pos[r, t] == 0)
                assert restart == bool(ids[r, t - 1] == tok.eos_id), (r, t)
                assert (ids[r, t] == tok.bos_id) == restart
                assert restart or pos[r, t] == pos[r, t - 1] + 1
    assert rows * 64 > 3 * 4 * PIECE / 4  # the files span many pieces' worth of windows


def test_prepared_shards_hold_one_document_per_file(txt_files, tok, tmp_path):
    d, texts = txt_files
    srcs = [resolve_source(str(d / "*.txt"))]
    manifest = shards.prepare(srcs, tmp_path / "out", tok.path, workers=2, docs_per_shard=2)
    assert manifest["docs"] == 3 and len(manifest["shards"]) == 2
    got = list(iter_documents(resolve_source(str(tmp_path / "out"), tokenizer_hash=tok.hash)))
    assert [ids.tolist() for ids in got] == [tok.encode(t) for t in texts]


def test_bad_piece_is_skipped_and_counted_and_the_document_still_ends(tmp_path, tok):
    good = "line of words\n" * 600  # 8400 bytes: pieces of about PIECE bytes
    data = good.encode() + b"bad \xff byte\n" + good.encode()
    (tmp_path / "bad.txt").write_bytes(data)
    src = resolve_source(str(tmp_path / "bad.txt"))
    log = ErrorLog()
    (text,) = iter_documents(src, on_error="skip", errors=log)
    (entry,) = log.to_dict().values()
    assert entry["counts"] == {"invalid_utf8": 1}
    assert f"invalid UTF-8 at byte {len(good.encode()) + 4}" in " ".join(log.report())
    assert text.startswith("line of words\n") and text.endswith("line of words\n") and "bad" not in text
    with pytest.raises(DataError, match=r"bad\.txt.*invalid UTF-8"):
        list(iter_documents(src, on_error="fail"))

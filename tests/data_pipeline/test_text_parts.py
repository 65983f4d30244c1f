"""Large .txt files: split at line starts into documents of 1-2 PART_BYTES that spread over the
streams like .jsonl lines (memory is one part, a resume re-reads at most one part); small files
stay one document. PART_BYTES is made small here so small files have many parts."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from data_pipeline import shards, sources
from data_pipeline.sources import DataError, ErrorLog, iter_documents, resolve_source
from data_pipeline.stream import Loader, StreamConfig
from data_pipeline.tokenizer import load_tokenizer

PART = 4096


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(sources, "PART_BYTES", PART)


@pytest.fixture(scope="module")
def big_txt(tmp_path_factory):
    """One 150 KB file of stdlib docstrings and comments with emoji and CJK lines mixed in."""
    docs = list(sources.builtin_texts("validation"))
    parts, k = [], 0
    while sum(len(p.encode()) for p in parts) < 150_000:
        parts += [docs[k % len(docs)], ["emoji 🙂 here", "中文的文本", "naïve café\r"][k % 3]]
        k += 1
    path = tmp_path_factory.mktemp("txt") / "big.txt"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def test_parts_cut_at_line_starts_and_cover_the_file(big_txt):
    unit = resolve_source(str(big_txt)).units[0]
    data = big_txt.read_bytes()
    recs = list(unit.records(0))
    texts = [unit.decode(raw) for _, raw in recs]
    assert len(recs) == len(data) // PART
    assert "".join(texts).encode() == data
    assert all(data[p - 1:p] == b"\n" for p, _ in recs[1:])
    assert all(PART - 200 < len(raw[1]) < 2 * PART + 200 for _, raw in recs)  # 1-2 parts, plus a line
    # a region reader takes the parts that start in it; regions partition the parts
    V = 7
    by_region = [[p for p, _ in unit.records(j * unit.size // V, (j + 1) * unit.size // V, first=j == 0)]
                 for j in range(V)]
    assert sorted(p for ps in by_region for p in ps) == [p for p, _ in recs] and all(by_region)
    # a reader that starts at a part's position reads from that part on
    assert list(unit.records(recs[5][0])) == recs[5:]
    assert list(sources.iter_texts(str(big_txt))) == texts


def test_small_file_stays_one_document(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("line one\n" * 800)  # 7200 bytes < 2 * PART
    assert list(sources.iter_texts(str(path))) == [path.read_text()]


def test_one_big_file_spreads_over_streams_once(big_txt, tok):
    """One epoch over 4 streams: every part's tokens appear exactly once (a file given whole to
    each stream in turn would appear once per stream), up to each stream's counted remainder."""
    unit = resolve_source(str(big_txt)).units[0]
    expected = Counter(tuple(tok.encode(unit.decode(raw)) + [tok.eos_id]) for _, raw in unit.records(0))
    cfg = StreamConfig(seq_len=32, streams=4, seed=3)
    loader = Loader([resolve_source(str(big_txt))], cfg, tok.path, tok.hash, micro_batch=4, rank=0, world=1,
                    num_workers=0, repeat=False, with_meta=True)
    windows = defaultdict(list)
    for batch in loader:
        for row, s, k in zip(batch["input_ids"], batch["stream"], batch["index"]):
            windows[int(s)].append((int(k), row.tolist()))
    assert len(windows) == 4  # every stream got parts of the one file
    complete = Counter()
    for ws in windows.values():
        cur: list[int] = []
        for t in (t for _, row in sorted(ws) for t in row):
            cur.append(t)
            if t == tok.eos_id:
                complete[tuple(cur)] += 1
                cur = []
    assert not complete - expected, "a part appeared twice or is not in the file"
    assert len(expected - complete) <= 4  # at most the unfinished part of each stream
    inputs = sum(len(row) for ws in windows.values() for _, row in ws)
    assert inputs + loader.remainder_tokens() == sum(len(d) * n for d, n in expected.items())


def test_resume_inside_a_big_file_rereads_one_part(big_txt, tok):
    srcs = [resolve_source(str(big_txt))]
    cfg = StreamConfig(seq_len=32, streams=4, seed=1, shuffle_windows=1)

    def make(state=None, workers=0):
        return Loader(srcs, cfg, tok.path, tok.hash, micro_batch=4, rank=0, world=1, num_workers=workers, state=state)

    straight = make()
    ref = [next(straight)["input_ids"] for _ in range(220)]
    first = make()
    for _ in range(200):
        next(first)
    state = first.state_dict()
    resumed = make(state)
    assert all(torch.equal(next(resumed)["input_ids"], ref[200 + i]) for i in range(20))
    assert resumed.tokenized_docs <= 4 * 3, resumed.tokenized_docs  # per stream: its part and the next
    assert straight.tokenized_docs >= 2 * resumed.tokenized_docs
    other_workers = make(state, workers=2)
    assert all(torch.equal(next(other_workers)["input_ids"], ref[200 + i]) for i in range(20))


def test_prepared_shards_hold_the_parts(big_txt, tok, tmp_path):
    srcs = [resolve_source(str(big_txt))]
    manifest = shards.prepare(srcs, tmp_path / "out", tok.path, workers=2, docs_per_shard=8)
    texts = list(sources.iter_texts(str(big_txt)))
    assert manifest["docs"] == len(texts)
    got = list(iter_documents(resolve_source(str(tmp_path / "out"), tokenizer_hash=tok.hash)))
    assert [ids.tolist() for ids in got] == [tok.encode(t) for t in texts]


def test_bad_part_is_skipped_and_counted(tmp_path):
    good = b"line of words\n" * 600  # 8400 bytes: two parts of the good text, then the bad one...
    data = good + b"bad \xff byte\n" + good
    (tmp_path / "bad.txt").write_bytes(data)
    src = resolve_source(str(tmp_path / "bad.txt"))
    log = ErrorLog()
    texts = list(iter_documents(src, on_error="skip", errors=log))
    (entry,) = log.to_dict().values()
    assert entry["counts"] == {"invalid_utf8": 1}
    assert f"invalid UTF-8 at byte {len(good) + 4}" in " ".join(log.report())
    assert all("bad" not in t for t in texts) and sum(map(len, texts)) < len(data) - len(b"bad \xff byte\n")
    with pytest.raises(DataError, match=r"bad\.txt.*invalid UTF-8"):
        list(iter_documents(src, on_error="fail"))

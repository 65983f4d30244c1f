"""Token shards: format round trip, parallel prepare, memory-mapped reading, foreign tokenizers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_pipeline import shards
from data_pipeline.sources import DataError, iter_documents, resolve_source
from data_pipeline.stream import Loader, StreamConfig
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import BIN, child_env, run_cmd
from tests.data_pipeline import corpus

DOCS = corpus.texts(50, seed=11, hi=80) + ["unicode ✓ – ünïcödé 漢字 🙂", "x"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("prep")
    corpus.write_jsonl(d / "a.jsonl", DOCS[:30])
    corpus.write_jsonl_zst(d / "b.jsonl.zst", DOCS[30:])
    srcs = [resolve_source(str(d / "a.jsonl")), resolve_source(str(d / "b.jsonl.zst"))]
    manifest = shards.prepare(srcs, d / "out", tok.path, workers=2, docs_per_shard=8)
    return d, srcs, manifest


@pytest.mark.parametrize("vocab, dtype", [(1000, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_writer_reader_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, n) for n in (5, 0, 1, 300, 17)]
    w = shards.ShardWriter(tmp_path / "s.bin", vocab, "abc123")
    for d in docs:
        w.add(d)
    assert w.close() == {"file": "s.bin", "docs": 5, "tokens": sum(map(len, docs))}
    assert not (tmp_path / "s.bin.tmp").exists()
    h = shards.read_header(tmp_path / "s.bin")
    assert h == {"version": 1, "itemsize": np.dtype(dtype).itemsize, "vocab_size": vocab, "docs": 5,
                 "tokens": sum(map(len, docs)), "tokenizer_hash": "abc123"}
    r = shards.ShardReader(tmp_path / "s.bin")
    assert isinstance(r.tokens, np.memmap) and r.tokens.dtype == dtype
    assert len(r) == 5 and all(np.array_equal(r[i], d) for i, d in enumerate(docs))
    with pytest.raises(ValueError, match="out of range"):
        shards.ShardWriter(tmp_path / "t.bin", vocab, "abc123").add([vocab])


def test_prepare_round_trip_decodes_to_the_input(prepared, tok):
    d, _, manifest = prepared
    assert manifest["docs"] == len(DOCS) and len(manifest["shards"]) == 7  # ceil(52 / 8)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["hash"] == tok.hash
    assert [s["docs"] for s in manifest["sources"]] == [30, len(DOCS) - 30]
    got = [tok.decode(ids.tolist()) for ids in iter_documents(resolve_source(str(d / "out"), tokenizer_hash=tok.hash))]
    assert got == DOCS
    assert manifest["tokens"] == sum(len(ids) for ids in tok.encode_batch(DOCS))


def test_prepare_output_does_not_depend_on_worker_count(prepared, tok, tmp_path):
    d, srcs, manifest = prepared
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        again = shards.prepare(srcs, out, tok.path, workers=workers, docs_per_shard=8)
        assert again["shards"] == manifest["shards"]
        for s in manifest["shards"]:
            assert (out / s["file"]).read_bytes() == (d / "out" / s["file"]).read_bytes()


def test_shards_are_a_stream_source(prepared, tok):
    d, _, _ = prepared
    src = resolve_source(str(d / "out"), tokenizer_hash=tok.hash)
    assert all(u.seekable for u in src.units)
    loader = Loader([src], StreamConfig(seq_len=16, streams=4), tok.path, tok.hash, micro_batch=4, repeat=False)
    tokens = sum(b["input_ids"].numel() for b in loader) + loader.remainder_tokens()
    assert tokens == sum(len(ids) + 1 for ids in tok.encode_batch(DOCS))  # + EOS each


def test_foreign_tokenizer_is_refused(prepared, tok, tmp_path):
    d, srcs, _ = prepared
    other = train_tokenizer(iter(DOCS * 20), tmp_path / "other", vocab_size=400, num_sentinels=0)
    with pytest.raises(DataError, match=f"made with tokenizer {tok.hash}, but this run's tokenizer is {other.hash}"):
        resolve_source(str(d / "out"), tokenizer_hash=other.hash)
    # a shard of another tokenizer slipped into a directory whose manifest is ours
    foreign = shards.prepare(srcs[:1], tmp_path / "foreign", other.path, docs_per_shard=8)
    mixed = tmp_path / "mixed"
    shutil.copytree(d / "out", mixed)
    shutil.copy(tmp_path / "foreign" / foreign["shards"][0]["file"], mixed / "shard_00001.bin")
    with pytest.raises(DataError, match=r"shard .*shard_00001\.bin was made with tokenizer"):
        resolve_source(str(mixed), tokenizer_hash=tok.hash)


def test_damaged_shards_are_refused(prepared, tmp_path):
    d, _, manifest = prepared
    bad = tmp_path / "bad"
    shutil.copytree(d / "out", bad)
    first = bad / manifest["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        shards.ShardReader(first)
    first.write_bytes(b"not a shard at all" * 20)
    with pytest.raises(DataError, match="bad magic"):
        resolve_source(str(bad))
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an llmstack shard manifest"):
        resolve_source(str(bad))


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_prepare_refuses_an_output_that_overlaps_an_input(prepared, tok, tmp_path):
    """data.out equal to, inside or containing an input would replace (or mix into) what it reads."""
    d, srcs, _ = prepared
    shard_src = resolve_source(str(d / "out"), tokenizer_hash=tok.hash)
    before = files(d / "out")
    for out in (d / "out", d / "out" / "sub", d):
        with pytest.raises(DataError, match=r"data.out .* (is|overlaps) the input"):
            shards.prepare([shard_src], out, tok.path, docs_per_shard=8)
    with pytest.raises(DataError, match=r"overlaps the input .*a\.jsonl"):
        shards.prepare(srcs, d, tok.path, docs_per_shard=8)  # the directory holding the text inputs
    assert files(d / "out") == before and not (d / "out" / "sub").exists()


def test_reprepare_removes_only_its_own_shards(prepared, tok, tmp_path):
    d, srcs, manifest = prepared
    out = tmp_path / "out"
    shards.prepare(srcs, out, tok.path, docs_per_shard=8)
    (out / "notes.txt").write_text("mine")
    again = shards.prepare(srcs, out, tok.path, docs_per_shard=32)  # fewer shards: the old ones go
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "notes.txt",
                                                            *(s["file"] for s in again["shards"])])
    assert len(again["shards"]) < len(manifest["shards"]) and (out / "notes.txt").read_text() == "mine"


def test_prepare_refuses_shards_it_did_not_write(prepared, tok, tmp_path):
    d, srcs, manifest = prepared
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(d / "out" / manifest["shards"][0]["file"], foreign / "shard_00000.bin")  # no manifest lists it
    before = files(foreign)
    with pytest.raises(DataError, match="holds shard_00000.bin, which no manifest"):
        shards.prepare(srcs, foreign, tok.path, docs_per_shard=8)
    (foreign / "manifest.json").write_text(json.dumps({"format": "someone-else"}))
    with pytest.raises(DataError, match="not an llmstack shard manifest"):
        shards.prepare(srcs, foreign, tok.path, docs_per_shard=8)
    (foreign / "manifest.json").unlink()
    assert files(foreign) == before


def test_interrupted_prepare_is_cleaned_up_by_the_next(prepared, tok, tmp_path):
    """While a prepare runs its marker names the shard files as ours: a rerun after a crash
    (shards written, no manifest yet) replaces them instead of refusing."""
    d, srcs, manifest = prepared
    out = tmp_path / "out"
    shards.prepare(srcs, out, tok.path, docs_per_shard=8)
    (out / "manifest.json").unlink()  # the state a crash leaves: marker, shards, no manifest
    (out / shards.PREPARING).write_text("{}")
    (out / "shard_00099.bin.tmp").write_bytes(b"partial")
    again = shards.prepare(srcs, out, tok.path, docs_per_shard=8)
    assert again["shards"] == manifest["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["file"] for s in again["shards"])])


def test_cli_prepare_and_inspect(tmp_path, tokenizer_dir):
    corpus.write_jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"tokenizer: {{path: {tokenizer_dir}}}\ndata:\n  sources: [{{path: {tmp_path / 'c.jsonl'}}}]\n"
                   f"  out: {tmp_path / 'shards'}\n  num_workers: 2\n  docs_per_shard: 16\n")
    llmstack = str(BIN / "llmstack")
    proc = run_cmd([llmstack, "data", "prepare", str(cfg)], cwd=tmp_path)
    assert f"wrote 4 shards, {len(DOCS)} documents" in proc.stdout
    proc = run_cmd([llmstack, "data", "inspect", str(tmp_path / "shards"), "--samples", "2"], cwd=tmp_path)
    out = proc.stdout
    assert f"documents: {len(DOCS)}" in out and "token histogram" in out and "document length" in out
    assert "shard_00000.bin doc 0" in out and DOCS[0][:30] in out  # decoded with the recorded tokenizer
    bad = run_cmd([llmstack, "data", "inspect", str(tmp_path)], cwd=tmp_path, check=False, env=child_env())
    assert bad.returncode == 2 and "manifest.json" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cmd([llmstack, "data", "prepare", str(cfg), "data.out=null"], cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "data.out is required" in missing.stderr
    shards_before = files(tmp_path / "shards")
    into_input = run_cmd([llmstack, "data", "prepare", str(cfg), f"data.out={tmp_path / 'shards'}",
                          f"data.sources=[{{path: {tmp_path / 'shards'}}}]"], cwd=tmp_path, check=False)
    assert into_input.returncode == 2 and "is the input" in into_input.stderr and "Traceback" not in into_input.stderr
    assert files(tmp_path / "shards") == shards_before

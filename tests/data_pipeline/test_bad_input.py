"""Bad input is skipped and counted once per record (data.on_error=skip) or stops with the file
and line (fail, exit 2); never a traceback, never silent."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from data_pipeline import shards
from data_pipeline.sources import DataError, ErrorLog, iter_documents, resolve_source
from data_pipeline.stream import Loader, StreamConfig
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import BIN, run_cmd
from tests.data_pipeline import corpus

GOOD = corpus.texts(30, seed=21, hi=60, tag="g")


def line(text: str) -> bytes:
    return json.dumps({"text": text}).encode() + b"\n"


def make_bad_corpus(d):
    """One file per defect; returns ({file name: {kind: count}}, first bad line per file, good texts)."""
    d.mkdir(exist_ok=True)
    good = GOOD[:15]  # the ones written below
    (d / "good.jsonl").write_bytes(b"".join(line(t) for t in good[:10]))
    (d / "utf8.jsonl").write_bytes(line(good[10]) + b'{"text": "caf\xe9 au lait"}\n' + line(good[11]))
    (d / "malformed.jsonl").write_bytes(line(good[12]) + b'{"text": "unterminated\n' + line(good[13]) + b"[1, 2\n")
    (d / "nofield.jsonl").write_bytes(b'{"body": "x"}\n' + line(good[14]) + b'{"text": null}\n{"text": 5}\n')
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.jsonl").write_bytes(b"\n  \n\n")
    (d / "empty.txt").write_bytes(b"")
    big = [line(t) for t in corpus.texts(400, seed=22, hi=40, tag="t")]
    gz = gzip.compress(b"".join(big))
    (d / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    import zstandard

    zs = zstandard.ZstdCompressor().compress(b"".join(big))
    (d / "trunc.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    # the good records of the truncated files, read with the libraries' own readers
    with gzip.open(d / "trunc.jsonl.gz", "rb") as f:
        gz_lines = []
        try:
            for raw in f:
                gz_lines.append(raw)
        except EOFError:
            pass
    zs_data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO((d / "trunc.jsonl.zst").read_bytes())).read()
    zs_lines = zs_data.split(b"\n")[:-1]  # the last piece is the cut line
    good += [json.loads(raw)["text"] for raw in gz_lines + zs_lines]
    expected = {"utf8.jsonl": {"invalid_utf8": 1}, "malformed.jsonl": {"malformed_json": 2},
                "nofield.jsonl": {"missing_field": 3}, "empty.jsonl": {"empty_file": 1},
                "blank.jsonl": {"empty_file": 1}, "empty.txt": {"empty_file": 1},
                "trunc.jsonl.gz": {"truncated": 1}, "trunc.jsonl.zst": {"truncated": 1}}
    first_line = {"utf8.jsonl": 2, "malformed.jsonl": 2, "nofield.jsonl": 1, "empty.jsonl": 1, "blank.jsonl": 1,
                  "trunc.jsonl.gz": len(gz_lines) + 1, "trunc.jsonl.zst": len(zs_lines) + 1}
    return expected, first_line, good


def by_name(log: ErrorLog) -> dict:
    return {path.rsplit("/", 1)[-1]: counts for path, counts in log.counts().items()}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    expected, first_line, good = make_bad_corpus(d)
    return d, expected, first_line, good


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_skip_counts_once_across_ranks_and_workers(bad, tok):
    d, expected, _, good = bad
    srcs = [resolve_source(str(d / "*.jsonl*")), resolve_source(str(d / "*.txt"))]
    cfg = StreamConfig(seq_len=16, streams=8, seed=1)
    errors, tokens = ErrorLog(), 0
    for r in range(2):
        loader = Loader(srcs, cfg, tok.path, tok.hash, micro_batch=4, rank=r, world=2, num_workers=2, repeat=False)
        tokens += sum(b["input_ids"].numel() for b in loader) + loader.remainder_tokens()
        errors.merge(loader.errors)
    assert by_name(errors) == expected
    assert tokens == sum(len(t) for t in corpus.doc_tokens(tok, good))  # every good record, none of the bad


def test_skip_counts_in_prepare_and_its_report(bad, tok, tmp_path):
    d, expected, first_line, good = bad
    srcs = [resolve_source(str(d / "*.jsonl*")), resolve_source(str(d / "*.txt"))]
    manifest = shards.prepare(srcs, tmp_path / "out", tok.path, workers=2, docs_per_shard=8)
    log = ErrorLog()
    log.merge(manifest["errors"])
    assert by_name(log) == expected and manifest["skipped"] == sum(sum(c.values()) for c in expected.values())
    assert manifest["docs"] == len(good)
    report = "\n".join(log.report())
    for name, n in first_line.items():
        assert f"{name}:{n}:" in report, (name, report)


@pytest.mark.parametrize("name, message", [
    ("utf8.jsonl", "utf8.jsonl:2: invalid UTF-8"),
    ("malformed.jsonl", "malformed.jsonl:2: not valid JSON"),
    ("nofield.jsonl", "nofield.jsonl:1: record has no field 'text'"),
    ("empty.jsonl", "empty.jsonl:1: file has no records"),
    ("trunc.jsonl.gz", "trunc.jsonl.gz:{n}: compressed stream ends early"),
    ("trunc.jsonl.zst", "trunc.jsonl.zst:{n}: compressed stream ends early"),
])
def test_fail_names_file_and_line(bad, name, message):
    d, _, first_line, _ = bad
    with pytest.raises(DataError) as err:
        list(iter_documents(resolve_source(str(d / name)), on_error="fail"))
    assert message.format(n=first_line[name]) in str(err.value)


def test_fail_in_a_loader_worker_reaches_the_main_process(bad, tok):
    d = bad[0]
    loader = Loader([resolve_source(str(d / "malformed.jsonl"))], StreamConfig(seq_len=16, streams=2), tok.path,
                    tok.hash, micro_batch=2, num_workers=2, on_error="fail")
    with pytest.raises(DataError, match=r"malformed\.jsonl:2: not valid JSON"):
        for _ in range(50):
            next(loader)


def test_cli_exit_2_naming_file_and_line(bad, tokenizer_dir, tmp_path):
    d = bad[0]
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"tokenizer: {{path: {tokenizer_dir}}}\ndata:\n  sources: [{{path: {d / 'malformed.jsonl'}}}]\n"
                   f"  out: {tmp_path / 'out'}\n")
    llmstack = str(BIN / "llmstack")
    proc = run_cmd([llmstack, "data", "prepare", str(cfg), "data.on_error=fail"], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "malformed.jsonl:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cmd([llmstack, "data", "prepare", str(cfg)], cwd=tmp_path)  # on_error=skip: counted, reported
    assert "skipped 2 bad records" in proc.stdout and "malformed.jsonl:2:" in proc.stdout

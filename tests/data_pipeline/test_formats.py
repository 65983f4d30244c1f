"""Every source format reads back its documents, in order, lazily, with the configured field."""

from __future__ import annotations

import pytest

from data_pipeline import sources
from data_pipeline.sources import DataError, ErrorLog, iter_documents, resolve_source
from tests.data_pipeline import corpus

DOCS = corpus.texts(40, seed=1)


def read(path, field="text"):
    return list(iter_documents(resolve_source(str(path), field)))


def test_plain_and_compressed_jsonl_and_txt(tmp_path):
    assert read(corpus.write_jsonl(tmp_path / "a.jsonl", DOCS)) == DOCS
    assert read(corpus.write_jsonl_gz(tmp_path / "a.jsonl.gz", DOCS)) == DOCS
    assert read(corpus.write_jsonl_zst(tmp_path / "a.jsonl.zst", DOCS)) == DOCS
    (tmp_path / "t.txt").write_text("one document\n\nover lines\n")
    assert read(tmp_path / "t.txt") == ["one document\n\nover lines\n"]
    # a glob is read in sorted file order, mixing formats
    assert read(tmp_path / "a.jsonl*") == DOCS * 3
    assert read(corpus.write_jsonl(tmp_path / "body.jsonl", DOCS[:3], field="body"), field="body") == DOCS[:3]


def test_concatenated_gzip_members_and_zstd_frames(tmp_path):
    import gzip

    import zstandard

    data = [("".join(f'{{"text": "{d}"}}\n' for d in part)).encode() for part in (DOCS[:5], DOCS[5:9])]
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(data[0]) + gzip.compress(data[1]))
    (tmp_path / "m.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(d) for d in data))
    assert read(tmp_path / "m.jsonl.gz") == DOCS[:9]
    assert read(tmp_path / "m.jsonl.zst") == DOCS[:9]


def test_parquet_column_and_resume_position(tmp_path):
    path = corpus.write_parquet(tmp_path / "p.parquet", DOCS, field="content", row_group_size=7)
    assert read(path, "content") == DOCS
    unit = resolve_source(str(path), "content").units[0]
    assert not unit.seekable
    # starting mid-file skips whole row groups via metadata and yields rows from the position on
    assert [p for p, _ in unit.records(23)] == list(range(23, 40))
    log = ErrorLog()
    assert list(iter_documents(resolve_source(str(path), "text"), "skip", log)) == []
    assert log.counts() == {str(path): {"missing_field": 1}}


def test_seekable_regions_partition_a_file(tmp_path):
    """Contiguous byte regions of a plain file hold every record exactly once."""
    unit = resolve_source(str(corpus.write_jsonl(tmp_path / "a.jsonl", DOCS))).units[0]
    assert unit.seekable
    for v in (1, 3, 7, 64):
        got = [unit.decode(raw) for j in range(v) for _, raw in unit.records(j * unit.size // v, (j + 1) * unit.size // v)]
        assert got == DOCS, v


def test_hf_streaming_local_dir_and_save_to_disk(tmp_path):
    import datasets

    d = tmp_path / "hfdata"
    d.mkdir()
    corpus.write_jsonl(d / "train.jsonl", DOCS[:10])
    corpus.write_jsonl(d / "test.jsonl", DOCS[10:15])
    src = resolve_source(f"hf:{d}:train")
    assert [type(u).__name__ for u in src.units] == ["HFStreaming"]
    assert read(f"hf:{d}:train") == DOCS[:10]
    assert read(f"hf:{d}:test") == DOCS[10:15]

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(saved))
    assert read(saved) == DOCS
    assert read(f"hf:{saved}") == DOCS
    unit = resolve_source(str(saved)).units[0]
    assert unit.seekable and unit.size == len(DOCS)
    assert [unit.decode(r) for _, r in unit.records(5, 8)] == DOCS[5:8]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:4]})}).save_to_disk(str(dd))
    assert read(f"hf:{dd}:train") == DOCS[:4]
    with pytest.raises(DataError, match="splits train"):
        resolve_source(f"hf:{dd}")


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        resolve_source(str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_source(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="hf:NAME"):
        resolve_source("hf:only-a-name")
    with pytest.raises(DataError, match="cannot open"):
        resolve_source(f"hf:{tmp_path / 'missing-dataset'}:train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="neither token shards"):
        resolve_source(str(tmp_path / "plain"))


def test_builtin_spec_reads_the_split():
    assert list(iter_documents(resolve_source("builtin:validation"))) == list(sources.builtin_texts("validation"))

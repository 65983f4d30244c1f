"""Builtin stdlib corpus (determinism, split, cache) and the txt/jsonl readers."""

import gzip
import json
import os

import pytest

from data_pipeline import builtin, sources


def test_builtin_is_deterministic():
    a = next(sources.builtin_documents("train"))
    b = next(sources.builtin_documents("train"))
    assert a == b
    assert set(a) == {"module", "text"}
    assert len(a["text"]) >= builtin.MIN_DOC_CHARS


def test_splits_disjoint_and_nonempty():
    train = [d["module"] for d in sources.builtin_documents("train")]
    val = [d["module"] for d in sources.builtin_documents("validation")]
    assert train and val
    assert not set(train) & set(val)
    assert train == sorted(train)  # deterministic module order
    # about 5% validation, with slack for a small number of modules
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.12
    # test suites and third-party packages are excluded
    assert not any(m.split(".")[0] in {"test", "site-packages"} for m in train + val)
    assert not any(".tests" in m or "idle_test" in m for m in train + val)


def test_texts_and_stats_agree():
    stats = sources.corpus_stats("validation")
    texts = list(sources.builtin_texts("validation"))
    assert stats["documents"] == len(texts)
    assert stats["characters"] == sum(map(len, texts))
    assert stats["bytes"] >= stats["characters"]


def test_bad_split():
    with pytest.raises(ValueError, match="train, validation"):
        sources.builtin_documents("test")
    with pytest.raises(ValueError, match="allowed"):
        sources.iter_texts("builtin:dev")


def test_iter_texts_builtin_specs():
    val = list(sources.builtin_texts("validation"))
    assert list(sources.iter_texts("builtin:validation")) == val
    first = next(sources.iter_texts("builtin"))
    assert first == next(sources.iter_texts("builtin:train"))


PROSE = "This module explains things at some length. " * 6


def _fake_stdlib(root):
    """A tiny stdlib tree exercising the skip rules."""
    files = {
        "alpha.py": f'"""{PROSE}"""\n\n# a comment\n# continued here\ny = 2\nx = 1  # trailing\n',
        "pkg/__init__.py": f'"""{PROSE}"""\n',
        "pkg/beta.py": f'def f():\n    """{PROSE}"""\n',
        "short.py": '"""too short"""\n',
        "broken.py": f'"""{PROSE}"""\ndef (:\n',
        "test/test_alpha.py": f'"""{PROSE}"""\n',
        "pkg/tests/helper.py": f'"""{PROSE}"""\n',
        "site-packages/thing.py": f'"""{PROSE}"""\n',
        "encodings/cp999.py": f'"""Codec generated from X with gencodec.py. {PROSE}"""\n',
    }
    for rel, src in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src, encoding="utf-8")


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    _fake_stdlib(root)
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "_stdlib_dir", lambda: str(root))
    # Every fake module goes to train so the assertions below see all of them.
    monkeypatch.setattr(builtin, "split_of", lambda module: "train")
    return tmp_path


def test_extraction_rules_and_cache(fake_stdlib, monkeypatch):
    docs = list(sources.builtin_documents("train"))
    assert [d["module"] for d in docs] == ["alpha", "pkg", "pkg.beta"]
    alpha = docs[0]["text"]
    # docstring and comments in source order; consecutive comment lines form one paragraph
    assert alpha.startswith(PROSE.strip())
    assert alpha.endswith("\n\na comment\ncontinued here\n\ntrailing")

    cache_files = list((fake_stdlib / "cache" / "corpus").iterdir())
    assert len(cache_files) == 1
    name = cache_files[0].name
    assert name.startswith("stdlib-py") and name.endswith(".jsonl")  # no temp files left behind

    def boom(*args, **kwargs):
        raise AssertionError("extractor called although the cache exists")

    monkeypatch.setattr(builtin, "_extract_all", boom)
    assert list(sources.builtin_documents("train")) == docs


def test_iter_texts_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "zwei"}) + "\n"
    )
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "three ✓"}) + "\n")
    (tmp_path / "c.txt").write_text("whole file\n\nis one document\n", encoding="utf-8")

    assert list(sources.iter_texts(str(tmp_path / "a.jsonl"))) == ["one", "zwei"]
    assert list(sources.iter_texts(str(tmp_path / "b.jsonl.gz"))) == ["three ✓"]
    assert list(sources.iter_texts(str(tmp_path / "c.txt"))) == ["whole file\n\nis one document\n"]
    assert list(sources.iter_texts(str(tmp_path / "*.jsonl*"))) == ["one", "zwei", "three ✓"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "custom field"}) + "\n")
    assert list(sources.iter_texts(os.path.join(tmp_path, "d.jsonl"), text_field="body")) == ["custom field"]


def test_iter_texts_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.iter_texts(missing)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        sources.iter_texts(str(tmp_path / "nothing-*.jsonl"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    it = sources.iter_texts(str(bad))
    assert next(it) == "ok"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        next(it)

    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: .*'text'"):
        list(sources.iter_texts(str(nofield)))

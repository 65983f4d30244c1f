"""Tokenizer training, HF parity, SentencePiece parity, hashing and lossless round trips."""

import itertools
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.sources import builtin_texts
from data_pipeline.tokenizer import (
    META_FILE,
    SP_MODEL_FILE,
    VocabShortfallWarning,
    load_tokenizer,
    min_vocab_size,
    tokenizer_hash,
    train_tokenizer,
)

TRICKY = [
    "hello world",
    "  two  spaces\n\n\tTab\r\n",
    " leading and trailing  ",
    "\x00\x01\x1b[0m control \x7f",
    "😀 emoji 👩‍👩‍👧, CJK 漢字かな, Ǆ ß İ ﬁ e\u0301",
    "        indented = 1\n" * 3,
    "=" * 70 + "\n" + " " * 33 + "x",
    "\u2028\u0085\ufeff zero\u200bwidth",
    "literal <0x41> and <|reserved_-ish <extra_id_x> <|bos",
    "",
]
SPECIALS_IN_TEXT = "<|bos|>user text<|eos|><extra_id_3><|reserved_0|>"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer(builtin_texts("train"), out, kind="bpe", vocab_size=1000, max_chars=2_000_000)
    return out


@pytest.fixture(scope="module")
def val_texts():
    return list(builtin_texts("validation"))[:10]


def _hf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_bpe_layout_and_special_ids(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.vocab_size == 1024  # 1000 padded to a multiple of 64
    assert tok.vocab_size % 64 == 0
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.role_ids == {"system": 5, "user": 6, "assistant": 7, "end": 8}
    assert tok.sentinel_ids == list(range(9, 109))
    assert tok.id_to_token(9) == "<extra_id_0>"
    assert tok.id_to_token(1023).startswith("<|reserved_")
    meta = json.loads((bpe_dir / META_FILE).read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == 1024 and meta["hash"] == tok.hash
    assert meta["training"]["chars"] <= 2_000_000
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in bpe_dir.iterdir()}


def test_bpe_matches_hf(bpe_dir, val_texts):
    tok = load_tokenizer(bpe_dir)
    hf = _hf(bpe_dir)
    texts = val_texts + TRICKY + [SPECIALS_IN_TEXT]
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        # add_special_tokens=True deliberately inserts nothing (BOS/EOS come from the pipeline)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (1, 2, 0, 4)


def test_bpe_roundtrip_tricky(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    for text in TRICKY + [SPECIALS_IN_TEXT]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(SPECIALS_IN_TEXT)[0] == tok.bos_id


@pytest.fixture(scope="module")
def bpe_tok(bpe_dir):
    return load_tokenizer(bpe_dir)


# st.text() covers all of Unicode (control characters, NUL, astral planes); surrogates are
# excluded because they cannot be encoded as UTF-8 at all.
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(text=ANY_TEXT)
def test_bpe_roundtrip_property(bpe_tok, text):
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_hash_stable_and_sensitive(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    h = tokenizer_hash(bpe_dir)
    assert tok.hash == h and len(h) == 16
    # reformatting the JSON does not change the hash
    content = json.loads((bpe_dir / "tokenizer.json").read_text())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text(json.dumps(content, indent=4, sort_keys=False))
    assert tokenizer_hash(tmp_path / "a") == h
    # a save/load cycle through both libraries keeps it
    tok.backend.save(str(tmp_path / "b.json"))
    assert tokenizer_hash(tmp_path / "b.json") == h
    _hf(bpe_dir).save_pretrained(str(tmp_path / "c"))
    assert tokenizer_hash(tmp_path / "c") == h
    # a different vocabulary changes it
    other = train_tokenizer(builtin_texts("train"), tmp_path / "d", vocab_size=512, max_chars=300_000)
    assert other.hash != h


def test_streaming_cap_and_no_sentinels(tmp_path):
    # An endless iterator only terminates because max_chars stops reading.
    endless = itertools.cycle(["the quick brown fox jumps over the lazy dog\n"])
    tok = train_tokenizer(endless, tmp_path / "t", vocab_size=300, num_sentinels=0, max_chars=50_000)
    assert tok.sentinel_ids == []
    assert tok.vocab_size % 64 == 0 and tok.vocab_size >= 265
    assert tok.role_ids["end"] == 8
    assert json.loads((tmp_path / "t" / META_FILE).read_text())["training"]["chars"] == 50_000


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="bpe, sp_bpe, sp_unigram"):
        train_tokenizer(["x"], tmp_path / "k", kind="wordpiece")
    assert min_vocab_size(100) == 365
    with pytest.raises(ValueError, match="minimum is 365"):
        train_tokenizer(["x"], tmp_path / "v", vocab_size=300)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(iter([]), tmp_path / "e", kind="sp_bpe")


@pytest.mark.parametrize("kind", ["bpe", "sp_bpe"])
def test_source_error_propagates(tmp_path, kind):
    def texts():
        yield "some text to train on " * 50
        raise ValueError("data.jsonl:2: not valid JSON")

    # sentencepiece turns iterator errors into RuntimeError strings; the original must surface
    with pytest.raises(ValueError, match=r"^data\.jsonl:2: not valid JSON$"):
        train_tokenizer(texts(), tmp_path / kind, kind=kind, vocab_size=400)


@pytest.fixture(scope="module", params=["sp_bpe", "sp_unigram"])
def sp_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / request.param
    train_tokenizer(builtin_texts("train"), out, kind=request.param, vocab_size=1000, max_chars=300_000)
    return out


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return load_tokenizer(sp_dir)


@settings(max_examples=100, deadline=None)
@given(text=ANY_TEXT.map(lambda s: s.replace("\u2581", "")))
def test_sentencepiece_roundtrip_property(sp_tok, text):
    assert sp_tok.decode(sp_tok.encode(text)) == text


def test_sentencepiece_parity(sp_dir, val_texts):
    import sentencepiece as spm

    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / SP_MODEL_FILE))
    hf = _hf(sp_dir)
    assert tok.vocab_size % 64 == 0
    assert sp.get_piece_size() <= tok.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert tok.sentinel_ids == list(range(9, 109))
    for text in val_texts + TRICKY:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text[:80]
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == ids
        assert tok.decode(ids) == text
    # Documented differences: U+2581 is SentencePiece's space symbol, so it decodes as " ";
    # literal special-token strings are matched by tokenizer.json (as in HF) but not by the .model.
    assert tok.decode(tok.encode("a\u2581b")) == "a b"
    assert tok.encode(SPECIALS_IN_TEXT)[0] == tok.bos_id
    assert tok.decode(tok.encode(SPECIALS_IN_TEXT)) == SPECIALS_IN_TEXT


@pytest.mark.parametrize("kind", ["bpe", "sp_bpe"])
def test_vocabulary_shortfall_is_warned_and_recorded(tmp_path, kind):
    # A few sentences hold far fewer mergeable pairs than a 5,000-token vocabulary needs: training
    # stops early, which must be said (both numbers, why, what to do) and recorded.
    texts = ["the quick brown fox jumps over the lazy dog\n" * 3, "pack my box with five dozen liquor jugs\n"] * 20
    with pytest.warns(VocabShortfallWarning) as caught:
        tok = train_tokenizer(texts, tmp_path / "short", kind=kind, vocab_size=5000, num_sentinels=0)
    meta = json.loads((tmp_path / "short" / META_FILE).read_text())
    trained = meta["trained_vocab_size"]
    assert trained < 5000
    assert meta["vocab_shortfall"] == {"requested": 5000, "trained": trained}
    assert tok.vocab_size == meta["vocab_size"] == -(-trained // 64) * 64  # the real vocabulary, padded
    message = str(caught[0].message)
    assert "vocab_size is 5,000" in message and f"learned only {trained:,} tokens" in message
    assert f"embeds {tok.vocab_size:,} tokens" in message
    assert ("ran out of merges" if kind == "bpe" else "no more pieces") in message
    assert "larger corpus" in message and f"vocab_size to {trained:,} or less" in message

    # asking for what the corpus supports: no warning, nothing recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error", VocabShortfallWarning)
        train_tokenizer(texts, tmp_path / "exact", kind=kind, vocab_size=trained, num_sentinels=0)
    assert json.loads((tmp_path / "exact" / META_FILE).read_text())["vocab_shortfall"] is None

"""Tokenizer training, loading and Hugging Face-compatible saving.

Three kinds, one runtime: every kind is saved as a ``tokenizers`` ``tokenizer.json`` and the
:class:`Tokenizer` wrapper always runs that file, so encoding speed, batching and HF parity are
the same whichever algorithm trained the vocabulary.

- ``bpe``: byte-level BPE (GPT-2 style) from the ``tokenizers`` library. Every UTF-8 string
  round-trips losslessly because the 256 byte symbols are always in the vocabulary and there is
  no normalizer.
- ``sp_bpe`` / ``sp_unigram``: SentencePiece BPE / Unigram with byte fallback and the identity
  normalization rule. The ``.model`` file is kept next to ``tokenizer.json``, which holds an
  equivalent ``tokenizers`` model built from the SentencePiece pieces and scores (same ids).

SentencePiece round-trip caveat: SentencePiece represents a space as U+2581 ("▁", LOWER ONE
EIGHTH BLOCK) inside pieces, so a literal U+2581 in the input is indistinguishable from a space
and decodes as " ". Every other string (control characters, NUL, emoji, CJK, whitespace runs,
leading/trailing spaces) round-trips exactly; this is what the tests check.

SentencePiece parity caveat (``sp_unigram`` only): when two segmentations have exactly equal
scores because they use the same pieces in a different order (e.g. "\\n\\n\\n" as "\\n"+"\\n\\n" or
"\\n\\n"+"\\n"), SentencePiece breaks the tie through float32 rounding and ``tokenizers`` through
float64, so the ids can differ (about 0.6% of random strings built from newline runs; none on the
validation corpus). Both decode to the same text, and llmstack only ever runs tokenizer.json.

Special tokens take the lowest ids in a fixed order: pad=0, bos=1, eos=2, unk=3, mask=4, the chat
roles (system, user, assistant, end; the chat template that uses them is described in formats.py
and saved as the HF ``chat_template``), then the T5 sentinels ``<extra_id_0>``... The vocabulary is
padded with ``<|reserved_K|>`` tokens up to a multiple of ``pad_to_multiple`` so embedding
matrices have GPU-friendly shapes.

Special tokens written literally in the input text (e.g. the string "<|eos|>") are recognised as
the special token by ``encode``, as in Hugging Face tokenizers; decoding gives the same string
back, so the round trip still holds. (The SentencePiece ``.model`` itself treats pad/bos/eos as
control symbols and does not match them in text; ``tokenizer.json`` is what llmstack runs.)

``add_special_tokens=True`` in Hugging Face adds nothing: the llmstack data pipeline inserts
BOS/EOS itself, so an HF user gets exactly the ids the model saw for a document body.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

KINDS = ("bpe", "sp_bpe", "sp_unigram")
META_FILE = "llmstack_tokenizer.json"
SP_MODEL_FILE = "sentencepiece.model"
META_FORMAT = 1
# An extended copy's record of what was added to which tokenizer (extend_tokenizer)
ADDED_FILE = "llmstack_added_tokens.json"
PAD_TOKEN = "<|pad|>"  # the pad token extend_tokenizer adds to a tokenizer without one
# The transformers files an extended copy carries beside tokenizer.json. Slow tokenizers' vocabulary
# files (tokenizer.model, vocab.json, merges.txt) are left behind: they would lack the added tokens.
_HF_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
             META_FILE, SP_MODEL_FILE)
_SPACE = "\u2581"  # SentencePiece's visible space
# SentencePiece skips training "sentences" longer than max_sentence_length bytes, so documents
# are fed in line-aligned chunks of at most this many characters (4 bytes per char worst case).
_SP_CHUNK_CHARS = 4096


@dataclass(frozen=True)
class SpecialTokens:
    """The special token strings, in id order via :meth:`ordered`."""

    pad: str = "<|pad|>"
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    unk: str = "<|unk|>"
    mask: str = "<|mask|>"
    roles: dict = field(
        default_factory=lambda: {
            "system": "<|system|>",
            "user": "<|user|>",
            "assistant": "<|assistant|>",
            "end": "<|end|>",
        }
    )
    num_sentinels: int = 100

    @property
    def sentinels(self) -> list[str]:
        return [f"<extra_id_{i}>" for i in range(self.num_sentinels)]

    def ordered(self) -> list[str]:
        """All special tokens in id order: pad, bos, eos, unk, mask, roles, sentinels."""
        return [self.pad, self.bos, self.eos, self.unk, self.mask, *self.roles.values(), *self.sentinels]


def min_vocab_size(num_sentinels: int = 100) -> int:
    """Smallest allowed vocab_size: all special tokens plus the 256 byte tokens."""
    return len(SpecialTokens(num_sentinels=num_sentinels).ordered()) + 256


# ---------------------------------------------------------------------------------------------
# Runtime wrapper


def tokenizer_hash(path: str | os.PathLike) -> str:
    """Short sha256 of the canonical content of tokenizer.json (formatting-insensitive). An
    extended copy (:func:`extend_tokenizer`) is ``<base hash>+<own hash>``: weights made for the
    base tokenizer are recognised as fitting it once their vocabulary grows (:func:`extends`)."""
    file = _tokenizer_file(path)
    content = json.loads(file.read_text(encoding="utf-8"))
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    own = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    base = _added_record(file.parent).get("base_hash")
    return f"{base}+{own}" if base else own


def extends(tokenizer_hash: str | None, base_hash: str | None) -> bool:
    """True if the tokenizer of `tokenizer_hash` is an extended copy of the one of `base_hash`
    (tokens added to it, by one or several :func:`extend_tokenizer` calls); any extension when
    `base_hash` is unknown (None)."""
    if not tokenizer_hash or "+" not in tokenizer_hash:
        return False
    return base_hash is None or tokenizer_hash.startswith(base_hash + "+")


def _added_record(d: Path) -> dict:
    f = d / ADDED_FILE
    try:
        raw = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer not found: {p} (expected a directory with tokenizer.json)")
    return p


class Tokenizer:
    """A trained tokenizer: encode/decode plus the special-token ids llmstack needs."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        file = _tokenizer_file(path)
        self.path = str(file.parent)
        self._tok = _HFTokenizer.from_file(str(file))
        self.hash = tokenizer_hash(file)
        meta_file = file.parent / META_FILE
        self.meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        self.kind = self.meta.get("kind", "unknown")
        # Token strings come from our metadata when present, else the llmstack defaults; ids are
        # always looked up in the vocabulary itself so they can never disagree with it.
        names = self.meta.get("special_tokens") or {}
        default = SpecialTokens()
        hf_names = {} if self.meta else _hf_special_tokens(file.parent)

        def special_id(name: str) -> int | None:
            if not self.meta and hf_names:  # another library's tokenizer: its own special tokens, or none
                return self._id(hf_names.get(name))
            return self._id(names.get(name, {}).get("token", getattr(default, name)))

        self.pad_id = special_id("pad")
        self.bos_id = special_id("bos")
        self.eos_id = special_id("eos")
        self.unk_id = special_id("unk")
        self.mask_id = special_id("mask")
        role_tokens = self.meta.get("roles") or {k: {"token": v} for k, v in default.roles.items()}
        self.role_ids = {k: self._id(v["token"]) for k, v in role_tokens.items()}
        self.sentinel_ids = []
        while (i := self._id(f"<extra_id_{len(self.sentinel_ids)}>")) is not None:
            self.sentinel_ids.append(i)
        # an extended copy (extend_tokenizer): {"base_hash", "base_vocab_size", "pad", "tokens": {token: id}}
        self.added = _added_record(file.parent)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Size of the id space (padded; includes special and reserved tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; never adds BOS/EOS (the data pipeline does that)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel on all cores by ``tokenizers``."""
        texts = list(texts)
        # encode_batch_fast skips offset tracking, which we never use.
        fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fn(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept so decode(encode(s)) == s."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"hash={self.hash!r}, path={self.path!r})")


def _hf_special_tokens(d: Path) -> dict[str, str]:
    """{"bos": token, ...} of a transformers tokenizer directory (tokenizer_config.json; for a key it
    lacks, special_tokens_map.json): a Llama 3 or Qwen tokenizer names its own BOS / EOS / PAD, or has
    none of one (then absent here). Empty when neither file names any."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = d / fname
        try:
            raw = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (OSError, ValueError):
            continue
        for name in ("pad", "bos", "eos", "unk", "mask"):
            if f"{name}_token" not in raw:
                continue
            v = raw[f"{name}_token"]
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                found[name] = v
            else:  # null: the tokenizer has none
                found.pop(name, None)
    return found


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json (or the file itself)."""
    return Tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Added tokens


def tokens_to_add(tokenizer: Tokenizer, *, add_pad: bool = True,
                  add_tokens: Sequence[str] = ()) -> tuple[str | None, list[str]]:
    """(pad token to declare or None, tokens the vocabulary lacks, in order) for `tokenizer`:
    with `add_pad`, a tokenizer without a pad token gets PAD_TOKEN (a new token unless its
    vocabulary already holds that string); `add_tokens` not in the vocabulary are added."""
    pad = PAD_TOKEN if add_pad and tokenizer.pad_id is None else None
    new: list[str] = []
    for t in ([pad] if pad else []) + list(add_tokens):
        if tokenizer.token_to_id(t) is None and t not in new:
            new.append(t)
    return pad, new


def extend_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, add_pad: bool = True,
                     add_tokens: Sequence[str] = (), avoid_ids: Iterable[int] = (),
                     note: dict | None = None) -> Tokenizer:
    """`tokenizer` with a pad token and `add_tokens` added (see :func:`tokens_to_add`), written to
    `out_dir` as a copy; `tokenizer` itself when there is nothing to add (no copy).

    The copy holds tokenizer.json with the new tokens as special tokens (ids after the existing
    ones: the ids of every text stay the same), the transformers files (tokenizer_config.json,
    special_tokens_map.json: the pad token named, the added ones listed; the chat template kept),
    and ADDED_FILE recording the base tokenizer's hash and size and the added ids; its hash is
    ``<base hash>+<own hash>`` (:func:`tokenizer_hash`). The pad is never an EOS: a PAD_TOKEN that
    the vocabulary already holds as `tokenizer`'s EOS or one of `avoid_ids` (e.g. a model's other
    EOS ids) is refused (ValueError). The same inputs always give the same copy and hash. `note`
    is kept in the record (e.g. the special ids a model's config names, for its export).
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _HFTokenizer

    pad, new = tokens_to_add(tokenizer, add_pad=add_pad, add_tokens=add_tokens)
    if pad is None and not new:
        return tokenizer
    if pad is not None and pad not in new:
        existing = tokenizer.token_to_id(pad)
        if existing == tokenizer.eos_id or existing in set(avoid_ids):
            raise ValueError(f"cannot add the pad token {pad}: the tokenizer has it as an EOS token (id {existing})")
    src = Path(tokenizer.path)
    tok = _HFTokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    ids = {t: tok.token_to_id(t) for t in new}
    if any(i is None or i < tokenizer.vocab_size for i in ids.values()):  # never an existing id
        raise RuntimeError(f"added tokens got ids {ids}, expected {tokenizer.vocab_size} and up")

    final = Path(out_dir)
    out = final.with_name(f"{final.name}.tmp{os.getpid()}")  # renamed into place when complete
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in _HF_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tok.save(str(out / "tokenizer.json"))
    extra = [t for t in new if t != pad]
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    def update(name: str, fresh: dict | None) -> None:
        f = out / name
        if not f.is_file() and fresh is None:
            return
        cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else fresh
        if pad is not None:
            cfg["pad_token"] = pad
        if name == "tokenizer_config.json" and isinstance(cfg.get("added_tokens_decoder"), dict):
            for t, i in ids.items():
                cfg["added_tokens_decoder"][str(i)] = {"content": t, **entry}
        if extra:
            key = next((k for k in ("extra_special_tokens", "additional_special_tokens")
                        if isinstance(cfg.get(k), list)), "additional_special_tokens")
            cfg[key] = [*cfg.get(key, []), *[t for t in extra if t not in cfg.get(key, [])]]
        f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # a bare tokenizer.json gets a tokenizer_config.json naming its special tokens, as transformers reads them
    named = {f"{k}_token": tokenizer.id_to_token(i) for k, i in
             (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unk", tokenizer.unk_id)) if i is not None}
    update("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **named})
    update("special_tokens_map.json", None)
    record = {**(note or {}), "base_hash": tokenizer.hash, "base_vocab_size": tokenizer.vocab_size, "pad": pad,
              "tokens": ids}
    (out / ADDED_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (out / META_FILE).is_file():  # an llmstack tokenizer: its metadata describes the copy
        meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        meta.update(vocab_size=tok.get_vocab_size(with_added_tokens=True), hash=tokenizer_hash(out),
                    added_tokens=ids)
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    return Tokenizer(final)


# ---------------------------------------------------------------------------------------------
# Training


class VocabShortfallWarning(UserWarning):
    """Training learned fewer tokens than ``vocab_size`` asked for: the corpus ran out of merges."""


def vocab_shortfall(meta: dict, key_prefix: str = "") -> str | None:
    """Why a trained tokenizer (its metadata) has fewer tokens than its requested ``vocab_size``
    and what to do about it; None when training reached the requested size. ``key_prefix``
    (e.g. "tokenizer.") is put before the option names, so they read as the caller's config keys."""
    short = meta.get("vocab_shortfall")
    if not short:
        return None
    requested, trained, padded = short["requested"], short["trained"], meta["vocab_size"]
    training = meta.get("training") or {}
    text = f"the {training.get('chars', 0):,} characters of training text"
    if meta.get("kind") == "bpe":
        why = (f"BPE ran out of merges: no pair of adjacent tokens occurs {key_prefix}min_frequency="
               f"{training.get('min_frequency')} times or more in {text}")
    else:
        why = f"SentencePiece found no more pieces to add in {text}"
    cap = training.get("max_chars")
    more = (f"raise {key_prefix}max_chars={cap:,} (it cut the text) or train on a larger corpus"
            if cap and training.get("chars", 0) >= cap else "train on a larger corpus")
    return (f"{key_prefix}vocab_size is {requested:,} but training learned only {trained:,} tokens "
            f"({padded:,} after padding to a multiple of {meta.get('pad_to_multiple')}; a model built on "
            f"this tokenizer embeds {padded:,} tokens): {why}. For the full vocabulary, {more}; "
            f"else set {key_prefix}vocab_size to {trained:,} or less to get this size on purpose")


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """Stream ``texts``, stopping once ``max_chars`` characters have been yielded."""
    budget = max_chars
    for text in texts:
        if budget is not None:
            if budget <= 0:
                return
            text = text[:budget]
            budget -= len(text)
        if text:
            yield text


def _sp_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Line-aligned chunks of at most _SP_CHUNK_CHARS characters (newlines kept, so SentencePiece
    learns pieces for them instead of falling back to bytes)."""
    for text in texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            while len(line) > _SP_CHUNK_CHARS:
                if buf:
                    yield buf
                    buf = ""
                yield line[:_SP_CHUNK_CHARS]
                line = line[_SP_CHUNK_CHARS:]
            if len(buf) + len(line) > _SP_CHUNK_CHARS:
                yield buf
                buf = ""
            buf += line
        if buf:
            yield buf


def _train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, specials: list[str]):
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HFTokenizer(models.BPE())
    # No normalizer and add_prefix_space=False: the text is mapped byte-for-byte, so decoding
    # reproduces it exactly (a prefix space would be invented, a normalizer would lose data).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,  # given first, so they get ids 0..n-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok, None


def _train_sentencepiece(texts: Iterator[str], kind: str, vocab_size: int, sp: SpecialTokens):
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sp_sentences(texts),
            model_writer=model,
            model_type="bpe" if kind == "sp_bpe" else "unigram",
            vocab_size=vocab_size,
            byte_fallback=True,  # unseen characters become bytes, never <unk>
            normalization_rule_name="identity",  # no NFKC: it would rewrite e.g. "ﬁ" -> "fi"
            remove_extra_whitespaces=False,  # keep runs of spaces, leading and trailing spaces
            add_dummy_prefix=False,  # no invented leading space
            split_digits=True,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            max_sentence_length=4 * _SP_CHUNK_CHARS + 16,
            hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            pad_piece=sp.pad, bos_piece=sp.bos, eos_piece=sp.eos, unk_piece=sp.unk,
            # user-defined symbols fill the next free ids in order (4, 5, ...)
            user_defined_symbols=[sp.mask, *sp.roles.values(), *sp.sentinels],
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e}") from None
    proto = model.getvalue()
    return _tokenizer_from_sentencepiece(proto, kind, sp), proto


def _tokenizer_from_sentencepiece(proto: bytes, kind: str, sp: SpecialTokens):
    """An equivalent ``tokenizers`` model (same pieces, same ids) for a SentencePiece model."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, normalizers

    proc = spm.SentencePieceProcessor(model_proto=proto)
    n = proc.get_piece_size()
    pieces = [proc.id_to_piece(i) for i in range(n)]
    scores = [proc.get_score(i) for i in range(n)]
    special = set(sp.ordered())
    # "normal" pieces are the learned ones: not control/unk/byte and not our user-defined specials.
    normal = [
        not (proc.is_control(i) or proc.is_unknown(i) or proc.is_byte(i) or pieces[i] in special)
        for i in range(n)
    ]
    if kind == "sp_unigram":
        low = min(s for s, ok in zip(scores, normal) if ok)
        # SentencePiece never matches byte pieces like "<0x41>" against text, but tokenizers'
        # Unigram would (their score 0 is the best possible), turning the literal text "<0x41>"
        # into the byte "A". A very low score keeps Viterbi away from them; byte fallback for
        # uncovered characters does not use these scores.
        vocab = [(p, low - 1000.0 if proc.is_byte(i) else s) for i, (p, s) in enumerate(zip(pieces, scores))]
        model = models.Unigram(vocab, unk_id=proc.unk_id(), byte_fallback=True)
    else:
        # SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the piece
        # with the best score; as a merge list that is: every split of every learned piece into
        # two learned pieces, ranked by the merged piece's score.
        ids = {p: i for i, p in enumerate(pieces) if normal[i]}
        merges = []
        for p, i in ids.items():
            for k in range(1, len(p)):
                a, b = p[:k], p[k:]
                if a in ids and b in ids:
                    merges.append((-scores[i], i, ids[a], ids[b], a, b))
        merges.sort()
        model = models.BPE(
            {p: i for i, p in enumerate(pieces)},
            [(a, b) for *_, a, b in merges],
            unk_token=sp.unk,
            byte_fallback=True,
        )
    tok = _HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", _SPACE)  # SentencePiece's whitespace escaping
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(sp.ordered())  # already in the vocab: they keep their SentencePiece ids
    return tok


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    num_sentinels: int = 100,
    pad_to_multiple: int = 64,
    max_chars: int | None = None,
) -> Tokenizer:
    """Train a tokenizer on streamed ``texts`` and save it (with HF files) to ``out_dir``.

    ``vocab_size`` counts special tokens; the result is padded with reserved tokens up to a
    multiple of ``pad_to_multiple``. ``max_chars`` caps how much text is read. ``min_frequency``
    applies to ``bpe`` only (SentencePiece has no such option).

    A corpus too small for ``vocab_size`` (BPE runs out of pairs to merge) gives a smaller
    vocabulary, not an error: the metadata records ``vocab_shortfall`` and a
    :class:`VocabShortfallWarning` says so (:func:`vocab_shortfall` words it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(KINDS)}")
    if num_sentinels < 0:
        raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    minimum = min_vocab_size(num_sentinels)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the minimum is {minimum} "
            f"({minimum - 256} special tokens + 256 byte tokens)"
        )
    sp = SpecialTokens(num_sentinels=num_sentinels)
    counter = {"chars": 0}
    source_errors: list[BaseException] = []

    def counted() -> Iterator[str]:
        try:
            for t in _capped(texts, max_chars):
                counter["chars"] += len(t)
                yield t
        except Exception as e:  # remembered: sentencepiece re-raises it as a RuntimeError string
            source_errors.append(e)
            raise

    start = time.perf_counter()
    try:
        if kind == "bpe":
            tok, proto = _train_bpe(counted(), vocab_size, min_frequency, sp.ordered())
        else:
            tok, proto = _train_sentencepiece(counted(), kind, vocab_size, sp)
    except Exception:
        if source_errors:  # the text source's own error (e.g. a bad JSONL line) is the one to show
            raise source_errors[0] from None
        if counter["chars"] == 0:
            raise ValueError("no training text: the text iterator was empty") from None
        raise
    seconds = time.perf_counter() - start
    if counter["chars"] == 0:
        raise ValueError("no training text: the text iterator was empty")

    trained = tok.get_vocab_size(with_added_tokens=True)
    reserved = [f"<|reserved_{k}|>" for k in range(-trained % pad_to_multiple)]
    if reserved:
        tok.add_special_tokens(reserved)
    for i, t in enumerate(sp.ordered()):  # cheap guard against a library changing id order
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")

    # Written into a temp dir and renamed into place, so an interrupted save never leaves a
    # half-written tokenizer that a later run would take for a cached one.
    final = Path(out_dir)
    out = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if proto is not None:
        (out / SP_MODEL_FILE).write_bytes(proto)
    _save_hf(tok, out, sp, reserved)
    meta = {
        "format": META_FORMAT,
        "kind": kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "trained_vocab_size": trained,
        "requested_vocab_size": vocab_size,
        "pad_to_multiple": pad_to_multiple,
        "special_tokens": {
            name: {"token": getattr(sp, name), "id": tok.token_to_id(getattr(sp, name))}
            for name in ("pad", "bos", "eos", "unk", "mask")
        },
        "roles": {k: {"token": v, "id": tok.token_to_id(v)} for k, v in sp.roles.items()},
        "num_sentinels": num_sentinels,
        "num_reserved": len(reserved),
        "hf_add_special_tokens": "adds nothing (llmstack inserts BOS/EOS in the data pipeline)",
        "training": {"chars": counter["chars"], "seconds": round(seconds, 3), "min_frequency": min_frequency,
                     "max_chars": max_chars},
        # learned fewer tokens than asked for (the corpus ran out of merges); null when it did not
        "vocab_shortfall": {"requested": vocab_size, "trained": trained} if trained < vocab_size else None,
        "hash": tokenizer_hash(out),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    if message := vocab_shortfall(meta):
        warnings.warn(message, VocabShortfallWarning, stacklevel=2)
    return Tokenizer(final)


def _save_hf(tok, out: Path, sp: SpecialTokens, reserved: list[str]) -> None:
    """Write tokenizer.json and the transformers config files that AutoTokenizer reads.

    transformers rewrites tokenizer.json (it adds a no-op post-processor); that rewritten file is
    the canonical one we hash and load, so an HF load/save cycle leaves the hash unchanged.
    """
    from transformers import PreTrainedTokenizerFast

    file = out / "tokenizer.json"
    tok.save(str(file))
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(file),
        bos_token=sp.bos,
        eos_token=sp.eos,
        pad_token=sp.pad,
        unk_token=sp.unk,
        mask_token=sp.mask,
        additional_special_tokens=[*sp.roles.values(), *sp.sentinels, *reserved],
    )
    hf.chat_template = _chat_template(sp)  # apply_chat_template gives the ids of formats.encode_chat
    hf.save_pretrained(str(out))


def _chat_template(sp: SpecialTokens) -> str:
    from data_pipeline.formats import chat_template

    return chat_template(sp.roles, sp.bos, sp.eos)


def write_chat_template(path: str | os.PathLike) -> bool:
    """Add the llmstack chat template to a tokenizer directory's HF files if it lacks one
    (tokenizers saved before the template existed); True if written. The tokenizer hash
    (tokenizer.json) does not change. Needs the role tokens (formats.chat_tokens checks)."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.formats import chat_tokens

    tok = load_tokenizer(path)
    chat_tokens(tok)
    hf = PreTrainedTokenizerFast.from_pretrained(tok.path)
    if hf.chat_template:
        return False
    names = tok.meta.get("special_tokens") or {}
    default = SpecialTokens()
    roles = {k: v["token"] for k, v in (tok.meta.get("roles") or {}).items()} or default.roles
    bos = names.get("bos", {}).get("token", default.bos)
    eos = names.get("eos", {}).get("token", default.eos)
    from data_pipeline.formats import chat_template

    hf.chat_template = chat_template(roles, bos, eos)
    hf.save_pretrained(tok.path)
    return True

"""The builtin demo corpus: prose that exists on every machine without a network.

The corpus is the docstrings and comments of the running interpreter's standard library. It is
big enough (a few MB) to train a small tokenizer and a tiny language model, and it is
deterministic for a given Python build, which makes it a good fixture for tests and for the
quickstart.

Design choices:
- One document per module (docstrings and comment blocks in source order, joined by blank
  lines), so document boundaries are meaningful for EOS insertion and packing.
- The train/validation split is by module (a stable hash of the module name), so validation
  text is never a near-copy of a training paragraph from the same file.
- Extraction takes seconds, so it is cached as JSONL under ``$LLMSTACK_CACHE/corpus``. The cache
  file is written to a temporary name and renamed with ``os.replace`` (atomic on POSIX), so when
  several ranks start at once each either sees no file or a complete one; racing writers simply
  produce identical content and the last rename wins.

Source specs ``builtin``, ``builtin:train`` and ``builtin:validation`` (sources.py) read the cache
file through the same streaming readers as any JSONL corpus.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sys
import sysconfig
import tempfile
import textwrap
import tokenize
import warnings
from pathlib import Path
from typing import Iterator

# Bump when the extraction logic changes: it is part of the cache key, so old caches are ignored.
EXTRACTOR_VERSION = 1
SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5
MIN_DOC_CHARS = 200

# Any path component with one of these names excludes the file: third-party code and the
# stdlib's own test suites (which are mostly code, fixtures and deliberately odd files).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_dir() -> str:
    """The standard library directory of the running interpreter (patched in tests)."""
    return sysconfig.get_paths()["stdlib"]


def _cache_root() -> Path:
    return Path(os.environ.get("LLMSTACK_CACHE", os.path.expanduser("~/.cache/llmstack")))


def _cache_path(stdlib_dir: str) -> Path:
    major, minor = sys.version_info[:2]
    ident = f"{os.path.realpath(stdlib_dir)}|{sys.version}|{EXTRACTOR_VERSION}"
    key = hashlib.sha1(ident.encode("utf-8")).hexdigest()[:12]
    return _cache_root() / "corpus" / f"stdlib-py{major}{minor}-{key}.jsonl"


def _module_files(stdlib_dir: str) -> list[tuple[str, str]]:
    """(module name, file path) for every stdlib ``.py`` file we use, sorted by module name."""
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        # Prune in place so os.walk never descends into site-packages or test suites.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.join(dirpath, name))
    modules = []
    for path in out:
        rel = Path(os.path.relpath(path, stdlib_dir)).with_suffix("").parts
        # Names that are not identifiers (e.g. config-3.11-x86_64-linux-gnu/python-config.py)
        # are build scripts, not importable modules.
        if not all(p.isidentifier() for p in rel):
            continue
        if rel[-1] == "__init__":
            rel = rel[:-1]
        if rel:
            modules.append((".".join(rel), path))
    return sorted(modules)


def _comment_blocks(source: bytes) -> list[tuple[int, str]]:
    """Runs of comments on consecutive lines as (first line, text with '#' stripped)."""
    blocks: list[tuple[int, list[str]]] = []
    last_row = -2
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row = tok.start[0]
        body = tok.string.lstrip("#").rstrip()
        # Shebang and encoding cookies are machinery, not prose.
        if row <= 2 and (tok.string.startswith("#!") or "coding" in tok.string):
            continue
        if row == last_row + 1 and blocks:
            blocks[-1][1].append(body)
        else:
            blocks.append((row, [body]))
        last_row = row
    out = []
    for row, lines in blocks:
        # dedent keeps the relative indentation of code or lists written inside comments.
        text = textwrap.dedent("\n".join(lines)).strip()
        if text:
            out.append((row, text))
    return out


def _docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append((node.body[0].lineno, doc.strip()))
    return out


def extract_module_text(path: str) -> str | None:
    """Docstrings and comment blocks of one Python file in source order.

    None when the file does not parse or is a generated codec table.
    """
    try:
        source = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source, filename=path)
        pieces = _docstrings(tree) + _comment_blocks(source)
    except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError, OSError):
        return None
    module_doc = ast.get_docstring(tree) or ""
    if "gencodec.py" in module_doc:
        # encodings/cp*.py etc. are machine-generated code tables ("0x41 -> LATIN CAPITAL
        # LETTER A" comments): a fifth of all the text but no prose, so they are left out.
        return None
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in pieces)


def _extract_all(stdlib_dir: str) -> list[dict]:
    # Single process on purpose: the whole stdlib takes a few seconds, and a pool's start-up
    # plus pickling of results gave no clear win on the 2-core machines this runs on.
    docs = []
    for module, path in _module_files(stdlib_dir):
        text = extract_module_text(path)
        if text is not None and len(text) >= MIN_DOC_CHARS:
            docs.append({"module": module, "text": text})
    return docs


def _ensure_cache() -> Path:
    stdlib_dir = _stdlib_dir()
    path = _cache_path(stdlib_dir)
    if path.exists():
        return path
    docs = _extract_all(stdlib_dir)
    return write_jsonl_atomic(path, docs)


def write_jsonl_atomic(path: Path, rows) -> Path:
    """Write `rows` as JSONL to a temp file beside `path`, then rename it into place: a reader (or a
    concurrent writer) sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def split_of(module: str) -> str:
    """'validation' for about 5% of module names (stable sha1 hash), else 'train'."""
    h = int(hashlib.sha1(module.encode("utf-8")).hexdigest(), 16)
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def ensure_cache() -> Path:
    """Path of the cached corpus JSONL (both splits, module order), extracting it if needed."""
    return _ensure_cache()


def check_split(split: str) -> None:
    """Raise ValueError naming the allowed splits when `split` is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def builtin_documents(split: str = "train") -> Iterator[dict]:
    """Yield ``{"module", "text"}`` documents of the stdlib corpus for ``split``, in module order."""
    check_split(split)
    path = _ensure_cache()

    def gen() -> Iterator[dict]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if split_of(doc["module"]) == split:
                    yield doc

    return gen()


def builtin_texts(split: str = "train") -> Iterator[str]:
    """Yield just the texts of :func:`builtin_documents`."""
    return (doc["text"] for doc in builtin_documents(split))


def corpus_stats(split: str = "train") -> dict:
    """Document, character and UTF-8 byte counts of one split of the builtin corpus."""
    docs = chars = nbytes = 0
    for text in builtin_texts(split):
        docs += 1
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
    return {"split": split, "documents": docs, "characters": chars, "bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# SFT demo pairs: "What does `json.dumps` do?" -> the first paragraph of its docstring
# ---------------------------------------------------------------------------------------------

SFT_PAIRS_VERSION = 1
_PAIR_MIN_CHARS, _PAIR_MAX_CHARS = 24, 400


def _first_paragraph(doc: str) -> str | None:
    """The first paragraph of a docstring as one line, or None if unusable as an answer
    (too short or long, or a signature line such as "dumps(obj) -> str")."""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(para.split())
    if not (_PAIR_MIN_CHARS <= len(text) <= _PAIR_MAX_CHARS) or "->" in text.split(".", 1)[0]:
        return None
    return text


def _module_pairs(module: str, path: str) -> list[dict]:
    """Instruction pairs of a module's public functions, classes and methods, in source order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return []
    out = []

    def add(node, qualname: str) -> None:
        answer = _first_paragraph(ast.get_docstring(node, clean=True) or "")
        if answer is None:
            return
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        question = f"What is `{module}.{qualname}`?" if kind == "class" else f"What does `{module}.{qualname}` do?"
        out.append({"module": module, "name": qualname, "kind": kind, "prompt": question, "response": answer})

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            add(node, node.name)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and not sub.name.startswith("_"):
                        add(sub, f"{node.name}.{sub.name}")
    return out


def _sft_cache_path(stdlib_dir: str) -> Path:
    return _cache_path(stdlib_dir).with_name(_cache_path(stdlib_dir).stem + f"-sft{SFT_PAIRS_VERSION}.jsonl")


def ensure_sft_cache() -> Path:
    """Path of the cached demo pairs (both splits, module order), extracting them if needed.

    Public modules only (no path component starting with "_"); written atomically like the corpus.
    """
    stdlib_dir = _stdlib_dir()
    path = _sft_cache_path(stdlib_dir)
    if path.exists():
        return path
    pairs = [p for module, file in _module_files(stdlib_dir)
             if not any(part.startswith("_") for part in module.split("."))
             for p in _module_pairs(module, file)]
    return write_jsonl_atomic(path, pairs)


def builtin_sft_pairs(split: str = "train") -> Iterator[dict]:
    """Demo instruction pairs ``{"module", "name", "kind", "prompt", "response"}`` of one split.

    The split is the corpus's split by module (split_of), so validation questions are about
    modules whose docstrings the pretraining corpus's train split never contained.
    """
    check_split(split)
    path = ensure_sft_cache()
    with open(path, encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            if split_of(pair["module"]) == split:
                yield pair


# --- preference pairs and PPO prompts ---
# Demo preference pairs, derived from the SFT demo pairs: chosen = the true docstring summary,
# rejected = one of four kinds, in the repeating order PREF_CYCLE (3/8 shuffled, 2/8 truncated,
# 2/8 repeated, 1/8 other). The corruptions are the failure modes of sampled text (incoherent
# order, stopping early, degenerate repetition) that a reward model should teach a policy to avoid;
# "other" asks it to match the answer to the question, which a tiny model learns only partly.
#   other      the summary of another object of the other sort (a class's summary for a question about
#              a function and vice versa): fluent, but not an answer to this question
#   shuffled   the true summary's words in a random order
#   truncated  the true summary cut after about half of its words
#   repeated   the true summary with one of its words repeated in place of the rest (degenerate text)
# Deterministic: the random choices of pair i are seeded by (split, i).

PREF_KINDS = ("other", "shuffled", "truncated", "repeated")
PREF_CYCLE = ("shuffled", "truncated", "repeated", "shuffled", "other", "truncated", "repeated", "shuffled")


def _rejected(pairs: list[dict], i: int, kind: str, rng, by_sort: dict[str, list[int]]) -> str:
    text = pairs[i]["response"]
    words = text.split()
    if kind == "other":
        others = [j for s, js in by_sort.items() if s != pairs[i]["kind"] for j in js] or range(len(pairs))
        j = others[rng.randrange(len(others))]
        while pairs[j]["response"] == text:
            j = others[(others.index(j) + 1) % len(others)]
        return pairs[j]["response"]
    if len(words) < 3:  # too short to corrupt recognisably
        return text + " " + text
    if kind == "shuffled":
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    if kind == "truncated":
        return " ".join(words[: max(1, len(words) // 2)])
    keep = max(1, len(words) // 3)
    return " ".join(words[:keep] + [words[rng.randrange(keep)]] * (len(words) - keep))


def builtin_preference_pairs(split: str = "train") -> Iterator[dict]:
    """Demo preference pairs ``{"prompt", "chosen", "rejected", "kind", "module", "name"}`` of one split."""
    import random

    check_split(split)
    pairs = list(builtin_sft_pairs(split))
    by_sort: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_sort.setdefault(p["kind"], []).append(i)
    for i, p in enumerate(pairs):
        kind = PREF_CYCLE[i % len(PREF_CYCLE)]
        rng = random.Random(f"{split}:{i}")
        yield {"prompt": p["prompt"], "chosen": p["response"], "rejected": _rejected(pairs, i, kind, rng, by_sort),
               "kind": kind, "module": p["module"], "name": p["name"]}


# --- a verifiable task: small arithmetic ---
# "What is 3 + 4?" -> "7": every sum, difference and product of two single-digit numbers (300) and every
# chain of three single-digit numbers joined by + and - (4,000). A tiny model can learn these, and the
# answer is checked exactly (llmstack.rlhf.verifiers.numeric_answer), which makes it the demo task of
# critic-free RL on verifiable rewards. The split is by a stable hash of the expression (about 5% to
# validation), so validation questions never occur in train; the order is a fixed shuffle, so the two
# kinds of question are mixed. Records carry `answer` (the reference a verifier reads) and the same text
# as `response`, so the task is also an SFT source for a warm start.

ARITH_VALIDATION_PERCENT = 5


def _arith_expressions() -> list[tuple[str, int]]:
    digits = range(10)
    out = [(f"{a} {op} {b}", fn(a, b)) for op, fn in (("+", int.__add__), ("-", int.__sub__), ("*", int.__mul__))
           for a in digits for b in digits]
    for a in digits:
        for op1 in "+-":
            for b in digits:
                for op2 in "+-":
                    for c in digits:
                        ab = a + b if op1 == "+" else a - b
                        out.append((f"{a} {op1} {b} {op2} {c}", ab + c if op2 == "+" else ab - c))
    return out


def arith_split_of(expression: str) -> str:
    """The split of an arithmetic question: a stable hash of its expression, not Python's salted hash()."""
    h = int.from_bytes(hashlib.sha1(expression.encode("utf-8")).digest()[:4], "big")
    return "validation" if h % 100 < ARITH_VALIDATION_PERCENT else "train"


def builtin_arith_tasks(split: str = "train") -> Iterator[dict]:
    """Arithmetic questions ``{"prompt", "answer", "response", "expression"}`` of one split, in a fixed order.

    ``answer`` is the integer result as a string ("-4"); train has 4,050 records (285 of them two-number
    questions), validation 250.
    """
    import random

    check_split(split)
    items = [(e, v) for e, v in _arith_expressions() if arith_split_of(e) == split]
    random.Random(f"builtin-arith:{split}").shuffle(items)  # str seeds hash with sha512: stable across versions
    for expression, value in items:
        yield {"prompt": f"What is {expression}?", "answer": str(value), "response": str(value),
               "expression": expression}

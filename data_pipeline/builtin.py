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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
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

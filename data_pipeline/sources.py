"""Document sources: local files and globs, Hugging Face datasets, token shards, the builtin corpus.

A source spec (``data.sources[].path``) resolves once, in the launching process, to an ordered
list of *units* (files, or one dataset). A unit yields raw records lazily from a position and
decodes one record into a document (text, or token ids for shards) only when asked, so a loader
worker can walk past records it does not own without paying for UTF-8 decoding, JSON parsing or
tokenization. Memory is one read buffer per open unit, whatever the corpus size.

Spec forms:
- ``builtin`` / ``builtin:train`` / ``builtin:validation``: the stdlib corpus (builtin.py).
- a file or a glob (sorted) of ``.txt`` (one document per file; a file over 2 * PART_BYTES is split
  at line starts into documents of 1-2 PART_BYTES, see :class:`TextFile`), ``.jsonl``,
  ``.jsonl.gz``, ``.jsonl.zst`` (field ``text_field`` of each line), ``.parquet`` (column
  ``text_field``).
- a directory written by ``llmstack data prepare`` (token shards, see shards.py).
- ``hf:NAME[:CONFIG]:SPLIT``: a Hugging Face dataset in streaming mode (``NAME`` may be a local
  directory of data files); ``hf:DIR[:SPLIT]`` or a bare ``DIR``: a dataset saved with
  ``save_to_disk``.

Two kinds of unit, by whether a reader can jump to a position:
- seekable (plain .jsonl lines and .txt parts by byte offset, builtin, save_to_disk datasets by
  row, shards by document): the stream layer gives every stream its own contiguous region and
  each stream seeks straight to it, so nothing is read twice and resuming is a seek.
- sequential (.jsonl.gz, .jsonl.zst, .parquet, HF streaming): readable only front to back, so
  records are dealt round-robin to streams by line/row index and each loader worker reads the
  unit once, decoding only the records its streams own. Resuming skips lines without decoding.

Bad input never raises a traceback and is never silent: a bad record raises :class:`BadRecord`
from ``decode`` and a file-level problem (empty file, truncated or corrupt compressed stream,
unreadable file, missing column) raises :class:`FileFault` at the position where reading
stopped, after every readable record has been yielded. The caller either counts it in an
:class:`ErrorLog` (``on_error=skip``) or raises :class:`DataError` naming file and line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_pipeline import builtin
from data_pipeline.builtin import builtin_documents, builtin_texts, corpus_stats, split_of  # noqa: F401 (re-exported)
from data_pipeline.errors import (  # noqa: F401 (re-exported: the data layer's error vocabulary)
    ERROR_KINDS, BadRecord, DataError, ErrorLog, FileFault, line_at, location)

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_GLOB_CHARS = set("*?[")
_CHUNK = 1 << 20
PART_BYTES = 1 << 16  # a .txt file is one document up to twice this size, else parts of 1-2x this
# A JSONL line longer than this is not read into memory: it is skipped and counted (too_long), or
# stops the run with on_error=fail. A real document is far smaller; a file without newlines (a
# binary or a one-line dump) would otherwise be held whole, then parsed and tokenized as one.
MAX_RECORD_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_json_line(raw: bytes, text_field: str) -> str:
    """The text of one JSONL line; BadRecord for invalid UTF-8, bad JSON, a missing field, or a
    line over the record size cap (read as a BadRecord, see :func:`_split_lines`)."""
    if isinstance(raw, BadRecord):
        raise raw
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord("malformed_json", f"not valid JSON ({e.msg})") from None
    return text_of(record, text_field)


def text_of(record: Any, text_field: str) -> str:
    """Field ``text_field`` of a record (dict or a bare value) as a non-empty string."""
    if isinstance(record, dict):
        if text_field not in record:
            raise BadRecord("missing_field", f"record has no field {text_field!r}")
        record = record[text_field]
    if not isinstance(record, str):
        raise BadRecord("missing_field", f"field {text_field!r} is {type(record).__name__}, not a string")
    if not record:
        raise BadRecord("empty_text", f"field {text_field!r} is empty")
    return record


# ---------------------------------------------------------------------------------------------
# Units


@dataclass
class Unit:
    """One file (or dataset) of a source. ``loc`` names what a position counts (for reports)."""

    path: str
    text_field: str = "text"
    size: int = 0  # seekable units: positions run over [0, size)
    max_record_bytes: int = MAX_RECORD_BYTES  # JSONL lines: longer ones are bad records (too_long)

    seekable = True
    loc = "byte"

    def records(self, start: int = 0, end: int | None = None, first: bool = True) -> Iterator[tuple[int, Any]]:
        """(position, raw record) for records at positions >= start (and < end if seekable).

        ``first``: this reader owns position 0, so it (alone) reports an empty unit.
        """
        raise NotImplementedError

    def decode(self, raw: Any):
        """The document of a raw record (str, or token ids), None for a record that is not part
        of this source (silently passed over), or BadRecord."""
        raise NotImplementedError

    def ident(self) -> list:
        """What identifies this unit's content in a data fingerprint."""
        return [type(self).__name__, self.path, self.size]


def _split_lines(chunks: Iterator[bytes], start_pos: int, by_line: bool,
                 max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | BadRecord]]:
    """Lines of a byte stream with their position (byte offset, or line index if by_line).

    Blank lines are skipped but still advance the position. A line longer than ``max_bytes`` is
    not kept: a BadRecord ("too_long") stands in its place. Time is linear in the input: each
    chunk is split once, and a line spanning chunks is kept as a list of pieces joined once it
    ends (appending each chunk to one growing buffer and splitting it again was quadratic in the
    length of a line). If ``chunks`` raises FileFault (a truncated stream), the partial line is
    dropped and the fault is re-raised at its position.
    """
    pos = start_pos
    parts: list[bytes] = []  # pieces of the line not yet ended (empty once it is too long)
    size = 0  # bytes of that line so far

    def ended(tail: bytes):
        if size > max_bytes:
            return BadRecord("too_long", f"line of {size:,} bytes is longer than the record size limit "
                                         f"(data.max_record_bytes={max_bytes:,})")
        line = b"".join(parts) + tail if parts else tail
        return line if line.strip() else None

    try:
        for chunk in chunks:
            lines = chunk.split(b"\n")
            for line in lines[:-1]:  # each ends the line in progress
                size += len(line)
                got = ended(line)
                if got is not None:
                    yield pos, got
                pos += 1 if by_line else size + 1
                parts, size = [], 0
            tail = lines[-1]
            size += len(tail)
            if size <= max_bytes:
                parts.append(tail)
            else:
                parts = []
    except FileFault as e:
        raise FileFault(e.kind, pos, e.detail) from None
    if size:
        got = ended(b"")
        if got is not None:
            yield pos, got


@dataclass
class TextFile(Unit):
    """A .txt file. Up to 2 * PART_BYTES it is one document; a larger file is R = size //
    PART_BYTES documents (parts): part k starts at the first line start at or after byte
    k * size // R. A part belongs to the region it starts in, like a .jsonl line, so a big file
    spreads over the streams (one document per file would give it whole to one stream per
    epoch, and every stream would walk the same text), memory is one part, and a resume re-reads
    at most one part. The cuts depend only on the file's bytes."""

    def _parts(self) -> int:
        return max(1, self.size // PART_BYTES)

    def _start_of(self, f, k: int) -> int:
        """Byte where part k starts: the first line start at or after k * size // R (a file
        with no newline within PART_BYTES of that point is cut at a UTF-8 character start)."""
        x = k * self.size // self._parts()
        if x <= 0 or x >= self.size:
            return max(0, min(x, self.size))
        f.seek(x - 1)
        head, n = b"", 0
        while n <= PART_BYTES:  # lines are short: read a little at a time
            chunk = f.read(4096)
            if not chunk:
                return self.size
            i = chunk.find(b"\n")
            if i >= 0:
                return x + n + i
            head, n = head or chunk[:5], n + len(chunk)
        i = 1
        while i < min(len(head), 5) and head[i] & 0xC0 == 0x80:
            i += 1
        return x - 1 + i

    def records(self, start=0, end=None, first=True):
        end = self.size if end is None else min(end, self.size)
        found, R = False, self._parts()
        try:
            with open(self.path, "rb") as f:
                k = max(0, min(R, start * R // max(self.size, 1)) - 1)
                a = self._start_of(f, k)
                while k < R and a < start:  # the first part that starts at or after `start`
                    k, a = k + 1, self._start_of(f, k + 1)
                while k < R and a < end:
                    b = self._start_of(f, k + 1)
                    if b > a:
                        f.seek(a)
                        data = f.read(b - a)
                        if R > 1 or data.strip():  # a blank part is counted (empty_text); a blank file is empty_file
                            found = True
                            yield a, (a, data)
                    k, a = k + 1, b
        except OSError as e:
            raise FileFault("unreadable", start, f"cannot read: {e.strerror or e}") from None
        if first and not found and start == 0 and not _has_text(self.path):
            raise FileFault("empty_file", 0, "file has no text")

    def decode(self, raw):
        pos, data = raw
        if not data.strip():
            raise BadRecord("empty_text", "only whitespace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"invalid UTF-8 at byte {pos + e.start}") from None


def _has_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                if chunk.strip():
                    return True
    except OSError as e:  # e.g. permission denied: the file is unreadable, not empty
        raise FileFault("unreadable", 0, f"cannot read: {e.strerror or e}") from None
    return False


def _rest_of_line(f) -> int:
    """Bytes from the file position to just past the next newline (or to the end), read in
    chunks: ``readline`` would hold a whole over-long line in memory."""
    n = 0
    while chunk := f.read(1 << 16):
        i = chunk.find(b"\n")
        if i >= 0:
            return n + i + 1
        n += len(chunk)
    return n


@dataclass
class PlainFile(Unit):
    """Uncompressed .jsonl (one record per line)."""

    def records(self, start=0, end=None, first=True):
        end = self.size if end is None else min(end, self.size)
        found = False
        try:
            if start < end:
                with open(self.path, "rb") as f:
                    if start > 0:  # a line that began in the previous region belongs to it
                        f.seek(start - 1)
                        if f.read(1) != b"\n":
                            start += _rest_of_line(f)
                    f.seek(start)

                    def chunks():  # small reads: one buffer per stream, and streams are many
                        while chunk := f.read(1 << 16):
                            yield chunk

                    for pos, line in _split_lines(chunks(), start, by_line=False, max_bytes=self.max_record_bytes):
                        if pos >= end:
                            break
                        found = True
                        yield pos, line
        except OSError as e:
            raise FileFault("unreadable", start, f"cannot read: {e.strerror or e}") from None
        if first and not found and start == 0 and not _has_text(self.path):
            raise FileFault("empty_file", 0, "file has no records")

    def decode(self, raw):
        return decode_json_line(raw, self.text_field)


@dataclass
class BuiltinFile(PlainFile):
    """The builtin corpus cache (JSONL of both splits in module order), filtered to one split."""

    split: str = "train"

    def decode(self, raw):
        record = json.loads(raw)
        # looked up on the module at call time, so tests can patch builtin.split_of
        return record["text"] if builtin.split_of(record["module"]) == self.split else None

    def ident(self) -> list:
        return ["builtin", self.split, self.size]


def _decompressed(path: str) -> Iterator[bytes]:
    """Decompressed bytes of a .gz or .zst file (all members/frames); FileFault if it ends early."""
    if path.endswith(".gz"):
        def make():
            return zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        errors: tuple = (zlib.error,)
    else:
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        make, errors = dctx.decompressobj, (zstandard.ZstdError,)
    with open(path, "rb") as f:
        d, pending = make(), False
        while data := f.read(_CHUNK):
            while data:
                try:
                    out = d.decompress(data)
                except errors as e:
                    raise FileFault("corrupt", 0, f"corrupt compressed data ({e})") from None
                pending = True
                if out:
                    yield out
                if not d.eof:
                    break
                # a member/frame ended; whatever follows is the next one (concatenated files)
                data, d, pending = d.unused_data, make(), False
        if pending:
            raise FileFault("truncated", 0, "compressed stream ends early (truncated file)")


@dataclass
class CompressedFile(Unit):
    """.jsonl.gz / .jsonl.zst: sequential, positions are line indices."""

    seekable = False
    loc = "line"

    def records(self, start=0, end=None, first=True):
        found = False
        try:
            for pos, line in _split_lines(_decompressed(self.path), 0, by_line=True, max_bytes=self.max_record_bytes):
                found = True
                if pos >= start:
                    yield pos, line
        except OSError as e:
            raise FileFault("unreadable", start, f"cannot read: {e.strerror or e}") from None
        if not found:
            raise FileFault("empty_file", 0, "file has no records")

    def decode(self, raw):
        return decode_json_line(raw, self.text_field)


@dataclass
class ParquetFile(Unit):
    """.parquet: sequential by row (row groups are skipped via metadata when resuming)."""

    seekable = False
    loc = "row"

    def records(self, start=0, end=None, first=True):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise FileFault("unreadable", 0, f"not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise FileFault("missing_field", 0, f"no column {self.text_field!r} (columns: {', '.join(names)})")
        row, groups = 0, []
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start:
                groups.append(g)
            else:
                row += n
        if pf.metadata.num_rows == 0:
            raise FileFault("empty_file", 0, "file has no rows")
        try:
            for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=[self.text_field]):
                for value in batch.column(0).to_pylist():
                    if row >= start:
                        yield row, value
                    row += 1
        except Exception as e:
            raise FileFault("unreadable", row, f"read failed ({e})") from None

    def decode(self, raw):
        return text_of(raw, self.text_field)


@dataclass
class HFStreaming(Unit):
    """``hf:NAME[:CONFIG]:SPLIT`` read with ``datasets.load_dataset(..., streaming=True)``."""

    config: str | None = None
    split: str = "train"

    seekable = False
    loc = "example"

    def open(self):
        from datasets import load_dataset

        return load_dataset(self.path, self.config, split=self.split, streaming=True)

    def records(self, start=0, end=None, first=True):
        ds = self.open()
        pos = start
        try:
            for pos, example in enumerate(ds.skip(start) if start else ds, start=start):
                yield pos, example
        except Exception as e:  # the library's own reading errors: count them, keep going
            raise FileFault("unreadable", pos, f"dataset read failed ({type(e).__name__}: {e})") from None

    def decode(self, raw):
        return text_of(raw, self.text_field)

    def ident(self) -> list:
        return ["hf", self.path, self.config, self.split]


@dataclass
class HFDisk(Unit):
    """A dataset saved with ``save_to_disk`` (memory-mapped Arrow): seekable by row."""

    split: str | None = None

    loc = "row"

    def open(self):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(self.path)
        if isinstance(ds, DatasetDict):
            if self.split not in ds:
                raise DataError(f"{self.path} holds splits {', '.join(ds)}; name one as hf:{self.path}:SPLIT")
            ds = ds[self.split]
        if self.text_field not in ds.column_names:
            raise DataError(f"{self.path} has no column {self.text_field!r} (columns: {', '.join(ds.column_names)})")
        return ds.select_columns([self.text_field])

    def records(self, start=0, end=None, first=True):
        ds = self.open()
        end = len(ds) if end is None else min(end, len(ds))
        if first and start == 0 and len(ds) == 0:
            raise FileFault("empty_file", 0, "dataset has no rows")
        for a in range(start, end, 1024):
            for k, value in enumerate(ds[a:min(a + 1024, end)][self.text_field]):
                yield a + k, value

    def decode(self, raw):
        return text_of(raw, self.text_field)


# ---------------------------------------------------------------------------------------------
# Resolution: spec -> units


@dataclass
class Source:
    """A resolved source: its spec, mixing weight, and units in a fixed order."""

    spec: str
    weight: float = 1.0
    text_field: str = "text"
    units: list[Unit] = field(default_factory=list)

    def ident(self) -> list:
        return [self.spec, self.weight, self.text_field, [u.ident() for u in self.units]]


def _file_unit(path: str, text_field: str) -> Unit:
    size = os.path.getsize(path)
    if path.endswith(".txt"):
        return TextFile(path, text_field, size)
    if path.endswith(".jsonl"):
        return PlainFile(path, text_field, size)
    if path.endswith((".jsonl.gz", ".jsonl.zst")):
        return CompressedFile(path, text_field, size)
    if path.endswith(".parquet"):
        return ParquetFile(path, text_field, size)
    raise DataError(f"unsupported file type: {path} (supported: {', '.join(FILE_SUFFIXES)}, a shards "
                    "directory, hf:NAME[:CONFIG]:SPLIT, builtin)")


def _listdir(d: str) -> list[str]:
    """Names in directory d (none if it does not exist); DataError if it cannot be listed."""
    try:
        return sorted(os.listdir(d or "."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise DataError(f"cannot list directory {d or '.'}: {e.strerror or e}") from None


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: the directory itself
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _expand(d: str, segs: list[str], inside: frozenset) -> Iterator[str]:
    """Paths under directory d matching the pattern segments (glob rules: wildcards do not
    match names starting with a dot unless the segment does; ``**`` spans zero or more
    directories). ``inside``: the directories on the way here; ``**`` does not enter one of
    them again (a symlink loop)."""
    if not segs:
        yield d
        return
    seg, rest = segs[0], segs[1:]
    if seg == "**":
        key = _dir_key(d or ".")
        inside = inside | {key} if key else inside
        if rest:
            yield from _expand(d, rest, inside)  # zero directories
        for name in _listdir(d):
            if name.startswith("."):
                continue
            p = os.path.join(d, name)
            if os.path.isdir(p):
                key = _dir_key(p)
                if key is not None and key not in inside:
                    yield from _expand(p, segs, inside | {key})
            elif not rest:
                yield p
    elif not any(c in _GLOB_CHARS for c in seg):
        p = os.path.join(d, seg) if d else seg
        if os.path.lexists(p):
            yield from _expand(p, rest, inside)
    else:
        for name in _listdir(d):
            if fnmatch.fnmatchcase(name, seg) and (seg.startswith(".") or not name.startswith(".")):
                yield from _expand(os.path.join(d, name) if d else name, rest, inside)


def glob_files(pattern: str) -> list[str]:
    """The files a glob matches (``**`` spans directories), sorted, each real file once.

    Unlike ``glob.glob``, a directory on the way that cannot be listed is an error (DataError)
    rather than silently passed over, ``**`` does not follow a symlink back into a directory it
    is already inside (a loop made ``glob.glob`` list one file ~40 times, once per level until
    the path got too long), and a file reached by several paths (symlinks) is listed once,
    under the first of them in sorted order.
    """
    segs = pattern.split(os.sep)
    root = ""
    if pattern.startswith(os.sep):
        root, segs = os.sep, segs[1:]
    root_key = _dir_key(root or ".")
    found = sorted(p for p in _expand(root, [x for x in segs if x], frozenset([root_key] if root_key else []))
                   if os.path.isfile(p))
    seen, out = set(), []
    for p in found:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def _is_hf_disk(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _hf_units(rest: str, text_field: str) -> list[Unit]:
    parts = rest.split(":")
    if os.path.isdir(parts[0]) and _is_hf_disk(parts[0]):
        unit = HFDisk(parts[0], text_field, split=parts[1] if len(parts) > 1 else None)
        try:
            unit.size = len(unit.open())
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"hf:{rest}: cannot load the saved dataset ({e})") from None
        return [unit]
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"hf:{rest}: expected hf:NAME[:CONFIG]:SPLIT or hf:DIR[:SPLIT] (a save_to_disk directory)")
    unit = HFStreaming(parts[0], text_field, config=parts[1] if len(parts) == 3 else None, split=parts[-1])
    try:
        unit.open()  # resolves data files now, so a wrong name fails here with one message
    except Exception as e:
        raise DataError(f"hf:{rest}: cannot open the dataset ({type(e).__name__}: {e})") from None
    return [unit]


def resolve_source(path: str, text_field: str = "text", weight: float = 1.0,
                   tokenizer_hash: str | None = None, max_record_bytes: int = MAX_RECORD_BYTES) -> Source:
    """Resolve a spec to a :class:`Source` (files listed and sized now, read later).

    ``tokenizer_hash``: shards made with another tokenizer are refused (DataError). Missing files
    raise FileNotFoundError; other bad specs raise DataError. ``max_record_bytes``: JSONL lines
    longer than this are bad records (too_long).
    """
    from data_pipeline import shards

    if path == "builtin" or path.startswith("builtin:"):
        split = path.partition(":")[2] or "train"
        builtin.check_split(split)
        cache = str(builtin.ensure_cache())
        units: list[Unit] = [BuiltinFile(cache, "text", os.path.getsize(cache), split=split)]
    elif path.startswith("hf:"):
        units = _hf_units(path[3:], text_field)
    elif os.path.isdir(path):
        if shards.is_shard_dir(path):
            units = shards.shard_units(path, tokenizer_hash)
        elif _is_hf_disk(path):
            units = _hf_units(path, text_field)
        else:
            raise DataError(f"{path} is a directory but neither token shards (manifest.json) nor a saved dataset")
    elif any(c in _GLOB_CHARS for c in path):
        files = glob_files(path)
        if not files:
            raise FileNotFoundError(f"no files match {path}")
        units = [_file_unit(f, text_field) for f in files]
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path}")
        units = [_file_unit(path, text_field)]
    for unit in units:
        unit.max_record_bytes = max_record_bytes
    return Source(path, weight, text_field, units)


def iter_documents(source: Source, on_error: str = "fail", errors: ErrorLog | None = None) -> Iterator[Any]:
    """Every document of a source in unit order (text, or token ids for shards), one pass.

    Bad input is counted in ``errors``; with on_error="fail" it raises DataError naming the file
    and line instead (an empty text is always just counted).
    """
    for unit in source.units:
        try:
            for pos, raw in unit.records(0):
                try:
                    doc = unit.decode(raw)
                except BadRecord as e:
                    if on_error == "fail" and e.kind != "empty_text":
                        raise DataError(f"{location(unit.path, unit.loc, pos)}: {e.detail}") from None
                    if errors is not None:
                        errors.add(unit.path, unit.loc, pos, e.kind, e.detail)
                    continue
                if doc is not None:
                    yield doc
        except FileFault as e:
            if on_error == "fail":
                raise DataError(f"{location(unit.path, unit.loc, e.pos)}: {e.detail}") from None
            if errors is not None:
                errors.add(unit.path, unit.loc, e.pos, e.kind, e.detail)


def iter_texts(path: str, text_field: str = "text") -> Iterator[str]:
    """Stream document texts of a source spec, stopping with DataError at the first bad record.

    Used where the whole text is wanted once (tokenizer training, perplexity). Raises
    FileNotFoundError for a missing file or a glob matching nothing, ValueError for a bad spec.
    """
    source = resolve_source(path, text_field)
    return iter_documents(source, on_error="fail")

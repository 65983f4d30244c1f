"""Bad input: the exceptions that describe it and the log that counts it.

Readers (sources.py) raise :class:`BadRecord` for one unusable record and :class:`FileFault`
when a unit cannot be read past a position; the caller either counts them in an
:class:`ErrorLog` (``on_error=skip``) or raises :class:`DataError` naming file and line.
"""

from __future__ import annotations

_CHUNK = 1 << 20
ERROR_KINDS = ("invalid_utf8", "malformed_json", "missing_field", "empty_text", "empty_file",
               "truncated", "corrupt", "unreadable", "too_long")  # empty_text is skipped but never stops a run


class DataError(ValueError):
    """Unusable data: a bad record with on_error=fail, a missing source, a foreign shard."""


class BadRecord(Exception):
    """One record that is not a usable document (raised by ``Unit.decode``)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


class FileFault(Exception):
    """A unit could not be read past position ``pos`` (raised by ``Unit.records``)."""

    def __init__(self, kind: str, pos: int, detail: str):
        super().__init__(detail)
        self.kind, self.pos, self.detail = kind, pos, detail


def line_at(path: str, offset: int) -> int:
    """1-based line number of byte ``offset`` of a plain file (counts newlines before it)."""
    n = 0
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(_CHUNK, offset))
            if not chunk:
                break
            n += chunk.count(b"\n")
            offset -= len(chunk)
    return n + 1


def location(path: str, loc: str, pos: int) -> str:
    """Human form of a record position: ``file:line`` for text files, ``file (row N)`` otherwise.

    Seekable readers record byte offsets (they never count lines); the line number is computed
    here, only for the few locations a report shows.
    """
    if loc == "byte":
        try:
            return f"{path}:{line_at(path, pos)}"
        except OSError:  # unreadable (permission denied): the byte offset is all there is
            return f"{path} (byte {pos})"
    if loc == "line":
        return f"{path}:{pos + 1}"
    return f"{path} ({loc} {pos})"


class ErrorLog:
    """Skipped input per file: counts by kind and the first few locations.

    Each record belongs to exactly one stream, so logs of different readers add up without
    double counting; ``merge`` combines them (e.g. across loader workers and ranks).
    """

    MAX_LOCATIONS = 5

    def __init__(self):
        self.files: dict[str, dict] = {}

    def add(self, path: str, loc: str, pos: int, kind: str, detail: str) -> None:
        entry = self.files.setdefault(path, {"counts": {}, "first": []})
        entry["counts"][kind] = entry["counts"].get(kind, 0) + 1
        first = entry["first"]
        if len(first) < self.MAX_LOCATIONS or pos < first[-1][1]:
            first.append([loc, pos, kind, detail])
            first.sort(key=lambda x: x[1])
            del first[self.MAX_LOCATIONS:]

    def merge(self, other: dict | ErrorLog) -> None:
        """Add another log (or its ``to_dict()``) into this one."""
        files = other.files if isinstance(other, ErrorLog) else other
        for path, entry in files.items():
            mine = self.files.setdefault(path, {"counts": {}, "first": []})
            for kind, n in entry["counts"].items():
                mine["counts"][kind] = mine["counts"].get(kind, 0) + n
            mine["first"] = sorted(mine["first"] + [list(x) for x in entry["first"]], key=lambda x: x[1])
            del mine["first"][self.MAX_LOCATIONS:]

    @property
    def total(self) -> int:
        return sum(sum(e["counts"].values()) for e in self.files.values())

    def counts(self) -> dict[str, dict[str, int]]:
        """{file: {kind: count}}."""
        return {p: dict(e["counts"]) for p, e in self.files.items()}

    def to_dict(self) -> dict:
        return {p: {"counts": dict(e["counts"]), "first": [list(x) for x in e["first"]]} for p, e in self.files.items()}

    def report(self) -> list[str]:
        """One line per file: what was skipped and where it started."""
        lines = []
        for path, e in sorted(self.files.items()):
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(e["counts"].items()))
            where = "; ".join(f"{location(path, loc, pos)}: {detail}" for loc, pos, _, detail in e["first"])
            lines.append(f"{path}: skipped {sum(e['counts'].values())} ({kinds}); first: {where}")
        return lines

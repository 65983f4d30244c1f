"""Input that used to end in a traceback, a hang or a silent wrong result: unreadable files,
one enormous line, no usable document at all, a glob through a symlink loop. Each is a counted
skip (data.on_error=skip) or one message naming the file and line, exit 2."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from data_pipeline import errors as data_errors
from data_pipeline import sources
from data_pipeline.sources import DataError, ErrorLog, PlainFile, iter_documents, resolve_source
from tests.conftest import BIN, run_cmd


def line(text: str) -> bytes:
    return json.dumps({"text": text}).encode() + b"\n"


def prepare_cmd(cfg, *overrides) -> list[str]:
    return [str(BIN / "llmstack"), "data", "prepare", str(cfg), *overrides]


def write_config(tmp_path, tokenizer_dir, source: str):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"tokenizer: {{path: {tokenizer_dir}}}\ndata:\n  sources: [{{path: '{source}'}}]\n"
                   f"  out: {tmp_path / 'out'}\n")
    return cfg


# --- permission denied ---------------------------------------------------------------------------


def test_unreadable_file_is_counted_or_named(tmp_path, monkeypatch):
    """A file that cannot be opened is an `unreadable` skip, or stops the run naming it; its
    location is reported without reading it (a line number would need the file)."""
    (tmp_path / "a.jsonl").write_bytes(line("readable"))
    secret = tmp_path / "b.jsonl"
    secret.write_bytes(line("secret"))
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if os.fspath(path) == str(secret):
            raise PermissionError(13, "Permission denied", str(secret))
        return real_open(path, *args, **kwargs)

    # the processes here may read anything (root): deny the one file at the open call instead
    monkeypatch.setattr(sources, "open", guarded_open, raising=False)
    monkeypatch.setattr(data_errors, "open", guarded_open, raising=False)
    src = resolve_source(str(tmp_path / "*.jsonl"))
    log = ErrorLog()
    assert list(iter_documents(src, on_error="skip", errors=log)) == ["readable"]
    assert log.counts() == {str(secret): {"unreadable": 1}}
    assert "b.jsonl (byte 0): cannot read: Permission denied" in "\n".join(log.report())
    with pytest.raises(DataError, match=r"b\.jsonl \(byte 0\): cannot read: Permission denied"):
        list(iter_documents(src, on_error="fail"))


def _without_read_permission() -> list[str] | None:
    """A command prefix under which file permissions apply to this user, or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    # root reads any file through these two capabilities; drop them for the child
    return [setpriv, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_cli_permission_denied_exit_2_no_traceback(tmp_path, tokenizer_dir):
    prefix = _without_read_permission()
    if prefix is None:
        pytest.skip("running as root without setpriv: no way to make a file unreadable to this process")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.jsonl").write_bytes(line("hello world"))
    secret = tmp_path / "data" / "secret.jsonl"
    secret.write_bytes(line("top secret"))
    secret.chmod(0)
    cfg = write_config(tmp_path, tokenizer_dir, str(tmp_path / "data" / "*.jsonl"))
    proc = run_cmd(prefix + prepare_cmd(cfg), cwd=tmp_path, check=False)  # skip: counted and reported
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "secret.jsonl: skipped 1 (unreadable x1)" in proc.stdout
    proc = run_cmd(prefix + prepare_cmd(cfg, "data.on_error=fail"), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "secret.jsonl (byte 0): cannot read: Permission denied" in proc.stderr


# --- one enormous line ---------------------------------------------------------------------------

BIG = 24 << 20  # a 24 MB line: splitting it took ~5 s before (quadratic), milliseconds now


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(path, "wb") as f:
        f.write(line("before"))
        f.write(b'{"text": "' + b"x" * BIG + b'"}\n')
        f.write(line("after"))
    return path


def test_a_huge_line_is_split_whole(big_file):
    """Under the cap a long line comes out whole and in place (line splitting is linear: this
    line is ~400 reads of 64 KB)."""
    unit = resolve_source(str(big_file), max_record_bytes=BIG + 100).units[0]
    recs = list(unit.records(0))
    assert [p for p, _ in recs] == [0, len(line("before")), len(line("before")) + BIG + 13]
    assert len(recs[1][1]) == BIG + 12 and recs[2][1] == line("after").rstrip(b"\n")


def test_a_line_over_max_record_bytes_is_skipped_or_named(big_file):
    src = resolve_source(str(big_file), max_record_bytes=1 << 20)
    log = ErrorLog()
    assert list(iter_documents(src, on_error="skip", errors=log)) == ["before", "after"]
    assert log.counts() == {str(big_file): {"too_long": 1}}
    with pytest.raises(DataError, match=r"big\.jsonl:2: line of 25,165,836 bytes is longer than the record size "
                                        r"limit \(data\.max_record_bytes=1,048,576\)"):
        list(iter_documents(src, on_error="fail"))
    # a reader whose region starts inside the long line walks past it without holding it
    unit = src.units[0]
    assert [raw for _, raw in unit.records(start=1000)] == [line("after").rstrip(b"\n")]


def test_cli_too_long_line_exit_2_names_file_and_line(big_file, tokenizer_dir, tmp_path):
    cfg = write_config(tmp_path, tokenizer_dir, str(big_file))
    proc = run_cmd(prepare_cmd(cfg, "data.max_record_bytes=1000000"), cwd=tmp_path)
    assert "big.jsonl: skipped 1 (too_long x1)" in proc.stdout and "2 documents" in proc.stdout
    proc = run_cmd(prepare_cmd(cfg, "data.max_record_bytes=1000000", "data.on_error=fail"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "big.jsonl:2: line of 25,165,836 bytes is longer than the record size limit" in proc.stderr


# --- nothing usable ------------------------------------------------------------------------------


def test_cli_prepare_with_no_documents_exit_2(tmp_path, tokenizer_dir):
    """Every record bad: `data prepare` says nothing was read and why, exit 2 (it exited 0 with
    0 documents)."""
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "unterminated\n{"body": "no text field"}\n')
    cfg = write_config(tmp_path, tokenizer_dir, str(tmp_path / "bad.jsonl"))
    proc = run_cmd(prepare_cmd(cfg), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no documents were read from" in proc.stderr and "2 bad inputs" in proc.stderr
    assert "malformed_json x1" in proc.stderr and "missing_field x1" in proc.stderr


# --- globs ---------------------------------------------------------------------------------------


def test_recursive_glob_reads_each_real_file_once(tmp_path):
    """`**` through a symlink loop (and a second path to the same file) lists each file once;
    glob.glob listed a file once per level of the loop (here b.jsonl 41 times, a.jsonl 81)."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.jsonl").write_bytes(line("alpha"))
    (d / "b.jsonl").write_bytes(line("beta"))
    os.symlink("..", d / "sub" / "loop")  # corpus/sub/loop -> corpus
    os.symlink("sub/a.jsonl", d / "z-alias.jsonl")
    src = resolve_source(str(d / "**" / "*.jsonl"))
    assert [os.path.relpath(u.path, d) for u in src.units] == ["b.jsonl", os.path.join("sub", "a.jsonl")]
    assert sorted(iter_documents(src)) == ["alpha", "beta"]


def test_glob_through_an_unlistable_directory_is_an_error(tmp_path, monkeypatch):
    """glob.glob passes over a directory it may not list, silently dropping its files."""
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.jsonl").write_bytes(line("alpha"))
    real = os.listdir

    def listdir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(DataError, match=r"cannot list directory .*locked: Permission denied"):
        resolve_source(str(tmp_path / "**" / "*.jsonl"))


def test_plain_file_unit_keeps_its_size_cap_across_pickling(tmp_path):
    """Loader workers get units by pickling: the cap must travel with them."""
    import pickle

    unit = PlainFile(str(tmp_path / "x.jsonl"), "text", 0, max_record_bytes=123)
    assert pickle.loads(pickle.dumps(unit)).max_record_bytes == 123


def test_shell_glob_equivalence(tmp_path):
    """Without links, the files listed are glob.glob's (sorted files; hidden names excluded)."""
    import glob

    for rel in ("a.jsonl", "b/c.jsonl", "b/d/e.jsonl", ".hidden/f.jsonl", "b/.g.jsonl", "b/h.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(line(rel))
    for pattern in ("**/*.jsonl", "*.jsonl", "b/**", "b/*/*.jsonl", "**", ".hidden/*.jsonl", "b/[cd]*"):
        full = str(tmp_path / pattern)
        expected = sorted(f for f in glob.glob(full, recursive=True) if os.path.isfile(f))
        assert sources.glob_files(full) == expected, pattern

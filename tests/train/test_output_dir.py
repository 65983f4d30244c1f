"""--out of export / import / checkpoint consolidate: what may be replaced, and how.

A non-empty --out is refused unless --overwrite; --overwrite replaces only a previous output of
the same command; the new output is swapped in only when complete, so a failure leaves the old
one as it was. The commands themselves are exercised in test_export_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstack.errors import UsageError
from llmstack.train.outputs import check_output_dir, staged_output


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def consolidated(d: Path, step: int = 1) -> Path:
    """A directory as `checkpoint consolidate` writes it."""
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights %d" % step)
    (d / "llmstack_model.json").write_text(json.dumps({"model_family": "gpt", "step": step}))
    return d


def run_dir(d: Path) -> Path:
    """A run directory with a checkpoint (what --out must never replace)."""
    (d / "checkpoints" / "step_4").mkdir(parents=True)
    (d / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt").write_bytes(b"state")
    (d / "checkpoints" / "latest").write_text("step_4")
    (d / "config.yaml").write_text("seed: 0\n")
    return d


def write(new: Path, step: int) -> None:
    consolidated(new, step)


def test_missing_or_empty_out_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "a" / "b", tmp_path / "empty"):
        with staged_output(out, "checkpoint consolidate") as new:
            write(new, 1)
        assert json.loads((out / "llmstack_model.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # no temp directory left


def test_non_empty_out_needs_overwrite(tmp_path):
    out = consolidated(tmp_path / "out")
    before = tree(out)
    with pytest.raises(UsageError, match="exists and is not empty; pass --overwrite"):
        with staged_output(out, "checkpoint consolidate") as new:
            write(new, 2)
    assert tree(out) == before


def test_overwrite_replaces_a_previous_output(tmp_path):
    out = consolidated(tmp_path / "out")
    with staged_output(out, "checkpoint consolidate", overwrite=True) as new:
        write(new, 2)
    assert json.loads((out / "llmstack_model.json").read_text())["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def with_notes(d: Path) -> None:
    consolidated(d)
    (d / "notes.txt").write_text("mine")


def weights_only(d: Path) -> None:
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"w")


@pytest.mark.parametrize("make,why", [(run_dir, "checkpoints/"), (with_notes, "notes.txt"),
                                      (weights_only, "no llmstack_model.json")])
def test_overwrite_never_replaces_anything_else(tmp_path, make, why):
    out = tmp_path / "out"
    make(out)
    before = tree(out)
    with pytest.raises(UsageError, match="refusing to overwrite") as e:
        with staged_output(out, "checkpoint consolidate", overwrite=True) as new:
            write(new, 2)
    assert why in str(e.value)
    assert tree(out) == before


def test_overwrite_keeps_to_the_same_command(tmp_path):
    out = consolidated(tmp_path / "out")  # a consolidate output is not an import's or an export's
    for command in ("import", "export"):
        with pytest.raises(UsageError, match="refusing to overwrite"):
            check_output_dir(out, command, overwrite=True)
    check_output_dir(out, "checkpoint consolidate", overwrite=True)


def test_failure_leaves_the_previous_output(tmp_path):
    out = consolidated(tmp_path / "out")
    before = tree(out)
    with pytest.raises(RuntimeError):
        with staged_output(out, "checkpoint consolidate", overwrite=True) as new:
            write(new, 2)
            raise RuntimeError("interrupted half-way")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_may_not_be_or_contain_the_input(tmp_path):
    src = run_dir(tmp_path / "runs" / "x")
    for out in (src, tmp_path / "runs", src / "checkpoints" / "latest"):
        with pytest.raises(UsageError, match="is or contains the input"):
            check_output_dir(out, "export", overwrite=True, inputs=[src / "checkpoints" / "latest"])
    check_output_dir(src / "hf", "export", inputs=[src])  # inside the input: a new directory there is fine


def test_a_file_or_link_is_not_an_output_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(consolidated(tmp_path / "real"))
    for out in (tmp_path / "f", tmp_path / "link"):
        with pytest.raises(UsageError, match="exists and is not a directory"):
            check_output_dir(out, "checkpoint consolidate", overwrite=True)

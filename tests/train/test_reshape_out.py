"""`checkpoint reshape --out`: never deletes a directory it did not write.

The converter (DeepSpeed's ds_to_universal, run in a subprocess) is replaced by a stand-in that
writes the same kind of tree, so what is tested is our side: which existing outputs are refused,
before any work, and which previous outputs are replaced. Real conversions run in
tests/distributed/test_pretrain_runs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmstack.cli import main
from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt


def fake_checkpoint(d: Path) -> Path:
    """A ZeRO-1 step dir that verifies (its manifest lists its files)."""
    d.mkdir(parents=True)
    (d / ckpt.META).write_text(json.dumps({"step": 5, "world_size": 2, "zero_stage": 1, "checkpoint_format": 2}))
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    ckpt.write_manifest(d)
    return d


@pytest.fixture
def converter(monkeypatch):
    """The stand-in converter; records the output folders it was asked for."""
    calls = []

    def to_universal(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(b"fp32")
        (out.parent / "latest_universal").write_text(out.name)  # as DeepSpeed's converter does

    monkeypatch.setattr(ckpt.ds, "to_universal", to_universal)
    return calls


def test_reshape_out_refuses_a_non_empty_directory_before_any_work(tmp_path, converter, capsys):
    src = fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_5")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["checkpoint", "reshape", str(src), "--out", str(out)]) == 2
    assert "refusing to overwrite it: it has no meta.json" in capsys.readouterr().err
    # another checkpoint (not universal, not written by reshape) is refused too
    other = fake_checkpoint(tmp_path / "other" / "step_9")
    with pytest.raises(UsageError, match="refusing to overwrite it: it is not a universal checkpoint"):
        ckpt.reshape(src, other)
    assert converter == []
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (other / "mp_rank_00_model_states.pt").is_file()


def test_reshape_replaces_only_its_own_previous_output(tmp_path, converter):
    src = fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_5")
    out = tmp_path / "universal"
    assert ckpt.reshape(src, out) == out
    meta = ckpt.read_meta(out)
    assert meta.universal and meta.source == str(src) and ckpt.verify(out) == []
    assert (tmp_path / "latest_universal").read_text() == "universal"
    assert ckpt.reshape(src, out) == out and len(converter) == 2  # a re-run refreshes its own output
    (out / "zero" / "notes.txt").write_text("keep me")  # no longer only what reshape wrote
    with pytest.raises(UsageError, match="it holds zero/notes.txt, which its manifest does not list"):
        ckpt.reshape(src, out)
    assert len(converter) == 2 and (out / "zero" / "notes.txt").read_text() == "keep me"
    # the default output beside the checkpoint follows the same rules
    assert ckpt.reshape(src) == src.parent / "step_5_universal"
    assert not list(tmp_path.rglob(".*partial-*"))  # no temp dirs left behind

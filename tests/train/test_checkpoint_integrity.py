"""The checkpoint protocol of train/checkpoint.py, in one process with a stand-in engine.

The engine writes and reads real torch files the way DeepSpeed's does (model states, one
optimizer file per rank), so what is tested is our side: fsync before the rename, the manifest
written last and checked on load, the fallback of `resume=auto`, rollbacks that set checkpoints
aside instead of deleting them, and checkpoints written before manifests existed. The same
properties are checked end to end with real DeepSpeed runs in tests/distributed/test_checkpoint_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt
from llmstack.train.meta import CheckpointMeta

MODEL, OPTIM = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Engine:
    """Saves and loads like a one-process DeepSpeed ZeRO-1 engine (the files and names it writes)."""

    def __init__(self, seed: int = 0):
        self.w = torch.randn(20_000, generator=torch.Generator().manual_seed(seed))
        self.optimizer = type("Opt", (), {"param_groups": []})()
        self.loaded: list[str] = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.w}, **client_state}, d / MODEL)
        torch.save({"optimizer_state_dict": {"exp_avg": self.w * 0.1}}, d / OPTIM)

    def load_checkpoint(self, root, tag, **_):
        self.loaded.append(tag)
        return str(Path(root) / tag), torch.load(Path(root) / tag / MODEL, weights_only=False)


def save(root: Path, step: int, keep_last: int = 3, engine: Engine | None = None) -> Path:
    return ckpt.save(engine or Engine(step), root, step, CheckpointMeta(step=step, world_size=1, zero_stage=1), {},
                     keep_last)


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def make_legacy(d: Path) -> None:
    """Turn a checkpoint into one written before manifests existed."""
    (d / ckpt.MANIFEST).unlink()
    meta = json.loads((d / ckpt.META).read_text())
    del meta["checkpoint_format"]
    (d / ckpt.META).write_text(json.dumps(meta))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "run" / "checkpoints"


def test_manifest_lists_every_file_with_size_and_sha256(root):
    import hashlib

    d = save(root, 5)
    manifest = json.loads((d / ckpt.MANIFEST).read_text())
    files = sorted(p.name for p in d.iterdir() if p.name != ckpt.MANIFEST)
    assert sorted(manifest["files"]) == files == sorted([MODEL, OPTIM, "meta.json", "rng_rank0.pt"])
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(d) == []


def test_every_file_is_fsynced_before_the_rename(root, monkeypatch):
    """The rename publishes the checkpoint: by then every file in it (and the manifest, written
    last) must be on stable storage, or a power loss leaves a step_N with empty files."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = save(root, 5)
    tmp = str(root / ".tmp_step_5")
    publish = events.index(("replace", tmp, str(final)))
    # meta.json and the manifest are written to NAME.tmp, fsynced, then renamed to NAME
    synced = {e[1].removesuffix(".tmp") for e in events[:publish] if e[0] == "fsync"}
    for name in [MODEL, OPTIM, "rng_rank0.pt", ckpt.META, ckpt.MANIFEST]:
        assert f"{tmp}/{name}" in synced, f"{name} not fsynced before the rename"
    assert tmp in synced  # the directory's entries too
    manifest_write = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == f"{tmp}/{ckpt.MANIFEST}")
    assert all(not (e[0] == "replace" and e[2].startswith(tmp + "/")) for e in events[manifest_write + 1:publish]), \
        "the manifest must be the last file written"


@pytest.mark.parametrize("damage, what", [
    (lambda d: truncate(d / MODEL), f"{MODEL} is .* bytes, the manifest records"),
    (lambda d: truncate(d / ckpt.META), "meta.json is .* bytes, the manifest records"),
    (lambda d: flip_byte(d / OPTIM), f"{OPTIM} does not match its sha256"),
    (lambda d: (d / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    (lambda d: truncate(d / ckpt.MANIFEST), "manifest.json is unreadable"),
    (lambda d: (d / ckpt.MANIFEST).unlink(), "manifest.json is missing"),
])
def test_damage_is_found_and_named(root, damage, what):
    import re

    d = save(root, 5)
    damage(d)
    problems = ckpt.verify(d)
    assert len(problems) == 1 and re.search(what, problems[0]), problems
    with pytest.raises(UsageError, match=what):
        ckpt.check(d)


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(root, capsys):
    save(root, 5)
    save(root, 10)
    save(root, 15)
    flip_byte(root / "step_15" / OPTIM)
    truncate(root / "step_10" / ckpt.META)
    chosen = ckpt.start_run("auto", root, root.parent)
    assert chosen == root / "step_5"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {root / 'step_15'}: {root / 'step_15' / OPTIM} does not match its sha256" in out
    assert f"skipping checkpoint {root / 'step_10'}: {root / 'step_10' / 'meta.json'} is" in out
    # the damaged ones are kept for inspection, out of the way of this run's saves
    assert [n for n, _ in ckpt.step_dirs(root)] == [5]
    aside = sorted(p.relative_to(root).parts[1] for p in root.glob("abandoned_*/step_*"))
    assert aside == ["step_10", "step_15"]
    assert (root / "latest").read_text() == "step_5"


def test_auto_with_no_checkpoint_that_verifies_is_an_error(root):
    save(root, 5)
    truncate(root / "step_5" / MODEL)
    with pytest.raises(UsageError, match="no checkpoint under .* verifies"):
        ckpt.start_run("auto", root, root.parent)
    assert (root / "step_5").is_dir()  # nothing moved: the user decides


def test_damaged_explicit_checkpoint_is_an_error_naming_the_file(root):
    save(root, 5)
    flip_byte(root / "step_5" / OPTIM)
    with pytest.raises(UsageError, match=rf"train.resume=\S+: checkpoint \S+ is damaged: \S+/{OPTIM} does not match"):
        ckpt.start_run(str(root / "step_5"), root, root.parent)


def test_load_verifies_and_requires_the_rng_state(root):
    save(root, 5)
    engine = Engine()
    meta, _ = ckpt.load(engine, root / "step_5")
    assert meta.step == 5 and engine.loaded == ["step_5"]
    save(root, 10)
    (root / "step_10" / "rng_rank0.pt").unlink()
    with pytest.raises(UsageError, match="rng_rank0.pt is missing"):
        ckpt.load(Engine(), root / "step_10")


def test_rollback_sets_later_checkpoints_aside_and_auto_continues_the_new_branch(root, capsys):
    """Resuming from step_8 while step_12 exists: the new branch's step_10 must survive the
    keep_last cleanup (it used to be deleted, as one of the oldest), and `auto` must pick it."""
    for s in (4, 8, 12):
        save(root, s, keep_last=3)
    chosen = ckpt.start_run(str(root / "step_8"), root, root.parent)
    assert chosen == root / "step_8"
    assert "moved step_12 aside" in capsys.readouterr().out
    save(root, 10, keep_last=1)
    assert [n for n, _ in ckpt.step_dirs(root)] == [10]
    assert (root / "latest").read_text() == "step_10"
    assert ckpt.find_resume(root) == root / "step_10"
    assert len(list(root.glob("abandoned_*/step_12/manifest.json"))) == 1


def test_save_never_deletes_a_newer_checkpoint(root):
    """The safety net for callers that did not go through start_run (PPO's critic root): a save
    behind existing checkpoints sets them aside, and keep_last counts only older ones."""
    for s in (8, 12):
        save(root, s)
    save(root, 9, keep_last=1)
    assert [n for n, _ in ckpt.step_dirs(root)] == [9]
    assert sorted(p.name for p in root.glob("abandoned_*/*")) == ["step_12"]


def test_resume_none_sets_existing_checkpoints_aside(root):
    save(root, 5)
    assert ckpt.start_run("none", root, root.parent) is None
    assert ckpt.step_dirs(root) == [] and not (root / "latest").exists()
    assert len(list(root.glob("abandoned_*/step_5"))) == 1


def test_temp_dirs_of_crashed_saves_do_not_block_and_are_removed(root):
    save(root, 5)
    crashed = root / ".tmp_step_10"
    crashed.mkdir()
    (crashed / MODEL).write_bytes(b"partial")
    assert ckpt.start_run("auto", root, root.parent) == root / "step_5"
    assert not crashed.exists()


def test_checkpoint_without_manifest_still_loads_and_is_checked(root):
    """Checkpoints written before manifests: meta.json, the expected files and the zip CRC-32 of
    every torch file are checked instead."""
    save(root, 5)
    d = save(root, 10)
    make_legacy(d)
    make_legacy(root / "step_5")
    assert ckpt.verify(d) == []
    assert ckpt.start_run("auto", root, root.parent) == d
    ckpt._VERIFIED.clear()
    flip_byte(d / OPTIM, at=0.9)  # inside the tensor data
    assert "does not match its CRC-32" in " ".join(ckpt.verify(d))
    assert ckpt.newest_verified(root)[0] == root / "step_5"
    (root / "step_5" / "rng_rank0.pt").unlink()
    assert ckpt.verify(root / "step_5") == [f"{root / 'step_5' / 'rng_rank0.pt'} is missing"]
    assert ckpt.verify(root / "step_5", rng=False) == []  # reading weights only (model.init, export)


def test_disk_full_is_recognised(tmp_path, monkeypatch):
    assert ckpt._disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert ckpt._disk_full(wrapped, tmp_path)
    # torch.save's short write has no errno: judged by the free space left
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not ckpt._disk_full(short, tmp_path)
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda _: full)
    assert ckpt._disk_full(short, tmp_path)
    assert not ckpt._disk_full(ValueError("a bug"), tmp_path)

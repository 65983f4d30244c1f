"""Checkpoint paths a user types: a PPO run keeps its policy under checkpoints/actor/, and the run
directory, its checkpoints/ and checkpoints/latest all mean the actor's newest checkpoint (said
once on stderr); other layouts resolve as before."""

from __future__ import annotations

import pytest

from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt


def fake_root(root, steps, latest=True):
    """Checkpoint directories as resolve sees them: step_N/ with meta.json, and `latest`."""
    for n in steps:
        (root / f"step_{n}").mkdir(parents=True)
        (root / f"step_{n}" / ckpt.META).write_text("{}")
    if latest:
        (root / "latest").write_text(f"step_{steps[-1]}")


@pytest.fixture
def ppo_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_noted", set())
    run = tmp_path / "runs" / "ppo-demo"
    fake_root(run / "checkpoints" / "actor", [4, 8])
    fake_root(run / "checkpoints" / "critic", [4, 8])
    return run


@pytest.mark.parametrize("given", ["", "checkpoints", "checkpoints/latest"])
def test_ppo_paths_resolve_to_the_actor(ppo_run, given, capsys):
    path = ppo_run / given if given else ppo_run
    assert ckpt.resolve(path) == ppo_run / "checkpoints" / "actor" / "step_8"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds PPO checkpoints: using the actor's" in err
    assert str(ppo_run / "checkpoints" / "critic") in err
    ckpt.resolve(path)  # said once per path
    assert capsys.readouterr().err == ""


def test_actor_without_latest_takes_the_highest_step(ppo_run, capsys):
    (ppo_run / "checkpoints" / "actor" / "latest").unlink()
    assert ckpt.resolve(ppo_run) == ppo_run / "checkpoints" / "actor" / "step_8"


def test_explicit_actor_and_critic_paths_are_unchanged(ppo_run, capsys):
    assert ckpt.resolve(ppo_run / "checkpoints" / "actor" / "latest") == ppo_run / "checkpoints" / "actor" / "step_8"
    assert ckpt.resolve(ppo_run / "checkpoints" / "critic") == ppo_run / "checkpoints" / "critic" / "step_8"
    assert capsys.readouterr().err == ""


def test_plain_runs_resolve_as_before(tmp_path, capsys):
    run = tmp_path / "gpt"
    fake_root(run / "checkpoints", [2, 5])
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest", run / "checkpoints" / "step_2"):
        assert ckpt.resolve(given) == (run / "checkpoints" / ("step_2" if given.name == "step_2" else "step_5"))
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="checkpoint not found"):
        ckpt.resolve(tmp_path / "nothing" / "checkpoints" / "latest")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="is not a checkpoint"):
        ckpt.resolve(tmp_path / "empty")

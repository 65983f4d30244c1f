"""A checkpoint resumes only into the model it saved: the recorded architecture (meta "model")
against the config's, differing fields named (exit 2). The multi-process runs in
tests/distributed/test_pretrain_runs.py check the same through the command line."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from llmstack.config import PretrainConfig, SFTConfig, load_config
from llmstack.errors import UsageError
from llmstack.stages import common
from llmstack.train.meta import CheckpointMeta
from llmstack.train.run import check_architecture
from tests.conftest import REPO, TINY

VOCAB, SEQ = 1024, 32


def arch_of(*overrides, schema=PretrainConfig):
    cfg = load_config(schema, str(REPO / "configs/pretrain/gpt-tiny.yaml") if schema is PretrainConfig else None,
                      [o for o in TINY if o.startswith(("model.", "data."))] + list(overrides))
    return cfg, common.model_config(cfg.model, VOCAB, SEQ, cfg.train.activation_checkpointing)


def meta_of(arch, family="gpt", **extra) -> CheckpointMeta:
    return CheckpointMeta.from_dict(json.loads(json.dumps({"model_family": family, "model": asdict(arch), **extra})))


@pytest.mark.parametrize("change,needle", [
    ("model.n_head=2", "model.n_head: 4 -> 2"),
    ("model.rope_theta=500000", "model.rope_theta: 10000.0 -> 500000.0"),
    ("model.norm=rmsnorm", "model.norm: 'layernorm' -> 'rmsnorm'"),
    ("model.d_model=128", "model.d_model: 64 -> 128"),
])
def test_changed_architecture_is_refused_naming_the_field(change, needle):
    _, saved = arch_of()
    _, now = arch_of(change)
    with pytest.raises(UsageError) as e:
        check_architecture(meta_of(saved), "gpt", now, "ckpt/step_4")
    assert "cannot resume from ckpt/step_4" in str(e.value) and needle in str(e.value)


def test_same_architecture_and_run_settings_resume():
    _, saved = arch_of()
    # activation checkpointing and dropout change how the remaining steps train, not the model
    _, now = arch_of("model.dropout=0.1", "model.attn_dropout=0.1")
    now.activation_checkpointing = True
    check_architecture(meta_of(saved), "gpt", now, "ckpt")
    # a field the checkpoint does not record (an older version wrote it) is not compared
    old = meta_of(saved)
    del old.model["rope_theta"]
    _, other_theta = arch_of("model.rope_theta=500000")
    check_architecture(old, "gpt", other_theta, "ckpt")


def test_another_family_is_refused():
    _, saved = arch_of()
    with pytest.raises(UsageError, match="model.family: 'bert' -> 'gpt'"):
        check_architecture(meta_of(saved, family="bert"), "gpt", saved, "ckpt")


def test_sft_resume_compares_model_init_architecture(tmp_path):
    """SFT takes its architecture from model.init: pointing model.init at another model and
    resuming the old run is refused (it silently continued the old model)."""
    _, small = arch_of()
    _, large = arch_of("model.n_layer=4")
    init = tmp_path / "init"
    init.mkdir()
    (init / "llmstack_model.json").write_text(json.dumps({"model_family": "gpt", "model": asdict(large)}))
    cfg = load_config(SFTConfig, None, [f"model.init={init}", f"data.seq_len={SEQ}"])
    with pytest.raises(UsageError, match="model.n_layer: 2 -> 4"):
        common.check_resume_model(cfg.model, meta_of(small), None, "sft/step_2")
    common.check_resume_model(cfg.model, meta_of(large), None, "sft/step_2")  # the same model: fine
    # a Hugging Face model.init is not converted for the check: its path must be the recorded one
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cfg = load_config(SFTConfig, None, [f"model.init={hf}", f"data.seq_len={SEQ}"])
    with pytest.raises(UsageError, match=f"trained from model.init={init}"):
        common.check_resume_model(cfg.model, meta_of(large, config={"model": {"init": str(init)}}), None,
                                  "sft/step_2")

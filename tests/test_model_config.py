"""The model section of the config: families, presets per family, fields per family."""

from __future__ import annotations

import pytest

from llmstack.config import PretrainConfig, load_config
from llmstack.errors import ConfigError
from tests.conftest import REPO


@pytest.mark.parametrize("overrides,family,preset", [
    ([], "gpt", "gpt2-tiny"),
    (["model.family=bert"], "bert", "bert-tiny"),  # the family's tiny preset
    (["model.family=t5"], "t5", "t5-tiny"),
    (["model.preset=t5-small"], "t5", "t5-small"),  # the preset's family
    (["model.preset=llama-tiny", "model.n_kv_head=1"], "gpt", "llama-tiny"),
])
def test_family_and_preset_defaults(overrides, family, preset):
    cfg = load_config(PretrainConfig, None, overrides)
    assert (cfg.model.family, cfg.model.preset) == (family, preset)


@pytest.mark.parametrize("overrides,needle", [
    (["model.family=bert", "model.preset=t5-tiny"], "preset 't5-tiny' is a t5 preset, but model.family=bert"),
    (["model.family=t5", "model.n_kv_head=2"], "model.n_kv_head does not apply to model.family=t5"),
    (["model.ffn=relu"], "model.ffn does not apply to model.family=gpt"),
    (["model.family=bert", "model.rope_theta=10"], "model.rope_theta does not apply to model.family=bert"),
    (["model.family=mamba"], "model.family: Input should be 'gpt', 'bert' or 't5'"),
    (["model.preset=bert-huge"], "unknown preset 'bert-huge'"),
])
def test_bad_model_sections_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, overrides)
    assert needle in str(e.value)


def test_family_configs_resolve_to_their_architectures():
    from llmstack.stages.common import model_config

    for name, cls in (("bert-tiny", "BertConfig"), ("t5-tiny", "T5Config"), ("gpt-tiny", "GPTConfig")):
        cfg = load_config(PretrainConfig, str(REPO / f"configs/pretrain/{name}.yaml"))
        arch = model_config(cfg.model, 1024, cfg.data.seq_len, False, pad_id=0)
        assert type(arch).__name__ == cls
    cfg = load_config(PretrainConfig, None, ["model.family=t5", "model.ffn=relu", "model.d_kv=16"])
    arch = model_config(cfg.model, 1024, 64, False, pad_id=0)
    assert (arch.ffn, arch.d_kv, arch.pad_id) == ("relu", 16, 0)

"""The options table (`llmstack pretrain --list-options`, README): every row is a valid config."""

from __future__ import annotations

import pytest

from llmstack.cli import main
from llmstack.config import PretrainConfig, load_config
from llmstack.options import OPTIONS, overrides_of
from llmstack.stages import common
from tests.conftest import REPO


@pytest.mark.parametrize("row", OPTIONS, ids=[r[2] for r in OPTIONS])
def test_every_listed_setting_is_accepted_and_builds_a_model(row):
    overrides = overrides_of(row[2])
    assert overrides, row
    cfg = load_config(PretrainConfig, None, overrides)
    arch = common.model_config(cfg.model, 512, 64, False)
    for o in overrides:
        key, value = o.split("=", 1)
        section, field = key.split(".")
        got = getattr(getattr(cfg, section), field)
        if section == "model" and hasattr(arch, field):
            got = getattr(arch, field)
        assert str(got).lower() == value.lower() or float(got) == float(value), (o, got)


def test_list_options_and_readme_show_every_key(capsys):
    assert main(["pretrain", "--list-options"]) == 0
    out = capsys.readouterr().out
    readme = (REPO / "README.md").read_text()
    for _, _, setting, _ in OPTIONS:
        assert setting in out
        assert f"`{setting}`" in readme, setting

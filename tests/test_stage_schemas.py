"""Per-stage schemas: a key a stage does not use is not in its schema, and cross-field checks are
schema validators, so a config is refused (exit 2, naming the key) before any work, `--dry-run`
included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from llmstack.config import SCHEMAS, load_config
from llmstack.errors import ConfigError
from tests.conftest import REPO, child_env

STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")
CONFIG = {"pretrain": "configs/pretrain/gpt-tiny.yaml", "sft": "configs/sft/lora.yaml", "rm": "configs/rm/demo.yaml",
          "dpo": "configs/dpo/demo.yaml", "ppo": "configs/ppo/demo.yaml"}


def nested(key: str, value) -> dict:
    """`data.sources[0].weight`, 2 -> {"data": {"sources": [{"path": "x", "weight": 2}]}}."""
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        if p.endswith("[0]"):
            item = {"path": "x"}
            node[p[:-3]] = [item]
            node = item
        else:
            node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def refused(stage: str, key: str, value, tmp_path) -> str:
    """The error message of `stage` given `key` = `value` (a YAML file for list items, else an override)."""
    with pytest.raises(ConfigError) as e:
        if "[" in key:
            path = tmp_path / "c.yaml"
            path.write_text(yaml.safe_dump(nested(key, value)))
            load_config(SCHEMAS[stage], str(path))
        else:
            load_config(SCHEMAS[stage], None, [f"{key}={json.dumps(value)}"])
    return str(e.value)


def shown(key: str) -> str:
    return key.replace("[0]", ".0")  # how the error names a list item's key


# The keys each stage ignored before its schema was its own: each is now an unknown key there.
IGNORED = [
    ("ppo", "train.compile", True), ("ppo", "train.eval_every", 5), ("ppo", "train.global_batch", 8),
    ("ppo", "train.label_smoothing", 0.1), ("ppo", "train.z_loss", 1e-4), ("ppo", "train.eval_batches", 2),
    ("ppo", "data.sources[0].weight", 2.0), ("ppo", "data.sources[0].text_field", "body"),
    ("sft", "train.label_smoothing", 0.1), ("sft", "train.z_loss", 1e-4), ("sft", "train.eval_batches", 2),
    ("sft", "data.sources[0].weight", 2.0), ("sft", "data.val_sources[0].weight", 2.0),
    ("sft", "data.sources[0].text_field", "body"), ("sft", "data.streams", 4), ("sft", "data.num_workers", 2),
    ("sft", "data.bos", True), ("sft", "data.doc_mask", True), ("sft", "data.shuffle_windows", 1),
    ("sft", "data.max_record_bytes", 1000), ("sft", "data.out", "shards"), ("sft", "data.docs_per_shard", 8),
    ("rm", "train.eval_batches", 2), ("rm", "train.label_smoothing", 0.1), ("rm", "train.z_loss", 1e-4),
    ("rm", "data.sources[0].weight", 2.0), ("rm", "data.shuffle", False),
    ("dpo", "train.label_smoothing", 0.1), ("dpo", "train.z_loss", 1e-4), ("dpo", "train.eval_batches", 2),
    ("dpo", "data.val_sources[0].text_field", "body"), ("dpo", "data.num_workers", 2),
    ("pretrain", "data.out", "shards"), ("pretrain", "data.docs_per_shard", 8),
]


@pytest.mark.parametrize("stage,key,value", IGNORED, ids=[f"{s}:{k}" for s, k, _ in IGNORED])
def test_a_key_the_stage_does_not_use_is_refused(stage, key, value, tmp_path):
    assert f"{shown(key)}: unknown key" in refused(stage, key, value, tmp_path)


def sections(schema: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The top-level fields that are models (run, data, train, ...)."""
    return {k: f.annotation for k, f in schema.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def list_items(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields that are lists of models (data.sources, data.val_sources) -> the item model."""
    out = {}
    for k, f in model.model_fields.items():
        args = getattr(f.annotation, "__args__", ())
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            out[k] = args[0]
    return out


def foreign_keys() -> list[tuple[str, str, object]]:
    """Every (stage, key, a value) where the key is in another command's same-named section (or
    list item) but not in the stage's own."""
    found = {}
    for stage in STAGES:
        mine = sections(SCHEMAS[stage])
        for other, schema in SCHEMAS.items():
            for name, model in sections(schema).items():
                if name not in mine or mine[name] is model:
                    continue
                own = mine[name]
                default = model()  # every section model here builds from its defaults
                for k in model.model_fields.keys() - own.model_fields.keys():
                    found.setdefault((stage, f"{name}.{k}"), default.model_dump(mode="json")[k])
                for field, item in list_items(model).items():
                    own_item = list_items(own).get(field)
                    if own_item is not None:
                        for k in item.model_fields.keys() - own_item.model_fields.keys():
                            found.setdefault((stage, f"{name}.{field}[0].{k}"), "v")
    return sorted((s, k, v) for (s, k), v in found.items())


FOREIGN = foreign_keys()


def test_the_listed_keys_are_the_foreign_ones():
    """IGNORED (the examples spelled out above) is a part of what the schemas derive."""
    derived = {(s, k) for s, k, _ in FOREIGN}
    assert {(s, k) for s, k, _ in IGNORED} <= derived
    assert ("ppo", "train.micro_batch") not in derived and ("sft", "data.seq_len") not in derived


@pytest.mark.parametrize("stage,key,value", FOREIGN, ids=[f"{s}:{k}" for s, k, _ in FOREIGN])
def test_every_key_of_another_stage_section_is_refused(stage, key, value, tmp_path):
    assert f"{shown(key)}: unknown key" in refused(stage, key, value, tmp_path)


def test_each_stage_keeps_the_keys_it_uses():
    t = {s: set(sections(SCHEMAS[s])["train"].model_fields) for s in STAGES}
    assert t["pretrain"] - t["sft"] == {"label_smoothing", "z_loss", "eval_batches"}
    assert t["rm"] == t["dpo"] and t["sft"] - t["rm"] == {"eval_tasks", "eval_tasks_limit", "eval_tasks_fewshot"}
    assert t["rm"] - t["ppo"] == {"global_batch", "eval_every", "compile"} and t["ppo"] < t["rm"] < t["sft"]
    sft_data = sections(SCHEMAS["sft"])["data"]
    assert set(sft_data.model_fields) == {"sources", "val_sources", "seq_len", "on_error", "shuffle"}
    for stage in ("sft", "rm", "dpo", "ppo"):
        data = sections(SCHEMAS[stage])["data"]
        assert set(list_items(data)["sources"].model_fields) == {"path"}, stage
    cfg = load_config(SCHEMAS["sft"], None)
    assert [s.path for s in cfg.data.sources] == ["builtin-sft:train"]
    assert [s.path for s in cfg.data.val_sources] == ["builtin-sft:validation"] and cfg.data.seq_len == 256
    # `data prepare` (and `tokenizer train`) keep the shard-writing keys
    assert load_config(SCHEMAS["data"], None, ["data.out=x", "data.docs_per_shard=8"]).data.docs_per_shard == 8
    assert load_config(SCHEMAS["tokenizer"], None, ["data.out=x"]).data.out == "x"


# --- cross-field checks (schema validators) ---------------------------------------------------


@pytest.mark.parametrize("stage,overrides,needle", [
    ("sft", ["model.family=bert"], "model.family=bert: SFT trains decoder-only gpt models"),
    ("rm", ["model.family=t5"], "model.family=t5: RM trains decoder-only gpt models"),
    ("dpo", ["model.preset=bert-tiny"], "model.family=bert: DPO trains decoder-only gpt models"),
    ("sft", ["lora.enabled=true", "zero.stage=3"], "lora.enabled with zero.stage=3 is not supported"),
    ("ppo", ["actor.family=bert"], "actor.family=bert: PPO trains decoder-only gpt models"),
    ("ppo", ["critic.preset=t5-tiny"], "critic.family=t5: PPO trains decoder-only gpt models"),
    ("ppo", ["rollout.batch=12", "train.micro_batch=8"],
     "rollout.batch=12 must be a multiple of train.micro_batch x train.grad_accum = 8 x 1"),
    ("ppo", ["rollout.batch=16", "train.micro_batch=4", "train.grad_accum=3"],
     "rollout.batch=16 must be a multiple of train.micro_batch x train.grad_accum = 4 x 3"),
])
def test_cross_field_checks(stage, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SCHEMAS[stage], None, overrides)
    assert needle in str(e.value)


def test_cross_field_checks_pass_what_they_should():
    assert load_config(SCHEMAS["sft"], None, ["lora.enabled=true", "zero.stage=2"]).lora.enabled
    assert load_config(SCHEMAS["sft"], None, ["zero.stage=3"]).zero.stage == 3  # full fine-tuning under ZeRO-3
    cfg = load_config(SCHEMAS["ppo"], None, ["rollout.batch=24", "train.micro_batch=4", "train.grad_accum=3"])
    assert cfg.train.grad_accum == 3
    for stage in ("sft", "rm", "dpo"):
        assert load_config(SCHEMAS[stage], None).model.family == "gpt"


# --- the same through the command line: exit 2, the key named, no traceback ---------------------


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llmstack", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def check_exit_2(p, needle):
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("stage,override,needle", [
    ("pretrain", "data.out=shards", "data.out: unknown key"),
    ("sft", "train.z_loss=1e-4", "train.z_loss: unknown key"),
    ("rm", "train.eval_batches=2", "train.eval_batches: unknown key"),
    ("dpo", "train.label_smoothing=0.1", "train.label_smoothing: unknown key"),
    ("ppo", "train.compile=true", "train.compile: unknown key"),
    ("sft", "model.family=bert", "model.family=bert: SFT trains decoder-only gpt models"),
    ("sft", "zero.stage=3", "lora.enabled with zero.stage=3 is not supported"),  # lora.yaml enables LoRA
    ("rm", "model.family=t5", "model.family=t5: RM trains decoder-only gpt models"),
    ("dpo", "model.family=bert", "model.family=bert: DPO trains decoder-only gpt models"),
    ("ppo", "actor.family=bert", "actor.family=bert: PPO trains decoder-only gpt models"),
    ("ppo", "train.grad_accum=3", "rollout.batch=16 must be a multiple of train.micro_batch x train.grad_accum"),
])
def test_cli_dry_run_refuses_with_exit_2(stage, override, needle, tmp_path):
    check_exit_2(run_cli(stage, str(REPO / CONFIG[stage]), override, "--dry-run", cwd=tmp_path), needle)


def test_cli_refuses_a_weighted_sft_source_in_the_yaml(tmp_path):
    cfg = yaml.safe_load((REPO / CONFIG["sft"]).read_text())
    cfg["data"]["sources"][0]["weight"] = 2.0
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = run_cli("sft", str(path), "--dry-run", cwd=tmp_path)
    check_exit_2(p, "data.sources.0.weight: unknown key (allowed here: path)")


# --- the command table --------------------------------------------------------------------------


def test_stage_table_matches_the_schemas():
    from llmstack.stages import STAGES as table

    assert set(table) == set(STAGES)
    for name, stage in table.items():
        assert stage.schema is SCHEMAS[name], name
        assert callable(stage.run) and callable(stage.dry_run), name


def test_help_and_the_stages_package_do_not_import_the_stage_modules(tmp_path):
    code = ("import sys, contextlib, io\n"
            "from llmstack.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "import llmstack.stages.common\n"
            "loaded = [m for m in ('pretrain', 'sft', 'reward', 'dpo', 'ppo') if f'llmstack.stages.{m}' in sys.modules]\n"
            "print(loaded)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr[-2000:]


def test_pretrain_needs_a_config_or_list_options(tmp_path):
    check_exit_2(run_cli("pretrain", cwd=tmp_path), "llmstack pretrain needs a CONFIG file (or --list-options)")

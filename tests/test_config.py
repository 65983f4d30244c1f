"""Config schema: presets validate, precedence is defaults < YAML < CLI, bad input exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmstack.config import SCHEMAS, PretrainConfig, load_config
from llmstack.errors import ConfigError
from tests.conftest import REPO, child_env

# configs/eval/ holds llmstack-eval option files, not stage configs: checked below with its parser
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "eval")
EVAL_CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))


def schema_for(path: Path):
    # configs/<command>/*.yaml; configs/deepspeed/ holds pretrain fragments. An unknown folder is
    # an error rather than a silent fallback, so every file is checked against its own stage's schema.
    return SCHEMAS[{"deepspeed": "pretrain"}.get(path.parent.name, path.parent.name)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_yaml_in_configs_validates(path):
    cfg = load_config(schema_for(path), str(path))
    # the file's own values won (nothing silently dropped): every leaf in the YAML is in the result
    dumped = cfg.model_dump(mode="json")

    def leaves(d, prefix=()):
        for k, v in d.items():
            if isinstance(v, dict) and k != "deepspeed":
                yield from leaves(v, prefix + (k,))
            else:
                yield prefix + (k,), v

    for key, value in leaves(yaml.safe_load(path.read_text())):
        node = dumped
        for k in key:
            node = node[k]
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):  # sources: the keys written
            node = [{k: n[k] for k in v} for n, v in zip(node, value)] if len(node) == len(value) else node
        assert node == value, f"{path}: {'.'.join(key)}"


def test_precedence_defaults_yaml_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 50\n  lr: 0.01\n")
    default = PretrainConfig()
    cfg = load_config(PretrainConfig, str(f), ["train.lr=0.5"])
    assert cfg.train.max_steps == 50  # YAML beats default
    assert cfg.train.lr == 0.5  # CLI beats YAML
    assert cfg.train.micro_batch == default.train.micro_batch  # untouched default stays
    cfg = load_config(PretrainConfig, None, ["data.sources=[{path: a.jsonl, weight: 0.7}, {path: b.txt, weight: 0.3}]"])
    assert [s.weight for s in cfg.data.sources] == [0.7, 0.3]


@pytest.mark.parametrize("override,needle", [
    ("train.max_stepz=3", "train.max_stepz: unknown key (allowed here: max_steps"),
    ("modell.preset=x", "modell: unknown key"),
    ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
    ("zero.stage=5", "zero.stage: Input should be 0, 1, 2 or 3"),
    ("precision=fp8", "precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    ("model.preset=gpt5", "unknown preset 'gpt5'"),
    ("zero.offload_params=true", "zero.offload_params needs zero.stage=3"),
    ("train.betas=[2,-1]", "train.betas: each of the two betas must be in [0, 1)"),
    ("train.betas=[0.9,1.0]", "train.betas: each of the two betas must be in [0, 1)"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("train.weight_decay=.inf", "train.weight_decay: Input should be a finite number"),
    ("train.eps=0", "train.eps: Input should be greater than 0"),
    ("data.max_record_bytes=0", "data.max_record_bytes: Input should be greater than or equal to 1"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, str(REPO / "configs/pretrain/gpt-tiny.yaml"), [override])
    assert needle in str(e.value)


def test_train_compile_is_a_key_of_the_loop_stages_only():
    # ppo: the actor decodes rollouts from its own module (KV cache, a new shape per token)
    with pytest.raises(ConfigError, match="train.compile: unknown key"):
        load_config(SCHEMAS["ppo"], None, ["train.compile=true"])
    for stage in ("pretrain", "sft", "rm", "dpo"):  # these compile through the engine
        assert load_config(SCHEMAS[stage], None, ["train.compile=true"]).train.compile


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llmstack", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_and_wrong_type_exit_2(tmp_path):
    cfg = str(REPO / "configs/pretrain/gpt-tiny.yaml")
    for bad, needle in [("train.max_stepz=3", "unknown key"), ("train.lr=fast", "train.lr")]:
        p = run_cli("pretrain", cfg, bad, cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr
    p = run_cli("pretrain", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert p.returncode == 2 and "config file not found" in p.stderr


def test_cli_batch_arithmetic_exit_2(tmp_path):
    p = run_cli("pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), "train.global_batch=12", "--dry-run", cwd=tmp_path)
    assert p.returncode == 2
    assert "train.global_batch=12 is not divisible" in p.stderr


def test_cli_fp16_without_a_gpu_exit_2_before_any_work(tmp_path):
    """DeepSpeed has no fp16 training on CPU: refused at the start (it was a traceback after the
    tokenizer, data and model had been built), and the run directory is not created."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 trains on this machine's GPU")
    run_dir = tmp_path / "run"
    p = run_cli("pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), "precision=fp16", f"run.dir={run_dir}",
                f"tokenizer.path={tmp_path / 'no-tokenizer-yet'}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "precision=fp16 is not supported" in p.stderr and "Traceback" not in p.stderr
    assert not run_dir.exists() and not (tmp_path / "no-tokenizer-yet").exists()


def test_dry_run_prints_resolved_and_deepspeed_config(tmp_path):
    p = run_cli("pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), "train.max_steps=200", "zero.stage=3",
                "--dry-run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "max_steps: 200" in p.stdout
    assert '"stage": 3' in p.stdout and '"train_micro_batch_size_per_gpu": 8' in p.stdout
    assert "parameters" in p.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_help_on_every_command(tmp_path):
    for args in (["--help"], ["pretrain", "--help"], ["tokenizer", "train", "--help"], ["quickstart", "--help"]):
        p = run_cli(*args, cwd=tmp_path)
        assert p.returncode == 0 and "usage:" in p.stdout


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_eval_config_is_accepted_by_llmstack_eval(path):
    from eval.cli import _with_config, build_parser

    parser = build_parser()
    argv = ["--config", str(path), "--model", "m"]
    args = _with_config(parser, parser.parse_args(argv), argv)
    for key, value in yaml.safe_load(path.read_text()).items():
        got = getattr(args, key.replace("-", "_"))
        assert got == (",".join(value) if isinstance(value, list) else value), key

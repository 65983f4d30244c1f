"""First-run hygiene of the command line: light commands stay light, stdout carries results only,
a closed pipe ends a command quietly, one version, outputs under runs/ or ignored.

Each command runs as a user runs it (a subprocess), since what is imported, what reaches file
descriptor 1 and how a process ends are properties of the whole process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from llmstack.errors import UsageError
from llmstack.train.meta import CheckpointMeta
from llmstack.train.run import precheck_world_size
from tests.conftest import REPO, TINY, child_env, run_cmd

HEAVY = ("deepspeed", "transformers", "datasets", "peft", "lm_eval")

# Runs commands in one process through the entry points' main(argv) and reports, after each,
# its exit status, which heavy libraries the process has imported so far, and whether torch is.
PROBE = """
import contextlib, io, json, sys
import eval.cli, llmstack.cli
report = []
for prog, argv in json.loads(sys.argv[1]):
    main = llmstack.cli.main if prog == "llmstack" else eval.cli.main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code or 0
    report.append({"argv": [prog, *argv], "rc": rc, "err": err.getvalue()[-300:],
                   "heavy": sorted(m for m in %r if m in sys.modules), "torch": "torch" in sys.modules})
print(json.dumps(report))
""" % (HEAVY,)


def probe(commands) -> list[dict]:
    proc = run_cmd([sys.executable, "-c", PROBE, json.dumps(commands)], cwd=REPO, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_config_errors_plan_help_and_version_leave_heavy_libraries_unimported(tmp_path):
    """A bad config is refused, `plan` does its arithmetic, --help/--version/--list-options
    answer, without importing DeepSpeed, transformers or datasets (seconds each, and noise)."""
    tiny, big = str(REPO / "configs/pretrain/gpt-tiny.yaml"), str(REPO / "configs/pretrain/gpt-1.3b.yaml")
    commands = [
        ("llmstack", ["pretrain", tiny, "train.lr=abc"], 2),
        ("llmstack", ["pretrain", tiny, "nosuch.key=1"], 2),
        ("llmstack", ["sft", str(REPO / "configs/sft/gpt-tiny-demo.yaml"), "sft.nosuch=1"], 2),
        ("llmstack", ["data", "prepare", str(REPO / "configs/data/demo.yaml"), "data.num_workers=-1"], 2),
        ("llmstack", ["--help"], 0),
        ("llmstack", ["--version"], 0),
        ("llmstack", ["pretrain", "--list-options"], 0),
        ("llmstack", ["plan", big, "--gpus", "16", "--gpu-mem", "80"], 0),
        ("llmstack-eval", ["--version"], 0),
        ("llmstack-eval", ["--tasks", "demo_mc"], 2),  # no --model
    ]
    report = probe([(prog, argv) for prog, argv, _ in commands])
    for (_, _, want_rc), got in zip(commands, report):
        assert got["rc"] == want_rc, got
        assert got["heavy"] == [], f"{' '.join(got['argv'])} imported {got['heavy']}"
        if want_rc == 2:
            assert got["err"].startswith("error: ") and "Traceback" not in got["err"], got


def test_config_errors_and_help_of_every_training_command_leave_torch_unimported():
    """A bad config of any training command (a wrong type, an unknown key, a preset or field of
    each model family) is refused, and --help / --version / --list-options answer, before torch
    is imported (over a second of a two-second answer): the families' configs and presets are
    plain Python, their model modules imported only when a model is built."""
    cfg = lambda p: str(REPO / "configs" / p)  # noqa: E731
    commands = [
        ("llmstack", ["pretrain", cfg("pretrain/gpt-tiny.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["pretrain", cfg("pretrain/gpt-tiny.yaml"), "nosuch.key=1"], 2, "nosuch"),
        ("llmstack", ["pretrain", cfg("pretrain/llama-tiny.yaml"), "model.mlp=nosuch"], 2, "model.mlp"),
        ("llmstack", ["pretrain", cfg("pretrain/bert-tiny.yaml"), "model.preset=t5-tiny"], 2, "is a t5 preset"),
        ("llmstack", ["pretrain", cfg("pretrain/t5-tiny.yaml"), "model.prenorm=true"], 2, "does not apply"),
        ("llmstack", ["sft", cfg("sft/gpt-tiny-demo.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["sft", cfg("sft/lora.yaml"), "model.preset=nosuch"], 2, "unknown preset 'nosuch'"),
        ("llmstack", ["rm", cfg("rm/demo.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["dpo", cfg("dpo/demo.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["ppo", cfg("ppo/demo.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["grpo", cfg("grpo/demo.yaml"), "train.lr=abc"], 2, "train.lr"),
        ("llmstack", ["tokenizer", "train", cfg("tokenizer/bpe-demo.yaml"), "nosuch=1"], 2, "nosuch"),
        ("llmstack", ["data", "prepare", cfg("data/demo.yaml"), "data.num_workers=-1"], 2, "data.num_workers"),
        ("llmstack", ["--help"], 0, ""),
        ("llmstack", ["--version"], 0, ""),
        *(("llmstack", [command, "--help"], 0, "") for command in ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")),
        ("llmstack", ["plan", "--help"], 0, ""),
        ("llmstack", ["pretrain", "--list-options"], 0, ""),
        ("llmstack-eval", ["--version"], 0, ""),
    ]
    report = probe([(prog, argv) for prog, argv, _, _ in commands])
    for (_, _, want_rc, want_err), got in zip(commands, report):
        assert got["rc"] == want_rc, got
        assert want_err in got["err"], got
        assert not got["torch"], f"{' '.join(got['argv'])} imported torch"


def test_torch_free_configs_name_the_activations_layers_implements():
    """BertConfig validates its activation against a torch-free list of names; layers.py maps the
    same names to functions."""
    from llmstack.models import configs, layers

    assert configs.ACTIVATION_NAMES == tuple(layers.ACTIVATIONS)
    with pytest.raises(ValueError, match="unknown activation 'nosuch'"):
        configs.BertConfig(vocab_size=8, activation="nosuch")


def _checkpoint(root, step: int, **meta) -> None:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(CheckpointMeta(step=step, **meta).to_json())


def test_resume_on_another_world_size_is_refused_before_deepspeed_starts(tmp_path):
    """A run directory whose checkpoints hold ZeRO partitions of 2 processes, resumed by one:
    refused (exit 2, the reshape hint) before DeepSpeed is imported or the process group starts
    (which took from seconds to minutes: DeepSpeed's import and, on a first CPU run, its op
    build), and before the run directory is locked."""
    run_dir = tmp_path / "run"
    _checkpoint(run_dir / "checkpoints", 4, world_size=2, zero_stage=2)
    args = ["pretrain", str(REPO / "configs/pretrain/gpt-tiny.yaml"), *TINY, f"run.dir={run_dir}",
            f"tokenizer.path={tmp_path / 'tok'}"]
    [got] = probe([("llmstack", args)])
    assert got["rc"] == 2, got
    assert "holds ZeRO-2 partitions of 2 processes; this run has 1" in got["err"], got
    assert "llmstack checkpoint reshape" in got["err"]
    assert got["heavy"] == [], got
    assert not (run_dir / "run.lock").exists() and not (tmp_path / "tok").exists()


def test_world_size_precheck_refuses_only_what_every_candidate_shows(tmp_path):
    """The early check reads meta.json alone (nothing verified yet), so it refuses only when every
    checkpoint train.resume may pick is partitioned for another world size; the rest is left to
    the verified choice when the run opens."""
    root = tmp_path / "checkpoints"
    _checkpoint(root, 2, world_size=1, zero_stage=2)
    _checkpoint(root, 4, world_size=2, zero_stage=2)
    precheck_world_size("auto", root, 1)  # step_4 may not verify, and step_2 loads on 1 process
    with pytest.raises(UsageError, match="step_4 holds ZeRO-2 partitions of 2 processes; this run has 1"):
        precheck_world_size(str(root / "step_4"), root, 1)  # named explicitly: the only candidate
    precheck_world_size(str(root / "step_4"), root, 2)
    precheck_world_size("none", root, 1)
    _checkpoint(root, 6, world_size=2, zero_stage=2, universal=True)
    precheck_world_size(str(root / "step_6"), root, 1)  # universal: any world size
    _checkpoint(root, 8, world_size=2, zero_stage=0)
    precheck_world_size(str(root / "step_8"), root, 1)  # not partitioned
    shutil.rmtree(root / "step_2")
    (root / "step_10").mkdir()  # no meta.json: left to the run's verification, which names it
    precheck_world_size("auto", root, 1)
    precheck_world_size(str(tmp_path / "missing"), root, 1)


def test_generate_stdout_is_the_generated_text_only(eval_model, tmp_path):
    """`llmstack generate CKPT --prompt X > out.txt` leaves the generation in out.txt and nothing
    else: DeepSpeed's accelerator line and zero_to_fp32's consolidation log go to stderr."""
    from llmstack.train.weights import load_for_inference

    ckpt, prompts, n = str(eval_model["checkpoint"]), ["def ", "Return the"], 8
    cmd = [sys.executable, "-m", "llmstack", "generate", ckpt, "--max-new-tokens", str(n), "--temperature", "0",
           "--device", "cpu", "--dtype", "fp32", *(x for p in prompts for x in ("--prompt", p))]
    proc = run_cmd(cmd, cwd=tmp_path)
    model, tok, _ = load_for_inference(ckpt)
    want = ""
    for p in prompts:  # the model's own greedy continuation, one full forward per token
        ids, new = [tok.eos_id, *tok.encode(p)], []
        with torch.inference_mode():
            for _ in range(n):
                t = int(model(torch.tensor([ids + new]))[0, -1].float().argmax())
                if t == tok.eos_id:
                    break
                new.append(t)
        want += f"--- prompt: {p!r}\n{p}{tok.decode(new)}\n"
    assert proc.stdout == want
    assert "Processing zero checkpoint" in proc.stderr  # the ZeRO-3 checkpoint's log: moved, not gone


@pytest.mark.parametrize("command", [["-m", "llmstack", "pretrain", "--list-options"], ["-m", "eval", "--tasks", "list"]],
                         ids=["llmstack", "llmstack-eval"])
def test_closed_pipe_ends_quietly(command):
    """`llmstack pretrain --list-options | head -1`: a reader that closes the pipe early ends the
    command with status 141 (as a Unix tool stopped by SIGPIPE), no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, *command], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""


def test_version_has_one_source():
    """`llmstack --version` and `llmstack-eval --version` print llmstack.__version__, which is also
    what the package metadata is built from (pyproject.toml declares it dynamic)."""
    import llmstack

    for module in ("llmstack", "eval"):
        out = run_cmd([sys.executable, "-m", module, "--version"], cwd=REPO).stdout
        assert out == f"llmstack {llmstack.__version__}\n"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmstack.__version__"}


def test_license_is_an_spdx_expression():
    """A license table is deprecated by setuptools (a warning on every install); the SPDX string
    needs setuptools >= 77 to build."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_example_outputs_are_under_runs_or_ignored():
    """The demo configs write under runs/; what the documented commands write elsewhere at the
    repository root is ignored by git."""
    import yaml

    for cfg in sorted((REPO / "configs/data").glob("*.yaml")):
        assert yaml.safe_load(cfg.read_text())["data"]["out"].startswith("runs/"), cfg
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/shards/demo/manifest.json", "data/shards/demo/manifest.json", "hf/gpt-tiny/config.json",
             "checkpoints/imported/model.safetensors", "eval-results.json", "common-results.json", "results.json"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.split() == paths
    # and nothing that ships is: the tracked task data, the train package's checkpoint module
    proc = subprocess.run(["git", "check-ignore", "eval/tasks/data/x.jsonl", "llmstack/train/checkpoint.py"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.stdout == ""

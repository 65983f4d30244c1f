"""`llmstack quickstart`: the whole pipeline, tiny, on the builtin corpus, on CPU.

tokenizer -> pretrain -> SFT -> reward model -> PPO and DPO -> GRPO -> eval, each stage the same
code and demo config (configs/<stage>/) a user runs by hand, chained through checkpoints:

    pretrain (gpt2-tiny on the stdlib's docstrings and comments)
      -> sft  (answer "What does `json.dumps` do?" with the docstring's first paragraph)
           -> rm   (score the true summary above a wrong one)  -> ppo (actor = sft, reward = rm)
           -> dpo  (the same preference pairs, no reward model)
           -> grpo (answer "What is 3 + 4?": a verifier checks the number, no critic, no reward model)
    eval: held-out perplexity and the demo multiple-choice task for the pretrained, SFT, PPO and
          DPO models (through `llmstack-eval`, which sits above the library).

Writes OUT/report.md (a table of every stage's metrics with notes on reading them, PNG curves
under OUT/plots/ made from each run's metrics.jsonl) and OUT/report.json, prints the report and
ends with the plots' paths and, last, `report: OUT/report.md`. Starts fresh every time. `--scale` shrinks every
stage's step count (a smoke run of the wiring); the default is the demo as documented.
`--pretrain-only` stops after the tokenizer and pretraining (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmstack.config import PretrainConfig, load_config
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.stages import common, pretrain
from llmstack.stages.report import chance_level, write_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EVAL_TASKS = ("ppl:builtin:validation", "demo_mc")
EVAL_MODELS = ("pretrain", "sft", "ppo", "dpo")

# What each stage's plot panels show, with units (report.PANELS names the panels).
PLOT_LABELS = {
    "pretrain": {"loss": "loss (nats/token)"},
    "sft": {"loss": "response loss (nats/token)"},
    "rm": {"loss": "pairwise loss (nats/pair)", "margin": "reward margin, chosen - rejected (reward-model score)"},
    "ppo": {"loss": "clipped policy loss (per token)",
            "reward": "reward per response (RM score - missing-stop penalty)"},
    "dpo": {"loss": "DPO loss (nats/pair)", "accuracy": "pairwise accuracy (ties count 0.5)",
            "margin": "implicit reward margin (beta x nats)"},
    "grpo": {"loss": "clipped policy loss (per token)", "reward": "verifier reward (per completion)"},
}


def stage_table():
    from llmstack.stages import STAGES

    return STAGES


def quickstart_config(out: Path, steps: int) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "run": {"name": "quickstart-pretrain", "dir": str(out / "pretrain")},
        "tokenizer": {"path": str(out / "tokenizer"), "kind": "bpe", "vocab_size": 4096, "num_sentinels": 0},
        "model": {"preset": "gpt2-tiny"},
        "data": {"seq_len": 128},
        "train": {"max_steps": steps, "micro_batch": 16, "lr": 2e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "log_every": 10, "eval_every": 100, "eval_batches": 8,
                  "save_every": 0, "keep_last": 1, "resume": "none"},
    })


def demo_config(schema, stage: str, name: str, overrides: list[str], scale: float):
    """The stage's demo config from configs/, with the quickstart's paths and `scale` applied to
    its step count (and the evaluation cadence, so a scaled run still evaluates)."""
    path = CONFIGS / stage / name
    if not path.is_file():
        raise UsageError(f"{path} not found: the quickstart runs from a checkout of the llmstack repository")
    cfg = load_config(schema, str(path), overrides)
    if scale != 1.0:
        t = cfg.train
        t.max_steps = max(2, round(t.max_steps * scale))
        if getattr(t, "eval_every", 0):
            t.eval_every = max(1, round(t.eval_every * scale))
        t.warmup_steps = min(t.warmup_steps, t.max_steps // 2)
        if hasattr(t, "log_every"):
            t.log_every = max(1, min(t.log_every, t.max_steps // 4))
    return cfg


def banner(text: str) -> None:
    env.print0(f"\n=== quickstart: {text} ===")


def evaluate(model: str, out_json: Path) -> dict:
    """`llmstack-eval` on the quickstart's tasks, in a child process (the eval suite sits above the
    library, which never imports it). Per-sample results are logged: a multiple-choice task's
    chance level comes from its samples' choices."""
    cmd = [sys.executable, "-m", "eval", "--model", model, "--tasks", ",".join(EVAL_TASKS),
           "--output", str(out_json), "--batch-size", "16", "--no-progress", "--log-samples"]
    child = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                               "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, env=child, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation of {model} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out_json.read_text())


def task_metric(results: dict, task: str, metric: str):
    value = (results.get("tasks", {}).get(task) or {}).get(metric)
    return value.get("value") if isinstance(value, dict) else value


def run(out: str = "runs/quickstart", steps: int = 300, scale: float = 1.0, pretrain_only: bool = False) -> dict:
    if env.world_size() > 1:
        raise UsageError("the quickstart runs in one process: start it without a launcher")
    if not 0 < scale <= 1:
        raise UsageError(f"--scale must be in (0, 1], got {scale}")
    out_dir = Path(out).resolve()
    t_start = time.perf_counter()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    report: dict = {"out": str(out_dir), "scale": scale, "stages": {}}
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        report["stages"][name] = result
        return result

    banner("1/7 tokenizer + pretraining")
    cfg = quickstart_config(out_dir, steps)
    pre = timed("pretrain", pretrain.run, cfg)
    tokenizer = common.ensure_tokenizer(cfg.tokenizer, cfg.data.sources)
    from data_pipeline.stream import entropy_of_counts, token_counts

    counts = token_counts(common.source_texts(cfg.data.val_sources), tokenizer)  # each document + its EOS
    pre["val_unigram_entropy"], pre["val_tokens"] = entropy_of_counts(counts), int(counts.sum())
    pre_ckpt = str(out_dir / "pretrain" / "checkpoints" / "latest")
    pre_row = {"name": "pretrain", "run_dir": cfg.run.path, "metrics": {
        "validation loss (nats/token)": pre["final_val_loss"],
        "unigram entropy of validation corpus (nats/token)": pre["val_unigram_entropy"],
        "tokens trained": pre["tokens"], "seconds": seconds["pretrain"]}}
    intro = [
        f"Tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens (hash {tokenizer.hash}) at `{cfg.tokenizer.path}`.",
        f"Model: gpt2-tiny, pretrained {steps} steps"
        + ("." if pretrain_only else "; every later stage uses the demo config under `configs/`"
           + ("" if scale == 1.0 else f" with its steps scaled by {scale}") + "."),
    ]
    if pretrain_only:
        report["seconds"] = {**seconds, "total": round(time.perf_counter() - t_start, 1)}
        return _finish(out_dir, report, intro, [pre_row])

    ckpts, cfgs, results = {"pretrain": pre_ckpt}, {}, {}
    later = (  # (command, title, demo config, overrides naming earlier stages' checkpoints)
        ("sft", "supervised fine-tuning", "gpt-tiny-demo.yaml", ["model.init={pretrain}"]),
        ("rm", "reward model", "demo.yaml", ["model.init={sft}"]),
        ("ppo", "PPO against the reward model", "demo.yaml", ["actor.init={sft}", "reward.init={rm}"]),
        ("dpo", "DPO", "demo.yaml", ["model.init={sft}"]),
        ("grpo", "GRPO on arithmetic, rewarded by a verifier", "demo.yaml", ["actor.init={sft}"]),
    )
    for i, (name, title, file, overrides) in enumerate(later, start=2):
        banner(f"{i}/7 {title}")
        stage = stage_table()[name]
        cfgs[name] = demo_config(stage.schema, name, file, [f"run.dir={out_dir / name}", "train.resume=none",
                                                            *(o.format(**ckpts) for o in overrides)], scale)
        results[name] = timed(name, stage.run, cfgs[name])
        ckpts[name] = str(out_dir / name / "checkpoints" / ("actor" if name == "ppo" else "") / "latest")
    sft, rm, ppo, dpo, grpo = (results[k] for k in ("sft", "rm", "ppo", "dpo", "grpo"))

    banner("7/7 evaluation")
    evals = {}
    t0 = time.perf_counter()
    for i, name in enumerate(EVAL_MODELS, start=1):  # a child process each: progress between them
        t1 = time.perf_counter()
        evals[name] = evaluate(ckpts[name], out_dir / "eval" / f"{name}.json")
        now = time.perf_counter()
        print(f"eval {i}/{len(EVAL_MODELS)}: {name} ({', '.join(EVAL_TASKS)}) in {now - t1:.1f} s, "
              f"{(now - t0) / i:.1f} s/model, eta {(now - t0) / i * (len(EVAL_MODELS) - i):.0f}s",
              file=sys.stderr, flush=True)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    chance = {task: chance_level(res) for task, res in evals["pretrain"]["tasks"].items()}
    chance = {task: c for task, c in chance.items() if c is not None}  # the multiple-choice tasks
    for res in evals.values():  # the per-sample records stay in eval/<model>.json
        for task_result in res["tasks"].values():
            task_result.pop("samples", None)
    report["stages"]["eval"] = evals
    report["seconds"] = {**seconds, "total": round(time.perf_counter() - t_start, 1)}

    ppl_task = EVAL_TASKS[0]
    stages = [
        pre_row,
        {"name": "sft", "run_dir": cfgs["sft"].run.path, "metrics": {
            "response loss before -> after (nats/token)": f"{sft['val_loss_before']:.4f} -> {sft['val_loss_after']:.4f}",
            "supervised tokens": sft["supervised_tokens"], "skipped records": sft["skipped_records"],
            "seconds": seconds["sft"]}},
        {"name": "rm", "run_dir": cfgs["rm"].run.path, "metrics": {
            "held-out pairwise accuracy before -> after": f"{rm['val_accuracy_before']:.3f} -> {rm['val_accuracy']:.3f}",
            "held-out reward margin": rm["val_margin"], "seconds": seconds["rm"]}},
        {"name": "ppo", "run_dir": cfgs["ppo"].run.path, "metrics": {
            "mean reward first -> last steps": f"{ppo['reward_first']:.3f} -> {ppo['reward_last']:.3f}",
            "KL to reference (last, max)": f"{ppo['kl_last']:.4f}, {ppo['kl_max']:.4f}",
            "time per step generate / score / train (s)":
                f"{ppo['time_generate']:.2f} / {ppo['time_score']:.2f} / {ppo['time_train']:.2f}",
            "seconds": seconds["ppo"]}},
        {"name": "dpo", "run_dir": cfgs["dpo"].run.path, "metrics": {
            "held-out accuracy before -> after (a tie counts 0.5)":
                f"{dpo['val_accuracy_before']:.3f} -> {dpo['val_accuracy']:.3f}",
            "held-out tied pairs before -> after": f"{dpo['val_ties_before']:.1%} -> {dpo['val_ties']:.1%}",
            "held-out implicit reward margin before -> after": f"{dpo['val_margin_before']:.4f} -> {dpo['val_margin']:.4f}",
            "seconds": seconds["dpo"]},
         "notes": ["DPO accuracy: the fraction of held-out pairs whose chosen answer gets the higher implicit "
                   "reward beta log(pi/pi_ref). A pair whose two rewards are equal is a tie and counts 0.5, "
                   "neither a win nor a loss: before training the policy is the reference, so every pair ties "
                   "and accuracy is 0.5, the level of a guess."]},
        {"name": "grpo", "run_dir": cfgs["grpo"].run.path, "metrics": {
            "mean verifiable reward first -> last steps": f"{grpo['reward_first']:.3f} -> {grpo['reward_last']:.3f}",
            "max sampler vs trainer log-prob gap": f"{grpo['logp_gap_max']:.2e}", "seconds": seconds["grpo"]}},
        {"name": "eval", "run_dir": None, "metrics": {
            **{f"{name}: held-out token perplexity": task_metric(r, ppl_task, "perplexity") for name, r in evals.items()},
            **{f"{name}: {task} acc / acc_norm (chance level)": f"{task_metric(r, task, 'acc'):.3f} / "
               f"{task_metric(r, task, 'acc_norm'):.3f} ({c:.3f})" for task, c in chance.items()
               for name, r in evals.items()},
            "seconds": seconds["eval"]},
         "notes": eval_notes(evals, ppl_task, chance)},
    ]
    return _finish(out_dir, report, intro, stages)


def eval_notes(evals: dict, ppl_task: str, chance: dict[str, float]) -> list[str]:
    """What the eval rows mean: chance levels, and why held-out perplexity rises after SFT."""
    notes = [f"Chance level of {task}: 1 / (number of choices) averaged over its samples, {c:.3f}; an accuracy "
             "near it is no better than guessing." for task, c in chance.items()]
    ppl = {name: task_metric(r, ppl_task, "perplexity") for name, r in evals.items()}
    if all(isinstance(v, (int, float)) for v in ppl.values()) and ppl["sft"] > ppl["pretrain"]:
        notes.append(
            f"Perplexity is measured on held-out pretraining text ({ppl_task}). It rises after SFT "
            f"({ppl['pretrain']:.1f} -> {ppl['sft']:.1f}) because the SFT model is fine-tuned on another "
            "distribution, chat-formatted questions and answers, so held-out pretraining text becomes less "
            "likely under it. This is expected, not a regression: what SFT improves is the response loss in the "
            "sft rows. PPO and DPO start from the SFT model, so the same holds for them.")
    return notes


def shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when under it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _finish(out_dir: Path, report: dict, intro: list[str], stages: list[dict]) -> dict:
    intro = [*intro, f"Wall time: {report['seconds']['total']} s in total."]
    for stage in stages:
        stage.setdefault("plot_labels", PLOT_LABELS.get(stage["name"]))
    path = write_report(out_dir, "llmstack quickstart", intro, stages)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(path.read_text())
    plots = sorted((out_dir / "plots").glob("*.png"))
    if plots:
        print("plots: " + ", ".join(shown(p) for p in plots))
    print(f"report: {shown(path)}", flush=True)  # the last line: where to look
    return report

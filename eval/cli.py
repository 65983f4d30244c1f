"""`llmstack-eval`: evaluate a checkpoint on perplexity and few-shot tasks.

    llmstack-eval --model runs/gpt-tiny/checkpoints/latest --tasks ppl:builtin:validation,demo_mc --num-fewshot 5
    llmstack-eval --model hf/gpt-tiny --tasks eval/tasks/my_task.yaml --output results.json
    deepspeed --num_gpus 8 --module eval --model ... --tasks ...      (data-parallel; also torchrun / accelerate launch -m eval)
    llmstack-eval harness --model llmstack --model_args checkpoint=runs/... --tasks hellaswag

Tasks: builtin task names (`--tasks list` shows them), task YAML files, and `ppl:SOURCE`
(perplexity of a text source, each document on its own by default, as the harness's
loglikelihood_rolling; `--ppl-mode stream` for one concatenated stream). The model is a checkpoint
of any ZeRO stage, a consolidated or imported directory, or a Hugging Face directory of a family
llmstack imports (GPT-2, Llama, Qwen2/3, Mistral, Phi-3, GPT-NeoX / Pythia, Gemma 2/3); llmstack T5 (loglikelihood, multiple choice, generation) and BERT (pseudo-perplexity)
models too. Chat models: --apply-chat-template. Prints a table; `--output`
writes the results JSON (config, model and tokenizer hashes, metrics with standard errors,
per-sample log-likelihoods with `--log-samples`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmstack.cli import VERSION, entry_point
from llmstack.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmstack-eval", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=VERSION)
    p.add_argument("--config", help="YAML file of these options (keys as the option names, e.g. num_fewshot); "
                                    "options on the command line override it")
    p.add_argument("--model", help="checkpoint (step_N, checkpoints/latest, run dir), consolidated, "
                                                  "imported or Hugging Face directory")
    p.add_argument("--tasks", help="comma-separated: task names, task .yaml files, ppl:SOURCE; "
                                                  "'list' shows the builtin tasks")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's, else 0)")
    p.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot sampler (default 1234, "
                                                                  "as lm-evaluation-harness)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass; results do not depend on it")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="bos", action="store_true", default=None, help="BOS before every context")
    bos.add_argument("--no-bos", dest="bos", action="store_false",
                     help="no BOS (default: as the model was trained, data.bos; off for HF directories)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples of each task")
    p.add_argument("--truncate", choices=["error", "left"], default="error",
                   help="a prompt longer than the model's context: error (default) or drop tokens from the left "
                        "(counted in the results)")
    p.add_argument("--context", "--seq-len", dest="context", type=int,
                   help="ppl: window length (default: the training sequence length, else the model's context)")
    p.add_argument("--stride", type=int, help="ppl: window advance (default: the window length)")
    p.add_argument("--ppl-mode", choices=["document", "stream"], default="document",
                   help="ppl: document (default) scores each document alone after BOS (EOS without one), as "
                        "lm-evaluation-harness's loglikelihood_rolling (wikitext); stream scores the documents "
                        "concatenated, each after the previous ones, as in packed training (--bos applies here only)")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded with the model)")
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the model runs: auto (default) = the GPU when CUDA is available (each rank of a "
                        "launch on cuda:LOCAL_RANK), else cpu; an explicit cuda without a GPU exits 2")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights and activations: auto (default) = bf16 on a GPU, fp32 on CPU; fp16 needs a GPU. "
                        "Log-softmax is in fp32 whatever the dtype; the results record device and dtype")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the model's chat template (its tokenizer's), few-shot examples and "
                        "system text as messages, as lm-evaluation-harness's --apply_chat_template")
    p.add_argument("--fewshot-as-multiturn", nargs="?", const=True, default=None, type=_flag, metavar="BOOL",
                   help="with --apply-chat-template: each few-shot example its own user/assistant turns (default "
                        "on with a chat template, as the harness; 'false': all in one user message)")
    p.add_argument("--system-instruction", metavar="TEXT",
                   help="text before the task's description: the system message under a chat template, else the "
                        "start of the prompt (as the harness's --system_instruction)")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="per-sample contexts, log-likelihoods, generations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    return p


def _flag(value) -> bool:
    """true/false (also yes/no, 1/0) of an option that takes an optional boolean."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _config_flag(name: str, value):
    """An optional boolean option's value, which --config may give as text."""
    try:
        return value if value is None else _flag(value)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--{name.replace('_', '-')}: {e}") from None


def _with_config(parser: argparse.ArgumentParser, args, argv: list[str]):
    """Fill options from --config (defaults < config file < command line); --model and --tasks required."""
    if args.config:
        import yaml

        try:
            cfg = yaml.safe_load(open(args.config)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"--config {args.config}: {e}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {args.config}: expected a mapping of options")
        known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "local_rank")}
        given = {a.dest for a in parser._actions for o in a.option_strings if any(x.split("=")[0] == o for x in argv)}
        for key, value in cfg.items():
            dest = key.replace("-", "_")
            if dest not in known:
                raise UsageError(f"--config {args.config}: unknown option {key!r} (allowed: {', '.join(sorted(known))})")
            if dest not in given:
                if dest == "tasks" and isinstance(value, list):
                    value = ",".join(value)
                setattr(args, dest, value)
    for need in ("model", "tasks"):
        if not getattr(args, need):
            raise UsageError(f"--{need} is required (on the command line or in --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    # stdout for the results only (DeepSpeed's output to stderr), a closed pipe ends it quietly
    return entry_point(_main, argv)


def _main(argv: list[str] | None) -> int:
    entry = argv is None  # the process's own command, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "harness":
        from eval.harness import run_harness

        return run_harness(argv[1:])
    if "--tasks" in argv and argv[argv.index("--tasks") + 1:][:1] == ["list"] or argv[:1] == ["list"]:
        from eval.taskspec import builtin_task_files

        for name, f in builtin_task_files().items():
            print(f"{name:<24} {f}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _with_config(parser, args, argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from eval.evaluator import evaluate, print_table
    from llmstack.distributed import env

    try:
        results = evaluate(args.model, args.tasks.split(","), num_fewshot=args.num_fewshot,
                           fewshot_seed=args.fewshot_seed, batch_size=args.batch_size, bos=args.bos, limit=args.limit,
                           log_samples=args.log_samples, truncate=args.truncate, context=args.context,
                           stride=args.stride, ppl_mode=args.ppl_mode, tokenizer=args.tokenizer, dtype=args.dtype,
                           device=args.device, progress=not args.no_progress,
                           apply_chat_template=bool(args.apply_chat_template),
                           fewshot_as_multiturn=_config_flag("fewshot_as_multiturn", args.fewshot_as_multiturn),
                           system_instruction=args.system_instruction)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.is_main():
        print_table(results)
        tp = results["throughput"]
        if tp["tokens_per_s"]:
            print(f"{tp['seconds']:.1f} s, {tp['tokens_per_s']:,.0f} tokens/s through the model", flush=True)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "w") as f:
                f.write(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.output}")
    if entry:
        env.exit_after_group(0)  # does not return if a process group was started (see there why)
    env.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

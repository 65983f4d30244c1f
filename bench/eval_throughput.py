#!/usr/bin/env python
"""Multiple-choice evaluation throughput: llmstack-eval against lm-evaluation-harness (HF backend).

Both sides evaluate the same exported model on the same task in one run: a randomly initialised
llmstack model of --preset, exported to a Hugging Face directory (with a BPE tokenizer trained on
the builtin corpus, or --tokenizer), and demo_mc written out as a local JSONL task that the
harness loads with `dataset_path: json`. The figure is *scored tokens per second*: the tokens of
every (context, continuation) request, as a one-request-per-row evaluation processes them,
divided by the wall time of the evaluation (model loading excluded; task building included on
both sides). Our engine computes a shared context once for all choices, so it gets through the
same requests with fewer forward tokens.

Timings are medians of --reps alternating repetitions, side by side in one run; the accuracies
of both sides are printed too (they agree). On a shared machine read the ratio, not the
absolute numbers.

  python bench/eval_throughput.py                     # gpt2-tiny, 5-shot, 100 samples, CPU
  python bench/eval_throughput.py --preset gpt2-small --num-fewshot 3 --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TASK = """task: bench_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {test}, train: {train}}}}}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
fewshot_delimiter: "\\n"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Scored tokens/s of multiple-choice evaluation: llmstack-eval vs "
                                "lm-evaluation-harness --model hf, same exported model and task.")
    p.add_argument("--preset", default="gpt2-tiny", help="a gpt preset (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train a 4k BPE on the builtin corpus)")
    p.add_argument("--num-fewshot", type=int, default=5)
    p.add_argument("--limit", type=int, default=100, help="samples of demo_mc (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def build(args, tmp: Path) -> tuple[Path, Path]:
    """(HF model dir, task dir)."""
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
    from eval.demo import demo_mc
    from llmstack import models
    from llmstack.stages.export import export

    tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tok"
    if not args.tokenizer:
        from data_pipeline.sources import builtin_texts

        train_tokenizer(builtin_texts("train"), tok_dir, kind="bpe", vocab_size=4096, num_sentinels=0,
                        max_chars=3_000_000)
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = models.build_config("gpt", args.preset, tok.vocab_size, dropout=0.0)
    model = models.build_model("gpt", cfg)
    model.init_weights()
    native = tmp / "native"
    native.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and cfg.tie_embeddings)}, str(native / "model.safetensors"))
    info = {"model_family": "gpt", "model": models.config_dict(cfg), "tokenizer_hash": tok.hash,
            "tokenizer_path": str(tok_dir)}
    (native / "llmstack_model.json").write_text(json.dumps(info))
    hf_dir = tmp / "hf"
    export(str(native), str(hf_dir))
    task_dir = tmp / "task"
    task_dir.mkdir()
    for split, n in (("test", args.limit), ("train", 50)):
        with open(task_dir / f"{split}.jsonl", "w") as f:
            for d in demo_mc(split)[:n]:
                f.write(json.dumps(d) + "\n")
    (task_dir / "bench_mc.yaml").write_text(TASK.format(test=task_dir / "test.jsonl", train=task_dir / "train.jsonl"))
    return hf_dir, task_dir


def request_tokens(hf_dir: Path, task_dir: Path, shots: int) -> int:
    """Tokens of all (context, continuation) requests, one row each (the numerator of both sides)."""
    from eval.evaluator import load_model
    from eval.engine import Scorer
    from eval.taskspec import load_spec, prepare

    model, tok, _ = load_model(str(hf_dir))
    spec, f = load_spec(str(task_dir / "bench_mc.yaml"))
    prep = prepare(spec, f.parent, shots, 1234)
    pairs = [(c, " " + ch) for c, chs in zip(prep.contexts, prep.choices) for ch in chs]
    scorer = Scorer(model, tok, progress=False)
    reqs, _ = scorer.fit(scorer.encode_pairs(pairs, False), [""] * len(pairs), "left")
    return sum(len(c) + len(k) for c, k in reqs)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.evaluator import evaluate

    with tempfile.TemporaryDirectory() as d:
        hf_dir, task_dir = build(args, Path(d))
        n_tokens = request_tokens(hf_dir, task_dir, args.num_fewshot)
        theirs_lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
        tm = TaskManager(include_path=str(task_dir))
        times = {"llmstack-eval": [], "lm-eval hf": []}
        accs = {}
        for rep in range(args.reps):
            t0 = time.perf_counter()
            ours = evaluate(str(hf_dir), [str(task_dir / "bench_mc.yaml")], num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size, truncate="left", bos=False, progress=False)
            times["llmstack-eval"].append(ours["throughput"]["seconds"])
            accs["llmstack-eval"] = (ours["tasks"]["bench_mc"]["acc"], ours["tasks"]["bench_mc"]["acc_norm"])
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(model=theirs_lm, tasks=["bench_mc"], num_fewshot=args.num_fewshot,
                                          batch_size=args.batch_size, task_manager=tm, verbosity="ERROR")
            times["lm-eval hf"].append(time.perf_counter() - t0)
            r = res["results"]["bench_mc"]
            accs["lm-eval hf"] = (r["acc,none"], r["acc_norm,none"])
        print(f"\n{args.preset}, demo_mc {args.limit} samples x 4 choices, {args.num_fewshot}-shot, batch "
              f"{args.batch_size}, {torch.get_num_threads()} threads; {n_tokens:,} request tokens")
        print(f"{'':<16} {'median s':>9} {'tokens/s':>10} {'acc':>7} {'acc_norm':>9}")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in times:
            print(f"{k:<16} {med[k]:9.2f} {n_tokens / med[k]:10,.0f} {accs[k][0]:7.3f} {accs[k][1]:9.3f}")
        print(f"speed-up: {med['lm-eval hf'] / med['llmstack-eval']:.2f}x")


if __name__ == "__main__":
    main()

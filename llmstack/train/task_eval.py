"""Evaluation on eval tasks during training (`train.eval_tasks`): the training model itself,
scored by the eval suite at the validation cadence and logged next to the loss.

Why this module imports `eval`: DESIGN.md orders the packages data_pipeline <- llmstack <- eval,
and the eval suite's scoring engine (eval/engine.py Scorer, eval/taskspec.py specs, the task
runners of eval/evaluator.py) is what `llmstack-eval` runs. Scoring tasks inside a training run
needs that very engine on the live model: a second implementation in llmstack would drift from
`llmstack-eval`, and calling `llmstack-eval` on saved checkpoints would reload the weights from
disk. So this one module, and no other, reaches up into `eval`, and only lazily: the imports sit
inside its functions and run only when train.eval_tasks is set, so a run without eval tasks (and
everything else in llmstack) never imports the eval suite. tests/test_imports.py names this file
as the single exception to the rule.

What happens:
- at the start of the stage (`start`), before the tokenizer, the model or the data are built,
  every task spec is loaded and its data prepared once (eval.taskspec load_spec / prepare,
  `ppl:SOURCE` texts read): a bad task name or task file exits 2 there. Once the tokenizer and the
  architecture are known (`TaskEval.check`), every prompt is tokenized and checked against the
  model's context (a dry run of the task runners without the model), so a prompt too long for
  the model also exits 2 before training, not at the first evaluation.
- `ppl:SOURCE` is scored as `llmstack-eval` scores it by default (--ppl-mode document: each
  document alone, in windows of min(data.seq_len, the model's context) tokens; eval/perplexity.py's
  rolling_loglikelihoods and text_metrics), from the texts read at the start.
- each evaluation scores the engine's own module: no reload from disk, no copy of the weights.
  The module runs in eval mode (restored to train mode afterwards), in the dtype the engine holds
  it (a bf16 engine's weights are its fp32 master weights rounded to bf16, as `llmstack-eval
  --dtype bf16` rounds the saved ones), under the engine's torch autocast setting when its
  DeepSpeed config enables one.
- ZeRO 0-2: every rank holds the whole model, so the Scorer splits the rows across ranks and
  gathers the results (distributed=True). ZeRO-3: the parameters are partitioned and gathered
  inside each module's forward, a collective every rank must join in the same order; split rows
  would give ranks different numbers of forwards (a hang, or mismatched gathers). So under ZeRO-3
  every rank scores every row (distributed=False): the same forwards everywhere, the same results
  on every rank, the evaluation's compute not divided by the world size. The Scorer calls
  `model.hidden_states` (wte, wpe, the blocks and ln_f each run through their own forward, whose
  ZeRO-3 hooks gather their parameters; the GPT root owns no parameter and reads wte.weight only
  for its device) and `model.lm_head` (the LMHead module's forward gathers its weight, tied to
  wte's or not): every parameter used is gathered by the hooks. Afterwards
  `engine.empty_partition_cache()` releases whatever the hooks left gathered.
- the metrics are logged as eval/<task>/<metric> (the task as `llmstack-eval` names it in its
  results, e.g. eval/demo_mc/acc_norm, eval/ppl:builtin:validation/perplexity; standard errors and
  counts left out) in the validation record of metrics.jsonl, with a console line of their own.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from llmstack.distributed import env
from llmstack.errors import UsageError

FEWSHOT_SEED = 1234  # llmstack-eval's default --fewshot-seed
TRUNCATE = "error"  # llmstack-eval's default --truncate: a too-long prompt is an error (found by `check`)
# result fields that describe the evaluation rather than measure the model (not logged)
BOOKKEEPING = {"n_samples", "num_fewshot", "fewshot_seed", "bos", "truncated", "hit_max_gen_toks", "tokens_scored",
               "documents", "bytes", "words", "context", "stride"}


@dataclass
class _Task:
    name: str  # the results' name: the spec's `task`, or ppl:SOURCE
    prep: object | None = None  # eval.taskspec.Prepared (None for ppl)
    texts: list[str] | None = None  # ppl: the source's documents
    context: int = 0  # ppl: window length (set by `check`)


def start(t) -> TaskEval | None:
    """The run's eval tasks (`t`: the train section), loaded and prepared; None when
    train.eval_tasks is empty (and then nothing of the eval suite is imported)."""
    if not getattr(t, "eval_tasks", None):
        return None
    return TaskEval(t.eval_tasks, limit=t.eval_tasks_limit, fewshot=t.eval_tasks_fewshot)


class TaskEval:
    """Eval tasks prepared once (see the module docstring): `check` before the model exists,
    then `evaluate(engine, zero_stage)` at every evaluation."""

    def __init__(self, names: list[str], *, limit: int | None, fewshot: int | None):
        from eval.perplexity import load_texts
        from eval.taskspec import load_spec, prepare

        self.tasks: list[_Task] = []
        for given in names:
            try:
                if given.startswith("ppl:"):
                    task = _Task(given, texts=load_texts(given[4:]))
                else:
                    spec, file = load_spec(given)
                    task = _Task(spec.task, prep=prepare(spec, file.parent, fewshot, FEWSHOT_SEED, limit))
            except UsageError as e:
                raise UsageError(f"train.eval_tasks: {e}") from None
            if any(t.name == task.name for t in self.tasks):
                raise UsageError(f"train.eval_tasks: task {task.name} is listed twice")
            self.tasks.append(task)
        self.tokenizer, self.bos, self.batch_size = None, False, 8
        self._scorers: dict[int, object] = {}

    def check(self, tokenizer, arch, *, seq_len: int | None, bos: bool, batch_size: int) -> None:
        """Tokenize every task for this tokenizer and architecture (a GPTConfig) and run the task
        runners without weights (every log-probability 0): a prompt the model cannot take is a
        UsageError now, before training. `seq_len`: the training sequence length (ppl windows:
        min(seq_len, the model's context), as llmstack-eval reads it from the checkpoint); `bos`:
        data.bos of the run; `batch_size`: rows per forward of the evaluations."""
        from llmstack.models.gpt import GPT

        if bos and tokenizer.bos_id is None:
            raise UsageError(f"train.eval_tasks: data.bos is set but the tokenizer {tokenizer.path} has no BOS token")
        self.tokenizer, self.bos, self.batch_size = tokenizer, bos, batch_size
        for task in self.tasks:
            task.context = min(seq_len or arch.max_seq_len, arch.max_seq_len)
        with torch.device("meta"):
            shapes = GPT(arch)  # the class and config the runners read, without memory for weights
        dry = _dry_scorer(shapes, tokenizer)
        try:
            self._run(dry)
        except UsageError as e:
            raise UsageError(f"train.eval_tasks: {e}") from None

    def evaluate(self, engine, zero_stage: int) -> dict[str, float]:
        """{eval/<task>/<metric>: value} of the engine's model now (every rank, collectively)."""
        from eval.engine import Scorer

        if self.tokenizer is None:
            raise RuntimeError("TaskEval.check must run before evaluate")
        scorer = self._scorers.get(id(engine))
        if scorer is None:
            # ZeRO-3: every rank scores every row (the same forwards everywhere, see the module docstring)
            scorer = self._scorers[id(engine)] = Scorer(
                engine.module, self.tokenizer, batch_size=self.batch_size, device=env.device(), progress=False,
                distributed=zero_stage != 3)
        was_training = engine.module.training
        engine.eval()
        t0 = time.perf_counter()
        try:
            with _autocast(engine):
                results = self._run(scorer)
        finally:
            if zero_stage == 3:
                engine.empty_partition_cache()  # nothing stays gathered after the evaluation
            if was_training:
                engine.train()
        out = {f"eval/{name}/{k}": float(v) for name, res in results.items() for k, v in res.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING
               and not k.endswith("_stderr")}
        env.print0(f"eval tasks ({time.perf_counter() - t0:.1f} s): " + " | ".join(
            f"{name} " + " ".join(f"{k.rsplit('/', 1)[1]} {v:.4f}" for k, v in out.items()
                                  if k.startswith(f"eval/{name}/")) for name in results))
        return out

    def _run(self, scorer) -> dict[str, dict]:
        """{task name: results} as llmstack-eval's evaluate computes them, on `scorer`."""
        from eval import evaluator

        runners = {"multiple_choice": evaluator._multiple_choice, "loglikelihood": evaluator._loglikelihood,
                   "generate_until": evaluator._generate, "loglikelihood_rolling": evaluator._rolling}
        results = {}
        for task in self.tasks:
            if task.prep is None:
                results[task.name] = _perplexity(scorer, task)
            else:
                results[task.name] = runners[task.prep.spec.output_type](scorer, task.prep, self.bos, TRUNCATE, False)
        return results


def _perplexity(scorer, task: _Task) -> dict:
    """A ppl:SOURCE task's metrics as eval/perplexity.py's `perplexity` gives them in its default
    document mode, from the texts read once at the start."""
    from eval.perplexity import rolling_loglikelihoods, text_metrics

    lls, counts = rolling_loglikelihoods(scorer, task.texts, task.context, task.context, desc=task.name)
    nll, n = -math.fsum(lls), sum(counts)
    if n == 0:
        raise UsageError(f"task {task.name}: no text to score")
    return {"nll_per_token": nll / n, "perplexity": math.exp(nll / n), **text_metrics(-nll, task.texts)}


def _dry_scorer(model, tokenizer):
    """A Scorer that tokenizes, checks lengths and batches as the real one, but runs no model:
    every target's log-probability is 0 and every generation empty (`TaskEval.check`)."""
    from eval.engine import Scorer

    class DryScorer(Scorer):
        def score_rows(self, rows, desc: str = "") -> dict:
            return {key: (0.0, False) for row in rows for _, _, key in row.targets}

        def generate_until(self, prompts, until, max_new, where, desc: str = "", with_limit: bool = False):
            for p, w in zip(prompts, where):
                if len(p) >= self.max_len:
                    raise UsageError(f"{w}: the prompt is {len(p)} tokens, the model's context is {self.max_len}")
            texts = [""] * len(prompts)
            return (texts, [False] * len(prompts)) if with_limit else texts

    return DryScorer(model, tokenizer, device=torch.device("cpu"), progress=False, distributed=False)


def _autocast(engine):
    """The engine's torch autocast (DeepSpeed's `torch_autocast` section), as its forward applies it."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    if enabled is None or not enabled():
        return contextlib.nullcontext()
    return torch.autocast(env.device().type, dtype=engine.torch_autocast_dtype())


def with_tasks(validate: Callable[[], dict] | None, tasks: TaskEval | None, engine,
               zero_stage: int) -> Callable[[], dict] | None:
    """The Trainer's `evaluate`: the stage's validation, then the eval tasks' metrics (either may be absent)."""
    if tasks is None:
        return validate
    return lambda: {**(validate() if validate is not None else {}), **tasks.evaluate(engine, zero_stage)}

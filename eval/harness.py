"""llmstack models inside lm-evaluation-harness: the harness model `llmstack`.

    llmstack-eval harness --model llmstack --model_args checkpoint=runs/x/checkpoints/latest --tasks hellaswag

The harness discovers no plugins, so `llmstack-eval harness ARGS` registers the model class
below in the running process and then runs the harness's own command line with ARGS unchanged:
its whole task catalogue runs on our checkpoints (any ZeRO stage, consolidated on load) without
an export. model_args: checkpoint (required), tokenizer, bos (default false, as the harness's
HF backend), dtype (auto | fp32 | bf16 | fp16; auto: bf16 on a GPU, fp32 on CPU), device (auto |
cpu | cuda | cuda:N; the harness's --device too, default auto here, where the harness's own
default is cuda:0), batch_size; a model_args value wins over the harness option of that name.

The three request types are answered by our engine (eval/engine.py), with the harness's
conventions: contexts and continuations are split as `HFLM` splits them, too-long inputs lose
tokens from the left (as the harness does), `loglikelihood_rolling` scores each document after a
BOS (EOS without one) in disjoint windows of the model's context, the last one with full
context (eval/perplexity.py rolling_loglikelihoods, the rule `ppl:` and YAML tasks use too),
and `generate_until` decodes greedily until a stop string or max_gen_toks.

A task whose dataset must be downloaded from the Hugging Face Hub fails, when the Hub cannot be
reached (no network, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), with one line naming the task
and exit status 2, as do our own usage errors (a missing checkpoint, an unavailable device).
"""

from __future__ import annotations

import sys
import traceback

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.engine import Scorer
from eval.perplexity import rolling_loglikelihoods
from llmstack.errors import UsageError


@register_model("llmstack")
class LLMStackLM(LM):
    """lm-evaluation-harness model backed by an llmstack checkpoint."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, bos: bool | str = False, dtype: str = "auto",
                 batch_size: int | str = 8, device: str = "auto", **_ignored):
        super().__init__()
        from eval.evaluator import load_model

        model, tok, info = load_model(checkpoint, tokenizer, dtype, device)
        self.bos = str(bos).lower() in ("1", "true", "yes")
        bs = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> our default
        self.scorer = Scorer(model, tok, batch_size=bs, device=model.wte.weight.device, distributed=False)
        self.tok, self.info = tok, info

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """As the harness's, except that --model_args win over the harness's own options of the same
        name (its --device and --batch_size always arrive here, set or not; the harness's
        `cls(**model_args, **options)` fails on a name given in both)."""
        options = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**options, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.hash

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        reqs = self.scorer.encode_pairs(pairs, self.bos)
        reqs, _ = self.scorer.fit(reqs, [f"request {i}" for i in range(len(reqs))], truncate="left")
        return self.scorer.loglikelihood(reqs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        return rolling_loglikelihoods(self.scorer, texts, desc="loglikelihood_rolling")[0]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, until, max_new = [], [], []
        for r in requests:
            ctx, kwargs = r.args
            kwargs = dict(kwargs or {})
            stops = kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            n = int(kwargs.get("max_gen_toks", 256))
            n = max(1, min(n, self.scorer.max_len - 1))
            ids = self.tok.encode(ctx)
            if self.bos:
                ids = [self.tok.bos_id, *ids]
            prompts.append(ids[-(self.scorer.max_len - n):])  # leave room for the answer (as HFLM)
            until.append(stops)
            max_new.append(n)
        where = [f"request {i}" for i in range(len(prompts))]
        return self.scorer.generate_until(prompts, until, max_new, where, desc="generate_until")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the harness's dataset loading (datasets, huggingface_hub) raises when the Hub cannot be
    reached: datasets' ConnectionError ("Couldn't reach ... on the Hub"), whose cause is
    huggingface_hub's OfflineModeIsEnabled (offline mode set; a ConnectionError too) or a failed
    request; LocalEntryNotFoundError (a Hub file neither cached nor downloadable)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    errors: tuple[type[BaseException], ...] = (ConnectionError, LocalEntryNotFoundError)
    try:
        import requests

        errors += (requests.exceptions.ConnectionError,)
    except ImportError:
        pass
    return errors


def _offline_task_error(exc: BaseException, tasks: str | None) -> str | None:
    """The one-line message for a task that could not download its dataset, or None when `exc` is
    something else (not a network error, or not raised while a task loads its data)."""
    from lm_eval.api.task import Task

    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(isinstance(x, _network_errors()) for x in chain):
        return None
    task = None  # the task being built when it failed: the innermost Task frame
    for x in chain:
        for frame, _ in traceback.walk_tb(x.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, Task) and getattr(obj, "config", None) is not None:
                task = obj
    if task is None:
        return None
    name = getattr(task.config, "task", None) or "?"
    dataset = getattr(task.config, "dataset_path", None)
    where = f" (of --tasks {tasks})" if tasks and name not in tasks.split(",") else ""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return (f"task {name}{where} needs the network: its dataset{f' {dataset}' if dataset else ''} must be downloaded "
            f"from the Hugging Face Hub, which cannot be reached here ({reason}); run it with network access, or "
            f"with the dataset already in the datasets cache")


def _option(args: list[str], name: str) -> str | None:
    """The value of `--name V` / `--name=V` in args (the last one), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def run_harness(args: list[str]) -> int:
    """Run the harness's command line (`lm-eval ARGS`) with the `llmstack` model registered; a
    usage error or a task that needs an unreachable dataset download is one line and status 2."""
    from lm_eval.__main__ import cli_evaluate

    args = list(args)
    if _option(args, "--model") == "llmstack" and _option(args, "--device") is None:
        args += ["--device", "auto"]  # the harness's own default, cuda:0, fails where there is no GPU
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        msg = _offline_task_error(e, _option(args, "--tasks"))
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0

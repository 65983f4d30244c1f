"""llmstack models inside lm-evaluation-harness: the harness model `llmstack`.

    llmstack-eval harness --model llmstack --model_args checkpoint=runs/x/checkpoints/latest --tasks hellaswag

The harness discovers no plugins, so `llmstack-eval harness ARGS` registers the model class
below in the running process and then runs the harness's own command line with ARGS unchanged:
its whole task catalogue runs on our checkpoints (any ZeRO stage, consolidated on load) without
an export. model_args: checkpoint (required), tokenizer, bos (default false, as the harness's
HF backend), dtype (auto | fp32 | bf16 | fp16; auto: bf16 on a GPU, fp32 on CPU), device (auto |
cpu | cuda | cuda:N; the harness's --device too), batch_size.

The three request types are answered by our engine (eval/engine.py), with the harness's
conventions: contexts and continuations are split as `HFLM` splits them, too-long inputs lose
tokens from the left (as the harness does), `loglikelihood_rolling` scores each document after a
BOS (EOS without one) in disjoint windows of the model's context, the last one with full
context, and `generate_until` decodes greedily until a stop string or max_gen_toks.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from eval.engine import Scorer, rolling_rows


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

    @property
    def tokenizer_name(self) -> str:
        return self.tok.hash

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        reqs = self.scorer.encode_pairs(pairs, self.bos)
        reqs, _ = self.scorer.fit(reqs, [f"request {i}" for i in range(len(reqs))], truncate="left")
        return self.scorer.loglikelihood(reqs, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tok = self.tok
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        T = self.scorer.max_len
        rows = []
        docs = tok.encode_batch([r.args[0] for r in requests])
        for i, ids in enumerate(docs):
            rows += rolling_rows([prefix, *ids], T, T, i)
        res = self.scorer.score_rows(rows, desc="loglikelihood_rolling")
        out = [0.0] * len(docs)
        for (i, _), (lp, _) in sorted(res.items()):
            out[i] += lp
        return out

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


def run_harness(args: list[str]) -> int:
    """Run the harness's command line (`lm-eval ARGS`) with the `llmstack` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()
    return 0

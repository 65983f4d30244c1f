"""The eval suite (`llmstack-eval`): rolling perplexity, few-shot tasks from YAML specs close to
lm-evaluation-harness, batch-size-invariant scoring, data-parallel evaluation, and an adapter
that registers llmstack models with the harness.

Modules: engine (rows, batching, scoring), taskspec (YAML specs, datasets, prompts), evaluator
(`evaluate()`), perplexity (`ppl:SOURCE`), metrics, demo (offline builtin datasets), harness
(the lm-evaluation-harness model `llmstack`), cli.
"""

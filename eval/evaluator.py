"""`evaluate(model, tasks)`: load a model, run each task, return the results dict (as in the JSON).

Stated choices (all written into the results): BOS before every context (default: whatever the
model was trained with, `data.bos` of its run; off for a Hugging Face directory, as the harness's
HF backend does), the few-shot count and seed, and the normalisations: `acc_norm` divides each
choice's log-likelihood by the UTF-8 byte length of the choice text (lm-evaluation-harness's
`acc_norm` divides by characters, reported here as `acc_chars`; equal for ASCII text), and the
device and dtype the model ran in (default auto: this rank's GPU in bf16 when CUDA is available,
else the CPU in fp32; log-softmax is in fp32 whatever the dtype, see engine.py).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval import metrics as M
from eval.engine import Scorer
from eval.perplexity import rolling_loglikelihoods, text_metrics
from eval.taskspec import load_spec, prepare
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.generate import DTYPE_NAMES, check_vocab, place_model, resolve_placement
from llmstack.train.meta import CheckpointMeta

# decoder-only families: scored by engine.Scorer, ppl: by rolling windows, --bos applies
DECODERS = ("gpt", "gemma")


def load_model(path: str, tokenizer_path: str | None = None, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto"):
    """(model on `device` in `dtype`, tokenizer, info): a checkpoint of any ZeRO stage (consolidated
    on load), a consolidated or imported directory, or a Hugging Face directory of a decoder-only
    model llmstack imports natively (GPT-2, the llama lineage, GPT-NeoX, Phi-3, Gemma 2/3).
    device/dtype as --device/--dtype (auto: this rank's GPU in bf16, else the CPU in fp32)."""
    dev, dt = resolve_placement(device, dtype)
    model, tokenizer, info = _load_cpu(path, tokenizer_path, DECODERS)
    return place_model(model, dev, dt), tokenizer, info


def _load_cpu(path: str, tokenizer_path: str | None, families: tuple[str, ...] = DECODERS):
    """(model on CPU in fp32 as stored, tokenizer, info); a model of another family than
    `families` is a UsageError."""
    from llmstack.train.weights import load_for_inference

    p = Path(path)
    if not p.exists() and not (p.name == "latest" and p.parent.is_dir()):  # a PPO run's checkpoints/latest
        raise UsageError(f"model not found: {path}")
    model, tokenizer, info = load_for_inference(path, tokenizer_path)
    check_vocab(tokenizer, info, path)
    family = info.model_family
    if family not in families:
        kinds = {"gpt": "decoder-only (gpt)", "gemma": "decoder-only (gemma)", "t5": "encoder-decoder (t5)",
                 "bert": "masked-LM (bert)"}
        raise UsageError(f"{path} is a {family} model: this command scores "
                         f"{', '.join(dict.fromkeys(kinds.get(f, f) for f in families))} models")
    return model, tokenizer, info


def weights_hash(model) -> str:
    """sha256 of the weights (names, shapes and bytes, in name order), first 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _bos_default(info: CheckpointMeta) -> bool:
    return bool(info.config_value("data", "bos", default=False))


def evaluate(model_path: str, tasks: list[str], *, num_fewshot: int | None = None, fewshot_seed: int = 1234,
             batch_size: int = 8, bos: bool | None = None, limit: int | None = None, log_samples: bool = False,
             truncate: str = "error", context: int | None = None, stride: int | None = None, ppl_mode: str = "document",
             tokenizer: str | None = None, dtype: str = "auto", device: str = "auto", progress: bool = True,
             apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
             system_instruction: str | None = None) -> dict:
    """Evaluate a model on tasks; returns the results (config, model, per-task metrics).

    tasks: builtin task names (eval/tasks/*.yaml), YAML paths, or `ppl:SOURCE` (perplexity of a
    text source, eval/perplexity.py: ppl_mode "document" scores each document alone after BOS, or
    EOS without one, as the harness's loglikelihood_rolling; "stream" one concatenated stream, BOS
    as `bos`; windows of `context` tokens, default the training sequence length, else the model's
    context, advancing by `stride`, default the context). Runs data-parallel when started by a
    launcher (WORLD_SIZE > 1), each rank on cuda:LOCAL_RANK with device auto or cuda. device:
    auto | cpu | cuda | cuda:N; dtype: auto | fp32 | bf16 | fp16 (auto: bf16 on a GPU, fp32 on
    CPU; fp16 only on a GPU).
    apply_chat_template, fewshot_as_multiturn (default: on with a chat template), system_instruction:
    as lm-evaluation-harness's options of those names (see eval/taskspec.py); a chat template that
    begins with BOS is not given a second one.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if truncate not in ("error", "left"):
        raise UsageError(f"--truncate must be error or left, got {truncate!r}")
    if ppl_mode not in ("document", "stream"):
        raise UsageError(f"--ppl-mode must be document or stream, got {ppl_mode!r}")
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = apply_chat_template  # the harness's default
    elif fewshot_as_multiturn and not apply_chat_template:
        raise UsageError("--fewshot-as-multiturn needs --apply-chat-template")
    dev, dt = resolve_placement(device, dtype)
    # specs, data and prompts first: bad input fails before the model is loaded
    specs = []
    for name in filter(None, (t.strip() for t in tasks)):
        if name.startswith("ppl:"):
            specs.append((name, None))
        else:
            spec, file = load_spec(name)
            specs.append((name, prepare(spec, file.parent, num_fewshot, fewshot_seed, limit, system_instruction)))
    if not specs:
        raise UsageError("no tasks given")
    if env.world_size() > 1:
        env.init()
    model, tok, info = _load_cpu(model_path, tokenizer, (*DECODERS, "t5", "bert"))
    family = info.model_family
    if family not in DECODERS:  # what a T5 or BERT cannot run is refused before any scoring
        _check_family(family, specs, bos, ppl_mode)
    model_hash = weights_hash(model)  # of the weights as stored, whatever dtype they run in
    place_model(model, dev, dt)
    use_bos = (_bos_default(info) if bos is None else bos) if family in DECODERS else False
    if use_bos and tok.bos_id is None:
        raise UsageError(f"--bos: the tokenizer of {model_path} has no BOS token")
    task_bos = {name: use_bos for name, _ in specs}
    chat_template_hash = None
    if apply_chat_template:
        from eval.taskspec import chat_renderer

        render, template = chat_renderer(tok.path, model_path)
        chat_template_hash = hashlib.sha256(template.encode()).hexdigest()[:16]
        bos_text = tok.decode([tok.bos_id]) if tok.bos_id is not None else None
        for name, prep in specs:
            if prep is not None and prep.spec.output_type != "loglikelihood_rolling":
                prep.apply_chat(render, fewshot_as_multiturn)
                flat = [c for ctx in prep.contexts for c in (ctx if isinstance(ctx, list) else [ctx])]
                if bos_text and all(c.startswith(bos_text) for c in flat):
                    task_bos[name] = False  # the template's BOS is the one (the harness's rule too)
    scorer = _scorer_class(family)(model, tok, batch_size=batch_size, device=dev, progress=progress)
    results = {
        "model": str(model_path), "step": info.step, "model_hash": model_hash,
        "tokenizer_hash": tok.hash, "architecture": info.model,
        "config": {"tasks": [n for n, _ in specs], "num_fewshot": num_fewshot, "fewshot_seed": fewshot_seed,
                   "batch_size": batch_size, "bos": use_bos, "truncate": truncate, "dtype": DTYPE_NAMES[dt],
                   "device": str(dev), "limit": limit, "apply_chat_template": apply_chat_template,
                   "fewshot_as_multiturn": fewshot_as_multiturn, "system_instruction": system_instruction,
                   "chat_template_sha256": chat_template_hash,
                   "world_size": env.world_size(), "max_seq_len": scorer.max_len,
                   "acc_norm": "log-likelihood / UTF-8 bytes of the choice"},
        "tasks": {},
    }
    if family not in DECODERS:
        results["config"]["scoring"] = scorer.description
    t0 = time.perf_counter()
    for name, prep in specs:
        if prep is None and family == "bert":
            from eval.mlm import pseudo_perplexity

            results["tasks"][name] = pseudo_perplexity(scorer, name[4:], context, stride,
                                                       info.config_value("data", "seq_len"))
            continue
        if prep is None:
            from eval.perplexity import perplexity

            trained = info.config_value("data", "seq_len")
            ctx_len = context or min(trained or scorer.max_len, scorer.max_len)
            results["tasks"][name] = perplexity(scorer, name[4:], ctx_len, stride or ctx_len, use_bos, ppl_mode)
            continue
        spec = prep.spec
        run = {"multiple_choice": _multiple_choice, "loglikelihood": _loglikelihood,
               "generate_until": _generate, "loglikelihood_rolling": _rolling}[spec.output_type]
        res = run(scorer, prep, task_bos[name], truncate, log_samples)
        k = spec.num_fewshot if num_fewshot is None else num_fewshot
        results["tasks"][spec.task] = {"output_type": spec.output_type, "n_samples": len(prep.docs),
                                       "num_fewshot": k or 0, "fewshot_seed": fewshot_seed, "bos": task_bos[name],
                                       **res}
    elapsed = time.perf_counter() - t0
    results["throughput"] = {"seconds": elapsed, "model_seconds": scorer.seconds,
                             "tokens_per_s": scorer.tokens_scored / scorer.seconds if scorer.seconds else None}
    return results


def _scorer_class(family: str):
    """The scorer of a model family: engine.Scorer (gpt, gemma), seq2seq.Seq2SeqScorer (t5), mlm.MlmScorer (bert)."""
    if family == "t5":
        from eval.seq2seq import Seq2SeqScorer

        return Seq2SeqScorer
    if family == "bert":
        from eval.mlm import MlmScorer

        return MlmScorer
    return Scorer


def _check_family(family: str, specs, bos: bool | None, ppl_mode: str) -> None:
    """T5 runs multiple_choice, loglikelihood and generate_until tasks (eval/seq2seq.py); BERT
    runs ppl: only, as pseudo-perplexity of each document (eval/mlm.py); --bos is for gpt models."""
    from eval import mlm, seq2seq

    if bos:
        raise UsageError(f"--bos applies to decoder-only models, not to a {family} model (a T5 encoder input "
                         "gets the tokenizer's special tokens, a BERT window [CLS] and [SEP])")
    for name, prep in specs:
        kind = "ppl" if prep is None else prep.spec.output_type
        (seq2seq if family == "t5" else mlm).check_task(name, kind)
        if family == "bert" and prep is None and ppl_mode != "document":
            raise UsageError(f"task {name}: --ppl-mode {ppl_mode}: a BERT's pseudo-perplexity scores each document "
                             "alone (--ppl-mode document)")


def _metric_values(per_sample: list[dict], names: list[str]) -> dict:
    out = {}
    for m in names:
        mean, se = M.mean_and_stderr([s[m] for s in per_sample])
        out[m], out[f"{m}_stderr"] = mean, se
    return out


def _encode(scorer, pairs, where, bos, truncate):
    reqs = scorer.encode_pairs(pairs, bos)
    return scorer.fit(reqs, where, truncate)


def _multiple_choice(scorer: Scorer, prep, bos: bool, truncate: str, log_samples: bool) -> dict:
    spec = prep.spec
    pairs, where, owner = [], [], []
    for i, (ctx, chs, gold, multi) in enumerate(zip(prep.contexts, prep.choices, prep.golds, prep.multiple_input)):
        if multi:  # one context per choice, the same continuation (Winogrande)
            target = prep.target_delimiter + prep.targets[i]
            pairs += [(c, target) for c in ctx]
        else:
            pairs += [(ctx, prep.target_delimiter + c) for c in chs]
        where += [f"task {spec.task}: sample {i}"] * len(chs)
        owner += [i] * len(chs)
    reqs, truncated = _encode(scorer, pairs, where, bos, truncate)
    lls = scorer.loglikelihood(reqs, desc=spec.task)
    per_doc: list[list[float]] = [[] for _ in prep.docs]
    for i, (ll, _) in zip(owner, lls):
        per_doc[i].append(ll)
    samples = []
    for i, ll in enumerate(per_doc):
        chs, gold = prep.choices[i], prep.golds[i]
        ll_arr = np.array(ll)
        n_bytes = np.array([float(len(c.encode("utf-8"))) for c in chs])
        n_chars = np.array([float(len(c)) for c in chs])
        s = {"acc": float(np.argmax(ll_arr) == gold), "acc_norm": float(np.argmax(ll_arr / n_bytes) == gold),
             "acc_chars": float(np.argmax(ll_arr / n_chars) == gold)}
        if log_samples:
            s.update(doc_id=i, context=prep.contexts[i], choices=chs, gold=gold, loglikelihoods=ll)
        samples.append(s)
    names = [m.metric for m in spec.metrics()]
    out = {**_metric_values(samples, names), "truncated": truncated}
    if log_samples:
        out["samples"] = samples
    return out


def _loglikelihood(scorer: Scorer, prep, bos: bool, truncate: str, log_samples: bool) -> dict:
    spec = prep.spec
    # the continuation is the target as written: the harness puts no target_delimiter before it
    # here (it does for multiple-choice choices and between few-shot examples)
    pairs = [(ctx, gold) for ctx, gold in zip(prep.contexts, prep.golds)]
    where = [f"task {spec.task}: sample {i}" for i in range(len(pairs))]
    reqs, truncated = _encode(scorer, pairs, where, bos, truncate)
    res = scorer.loglikelihood(reqs, desc=spec.task)
    out = {"truncated": truncated}
    names = [m.metric for m in spec.metrics()]
    if "acc" in names:
        out.update(_metric_values([{"acc": float(g)} for _, g in res], ["acc"]))
    if "perplexity" in names:
        out["perplexity"], out["perplexity_stderr"] = M.perplexity_and_stderr([ll for ll, _ in res])
    if log_samples:
        out["samples"] = [{"doc_id": i, "context": c, "target": t, "loglikelihood": ll, "is_greedy": g}
                          for i, ((c, t), (ll, g)) in enumerate(zip(pairs, res))]
    return out


def _generate(scorer: Scorer, prep, bos: bool, truncate: str, log_samples: bool) -> dict:
    """Greedy generation until a stop string, EOS or max_gen_toks. With --truncate left a decoder's
    prompt keeps its last context - max_gen_toks tokens, so the answer has all its room (the
    harness's HF backend's rule). `hit_max_gen_toks` counts the answers that ran out of tokens
    before a stop string or EOS (max_gen_toks, or the model's context when it came first): they
    may be cut short, and a warning says how many."""
    from eval.seq2seq import Seq2SeqScorer

    spec = prep.spec
    gen = spec.generation_kwargs
    until = gen.until if gen and gen.until else [spec.fewshot_delimiter]
    max_new = gen.max_gen_toks if gen else 32
    decoder_only = not isinstance(scorer, Seq2SeqScorer)  # else an encoder-decoder: the prompt is the encoder's input
    if max_new < 1 or (decoder_only and truncate == "left" and max_new >= scorer.max_len):
        raise UsageError(f"task {spec.task}: generation_kwargs.max_gen_toks is {max_new}; it must be between 1 and "
                         f"{scorer.max_len - 1} (the model's context is {scorer.max_len} tokens)")
    ids = scorer.tokenizer.encode_batch(prep.contexts)
    if bos:
        ids = [[scorer.tokenizer.bos_id, *p] for p in ids]
    where = [f"task {spec.task}: sample {i}" for i in range(len(ids))]
    truncated = 0
    if truncate == "left":
        keep = scorer.max_len - (max_new if decoder_only else 1)
        truncated = sum(len(p) > keep for p in ids)
        ids = [p[-keep:] for p in ids]
    texts, hit = scorer.generate_until(ids, [until] * len(ids), [max_new] * len(ids), where, desc=spec.task,
                                       with_limit=True)
    n_hit = sum(hit)
    if n_hit and env.is_main():
        at_context = sum(h and decoder_only and len(p) + max_new > scorer.max_len for h, p in zip(hit, ids))
        note = (f" ({at_context} of them ran into the model's context of {scorer.max_len} tokens first)"
                if at_context else "")
        print(f"warning: task {spec.task}: {n_hit} of {len(ids)} generations reached max_gen_toks={max_new}{note}; "
              "answers may be truncated", file=sys.stderr, flush=True)
    samples = []
    for i, (text, gold) in enumerate(zip(texts, prep.golds)):
        golds = [str(g) for g in gold] if isinstance(gold, list) else [str(gold)]
        s = {}
        for m in spec.metrics():
            steps = list(m.normalize) + (["lower"] if m.ignore_case else []) + \
                (["strip_punctuation"] if m.ignore_punctuation else [])
            s[m.metric] = (M.exact_match if m.metric == "exact_match" else M.f1)(text, golds, steps)
        if log_samples:
            s.update(doc_id=i, prompt=prep.contexts[i], generation=text, gold=golds, hit_max_gen_toks=hit[i])
        samples.append(s)
    out = {**_metric_values(samples, [m.metric for m in spec.metrics()]), "truncated": truncated,
           "hit_max_gen_toks": n_hit,
           "normalization": {m.metric: m.normalize + (["lower"] if m.ignore_case else []) +
                             (["strip_punctuation"] if m.ignore_punctuation else []) for m in spec.metrics()}}
    if log_samples:
        out["samples"] = samples
    return out


def _rolling(scorer: Scorer, prep, bos: bool, truncate: str, log_samples: bool) -> dict:
    """Per-document log-likelihood (each document alone, after BOS, or EOS without one), as the
    harness's loglikelihood_rolling (perplexity.rolling_loglikelihoods, shared with `ppl:` and the
    harness model); metrics weighted by words / bytes over all documents."""
    ll, _ = rolling_loglikelihoods(scorer, prep.golds, desc=prep.spec.task)
    out = {**text_metrics(math.fsum(ll), prep.golds), "truncated": 0}
    if log_samples:
        out["samples"] = [{"doc_id": i, "loglikelihood": v} for i, v in enumerate(ll)]
    return out


def format_table(results: dict) -> str:
    """The metrics as a plain-text table (task, metric, value, standard error)."""
    lines = [f"{'task':<28} {'metric':<16} {'value':>10} {'stderr':>9}", "-" * 66]
    skip = {"n_samples", "num_fewshot", "fewshot_seed", "bos", "truncated", "hit_max_gen_toks", "tokens_scored",
            "documents", "bytes", "words", "context", "stride"}
    for task, res in results["tasks"].items():
        for k, v in res.items():
            if k in skip or k.endswith("_stderr") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            se = res.get(f"{k}_stderr")
            se_s = f"{se:9.4f}" if isinstance(se, float) and not math.isnan(se) else " " * 9
            lines.append(f"{task[:28]:<28} {k:<16} {v:10.4f} {se_s}")
    return "\n".join(lines)


def print_table(results: dict, file=None) -> None:
    print(format_table(results), file=file or sys.stdout, flush=True)  # sys.stdout as it is at the call

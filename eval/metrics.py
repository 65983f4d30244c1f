"""Per-sample metrics, their aggregation and standard errors, and answer normalisation.

Standard errors: for a mean of per-sample values, the sample standard deviation (n - 1) over
sqrt(n), as lm-evaluation-harness reports them. For a perplexity exp(-mean log-likelihood) the
delta method: se(ppl) = ppl * se(mean log-likelihood).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
NORMALISERS = ("lower", "strip_punctuation", "strip_articles", "collapse_whitespace")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def perplexity_and_stderr(logliks: list[float]) -> tuple[float, float]:
    """exp(-mean log-likelihood) over samples, with its delta-method standard error."""
    m, se = mean_and_stderr(logliks)
    ppl = math.exp(-m)
    return ppl, ppl * se


def normalise(text: str, steps: list[str]) -> str:
    """Apply the named normalisations in a fixed order (SQuAD's answer normalisation when all are on)."""
    unknown = set(steps) - set(NORMALISERS)
    if unknown:
        raise ValueError(f"unknown normalisation {sorted(unknown)} (allowed: {', '.join(NORMALISERS)})")
    if "lower" in steps:
        text = text.lower()
    if "strip_punctuation" in steps:
        text = "".join(ch for ch in text if ch not in string.punctuation)
    if "strip_articles" in steps:
        text = ARTICLES.sub(" ", text)
    if "collapse_whitespace" in steps:
        text = " ".join(text.split())
    return text


def exact_match(pred: str, golds: list[str], steps: list[str]) -> float:
    p = normalise(pred, steps)
    return float(any(p == normalise(g, steps) for g in golds))


def f1(pred: str, golds: list[str], steps: list[str]) -> float:
    """Token-overlap F1 (SQuAD), best over the gold answers; tokens are whitespace-separated."""
    best = 0.0
    p_toks = normalise(pred, steps).split()
    for g in golds:
        g_toks = normalise(g, steps).split()
        if not p_toks or not g_toks:
            best = max(best, float(p_toks == g_toks))
            continue
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common:
            prec, rec = common / len(p_toks), common / len(g_toks)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity (whitespace-separated runs)."""
    return len(re.split(r"\s+", text))

"""Eval metrics and the shipped Hub task specs, without a model: answer normalisation, F1,
standard errors, and the benchmark templates against the harness's own preprocessing."""

from __future__ import annotations

import math
import re

import pytest

from eval import metrics as M
from eval.taskspec import load_spec, resolve


def test_normalisation_exact_match_and_f1():
    steps = ["lower", "strip_punctuation", "strip_articles", "collapse_whitespace"]
    assert M.normalise("  The  Cat, sat! ", steps) == "cat sat"
    assert M.exact_match("The cat.", ["cat"], steps) == 1.0 and M.exact_match("The cat.", ["cat"], []) == 0.0
    assert M.f1("the black cat", ["a cat"], steps) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert M.f1("dog", ["cat", "dog"], steps) == 1.0 and M.f1("", ["cat"], steps) == 0.0
    with pytest.raises(ValueError, match="unknown normalisation"):
        M.normalise("x", ["stem"])


def test_stderr_and_perplexity():
    mean, se = M.mean_and_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    ppl, se = M.perplexity_and_stderr([-1.0, -3.0])
    assert ppl == pytest.approx(math.exp(2.0)) and se == pytest.approx(ppl * 1.0)


def _harness_hellaswag(text: str) -> str:  # lm-evaluation-harness's hellaswag preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def test_hub_benchmark_templates_render_like_the_harness():
    """The shipped specs turn Hub records into the harness's prompts (checked on sample records)."""
    spec, _ = load_spec("hellaswag")
    doc = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow [header] on it.",
           "ctx_b": "then", "endings": [", the man adds wax.", " [title] a person boards a lift.", "x", "y"],
           "label": "1"}
    assert resolve(spec.doc_to_text, doc, "doc_to_text", True) == _harness_hellaswag(
        doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    assert resolve(spec.doc_to_choice, doc, "doc_to_choice", True) == [_harness_hellaswag(e) for e in doc["endings"]]
    assert resolve(spec.doc_to_target, doc, "doc_to_target", True) == 1

    spec, _ = load_spec("winogrande")
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.", "option1": "Sarah",
           "option2": "Maria", "answer": "2"}
    assert resolve(spec.doc_to_text, doc, "doc_to_text", True) == 1
    assert resolve(spec.doc_to_choice, doc, "doc_to_choice", True) == [
        "Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"]
    assert resolve(spec.doc_to_target, doc, "doc_to_target", True) == "got the harder cases."

    spec, _ = load_spec("arc_challenge")
    doc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"}
    assert resolve(spec.doc_to_text, doc, "doc_to_text", True) == "Question: Which is a gas?\nAnswer:"
    assert resolve(spec.doc_to_target, doc, "doc_to_target", True) == 1

    spec, _ = load_spec("lambada_openai")
    doc = {"text": "he opened the door"}
    assert resolve(spec.doc_to_text, doc, "doc_to_text", False) + resolve(spec.doc_to_target, doc, "doc_to_target",
                                                                          False) == doc["text"]

"""Builtin datasets made from the builtin corpus, so a task runs offline on any machine.

`demo_mc` (dataset_path `llmstack:demo_mc`): sentence completion. Each sample is the start of a
sentence from the corpus (its first words) and four candidate endings: its true ending and the
endings of three other sentences. A model that learned the corpus's language prefers the true
one. Splits: `test` from the validation half of the corpus (modules never trained on),
`train` (few-shot examples) from its training half. Built deterministically: the same Python
build gives the same samples.
"""

from __future__ import annotations

import random
import re

from llmstack.errors import UsageError

SIZES = {"test": 200, "train": 50}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD_OK = re.compile(r"^[A-Za-z][A-Za-z,;'-]*$")


def _sentences(split: str):
    from data_pipeline.sources import builtin_texts

    for text in builtin_texts("validation" if split == "test" else "train"):
        for para in text.split("\n\n"):
            for s in _SENTENCE.split(" ".join(para.split())):
                words = s.split()
                # plain prose: 8-16 words, letters only (no code, paths or numbers), ending in "."
                if 8 <= len(words) <= 16 and s.endswith(".") and all(_WORD_OK.match(w) for w in words[:-1]):
                    yield words


def demo_mc(split: str) -> list[dict]:
    """{context, choices (4), label} samples for a split (`test` or `train`)."""
    if split not in SIZES:
        raise UsageError(f"demo_mc has splits {', '.join(SIZES)}, not {split!r}")
    items, seen = [], set()
    for words in _sentences(split):
        cut = len(words) // 2
        ctx, ending = " ".join(words[:cut]), " ".join(words[cut:])
        if ending.lower() in seen:
            continue
        seen.add(ending.lower())
        items.append((ctx, ending))
        if len(items) == SIZES[split]:
            break
    rnd = random.Random(f"demo_mc:{split}")
    out = []
    for i, (ctx, ending) in enumerate(items):
        others = rnd.sample([e for j, (_, e) in enumerate(items) if j != i], 3)
        label = rnd.randrange(4)
        choices = others[:label] + [ending] + others[label:]
        out.append({"context": ctx, "choices": choices, "label": label})
    return out


DATASETS = {"demo_mc": demo_mc}


def builtin_dataset(name: str, split: str, task: str) -> list[dict]:
    if name not in DATASETS:
        raise UsageError(f"task {task}: unknown builtin dataset llmstack:{name} (available: "
                         f"{', '.join('llmstack:' + d for d in DATASETS)})")
    return DATASETS[name](split)

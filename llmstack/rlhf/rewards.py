"""Rule-based rewards for `llmstack ppo reward.function=llmstack.rlhf.rewards:NAME`.

A reward function takes the prompts (the last user message of each conversation) and the
decoded responses (stop token removed), plus the keyword arguments of `reward.kwargs`, and
returns one float per response. Any importable `module:function` with that signature works.
"""

from __future__ import annotations


def contains(prompts: list[str], responses: list[str], *, target: str) -> list[float]:
    """1.0 when the response contains `target` (a substring), else 0.0."""
    return [1.0 if target in r else 0.0 for r in responses]


def count(prompts: list[str], responses: list[str], *, target: str, cap: int = 4) -> list[float]:
    """Occurrences of `target` in the response, at most `cap`, divided by cap (0..1)."""
    return [min(r.count(target), cap) / cap for r in responses]


def length(prompts: list[str], responses: list[str], *, chars: int = 80) -> list[float]:
    """-|len(response) - chars| / chars: prefers responses of about `chars` characters."""
    return [-abs(len(r) - chars) / chars for r in responses]

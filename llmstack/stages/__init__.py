"""The stages, and the table of the five training commands the CLI dispatches through.

`STAGES` maps a command (`pretrain`, `sft`, `rm`, `dpo`, `ppo`, `grpo`) to its schema and its module's
`run(cfg) -> dict` and `dry_run(cfg) -> None`. It is built on first access (a module
`__getattr__`), not when the package is imported: the stage modules import torch and DeepSpeed,
and `llmstack.stages.common` or `llmstack.stages.data` alone should not pay for that.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Stage(NamedTuple):
    schema: type  # the pydantic schema of its config (config.SCHEMAS[command])
    run: Callable[[Any], dict]
    dry_run: Callable[[Any], None]


STAGES: dict[str, Stage]  # bound by __getattr__ below on first access


def _build() -> dict[str, Stage]:
    from llmstack import config
    from llmstack.stages import dpo, grpo, ppo, pretrain, reward, sft

    modules = {"pretrain": pretrain, "sft": sft, "rm": reward, "dpo": dpo, "ppo": ppo, "grpo": grpo}
    return {name: Stage(config.SCHEMAS[name], m.run, m.dry_run) for name, m in modules.items()}


def __getattr__(name: str):
    if name == "STAGES":
        try:
            table = _build()
        except AttributeError as e:  # raised here it would read as "no attribute STAGES"
            raise ImportError(f"cannot build llmstack.stages.STAGES: {e}") from e
        globals()["STAGES"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

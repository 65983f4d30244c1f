"""The model families and how to build them: family -> config class, presets, model class.

Stages, checkpoints and export dispatch on a family name ("gpt", "bert", "t5") through this
registry instead of importing a model class, so adding a family touches one table. The configs and
presets come from the torch-free configs.py; a family's model module (torch) is imported when its
model class is first asked for, so validating a config does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, fields

from llmstack.models import configs


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_path: str  # "module:Class" of the model, imported on first use (torch)
    presets: dict[str, dict]
    default_preset: str
    objective: str  # the pretraining objective of the family

    @property
    def model_cls(self) -> type:
        module, cls = self.model_path.split(":")
        return getattr(importlib.import_module(module), cls)

    def field_names(self) -> set[str]:
        """Architecture fields of this family's config (what `model.<field>` may set)."""
        return {f.name for f in fields(self.config_cls)} - {"vocab_size", "activation_checkpointing", "pad_id"}


FAMILIES: dict[str, Family] = {
    "gpt": Family("gpt", configs.GPTConfig, "llmstack.models.gpt:GPT", configs.GPT_PRESETS, "gpt2-tiny",
                  "causal language modelling"),
    "bert": Family("bert", configs.BertConfig, "llmstack.models.bert:Bert", configs.BERT_PRESETS, "bert-tiny",
                   "masked language modelling"),
    "t5": Family("t5", configs.T5Config, "llmstack.models.t5:T5", configs.T5_PRESETS, "t5-tiny", "span corruption"),
    "gemma": Family("gemma", configs.GemmaConfig, "llmstack.models.gemma:Gemma", configs.GEMMA_PRESETS, "gemma2-tiny",
                    "causal language modelling"),
    # any other transformers causal LM, through its own class (model.backend=hf; no presets)
    "hf": Family("hf", configs.HFConfig, "llmstack.models.hf_backend:HFCausalLM", {}, "", "causal language modelling"),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (allowed: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of_preset(preset: str) -> str | None:
    """The family a preset name belongs to, or None if no family has it."""
    return next((f.name for f in FAMILIES.values() if preset in f.presets), None)


def all_presets() -> list[str]:
    return [p for f in FAMILIES.values() for p in f.presets]


def build_config(family: str, preset: str | None, vocab_size: int, **overrides):
    """The family's config dataclass from a preset plus explicit field overrides (None ignored)."""
    fam = get_family(family)
    base = dict(fam.presets[preset]) if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return fam.config_cls(vocab_size=vocab_size, **base)


def config_from_dict(family: str, arch: dict):
    """The config dataclass recorded in a checkpoint's meta (`asdict` of it); unknown keys refused."""
    fam = get_family(family)
    known = {f.name for f in fields(fam.config_cls)}
    extra = set(arch) - known
    if extra:
        raise ValueError(f"{family} architecture has unknown fields {sorted(extra)}")
    return fam.config_cls(**arch)


def build_model(family: str, cfg):
    """An (uninitialised) model of the family; call `init_weights()` or load a state dict."""
    return get_family(family).model_cls(cfg)


def family_of_config(cfg) -> str:
    """The family whose config dataclass `cfg` is."""
    for f in FAMILIES.values():
        if isinstance(cfg, f.config_cls):
            return f.name
    raise ValueError(f"{type(cfg).__name__} is not the config of a known family")


def family_of_model(model) -> str:
    for f in FAMILIES.values():  # the exact class first: a Gemma is also a GPT (it decodes as one)
        if type(model) is f.model_cls:
            return f.name
    for f in FAMILIES.values():
        if isinstance(model, f.model_cls):
            return f.name
    raise ValueError(f"{type(model).__name__} is not a model of a known family")


def config_dict(cfg) -> dict:
    return asdict(cfg)

"""LoRA adapters (Hu et al. 2021) on our models through `peft`, and merging them back.

`apply_lora` injects peft LoRA layers in place (`peft.inject_adapter_in_model`), so the model
keeps its own class, forward and checkpoint lineage; only the adapter matrices are trainable.
A targeted Linear `name` becomes `name.base_layer` (the frozen weight) plus `name.lora_A.default`
(r x in) and `name.lora_B.default` (out x r, zero at the start), computing
W x + (alpha / r) B A x. `merge_lora_state` folds a state dict of such a model back into the
plain one (W + (alpha / r) B A), which is what export, generation and `model.init` read.

Target names: any module name or suffix (`qkv`, `attn.proj`, `mlp.fc`, `blocks.0.attn.qkv`), or
the usual short names. Our attention computes q, k and v in one fused `qkv` matmul, so `q`,
`k` and `v` each select that fused projection (the adapter then covers all three); `o` selects
the attention output projection, `up` and `gate` the MLP's input projection `mlp.fc` (also fused:
[gate | up] in gated MLPs) and `down` its output projection `mlp.proj`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ADAPTER = "default"
# short names -> module-name suffixes in our GPT and Gemma (models/gpt.py, models/gemma.py: the same
# attn.qkv / attn.proj names; layers.py MLP / GatedMLP)
ALIASES = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "o": "attn.proj", "up": "mlp.fc",
           "gate": "mlp.fc", "down": "mlp.proj"}


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear modules that `targets` select; ValueError naming unmatched ones."""
    # (a model.backend=hf model: its own Linear and transformers Conv1D layers, llama-style short names)
    aliases = getattr(model, "lora_aliases", ALIASES)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    chosen: list[str] = []
    for t in targets:
        suffix = aliases.get(t, t)
        hits = [n for n in linear if n == suffix or n.endswith("." + suffix)]
        if not hits:
            short = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linear})
            raise ValueError(f"LoRA target {t!r} matches no linear layer (layers: {', '.join(short)}; "
                             f"short names: {', '.join(aliases)})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Inject LoRA adapters into `model` in place and freeze everything else; returns the adapted
    module names. The adapter A matrices draw from torch's RNG (seed before calling)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return names


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The plain state dict of a LoRA-injected model's `state`: for every adapted Linear,
    weight = base weight + scaling * B @ A (computed in float64), bias = base bias."""
    suffix_a = f".lora_A.{ADAPTER}.weight"
    out = {}
    for key, value in state.items():
        if key.endswith(suffix_a):
            prefix = key[: -len(suffix_a)]
            base = state[f"{prefix}.base_layer.weight"]
            delta = state[f"{prefix}.lora_B.{ADAPTER}.weight"].double() @ value.double()
            out[f"{prefix}.weight"] = (base.double() + scaling * delta).to(base.dtype)
        elif ".lora_B." in key or key.endswith(".base_layer.weight"):
            continue
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    return out

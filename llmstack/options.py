"""The component options of the model and the optimizer, with the config key that turns each on.

One table serves `llmstack pretrain --list-options` and the README's "Options" table (a test checks
that every row here is accepted by the config schema and appears in the README).
"""

from __future__ import annotations

# (area, option, config setting, where it is implemented / what it follows)
OPTIONS: list[tuple[str, str, str, str]] = [
    ("positions", "learned absolute (default for gpt2-*)", "model.pos=learned", "GPT-2"),
    ("positions", "sinusoidal absolute, added to embeddings", "model.pos=sinusoidal", "Vaswani et al. 2017"),
    ("positions", "rotary (default for llama-*)", "model.pos=rotary", "RoFormer; HF half-rotation layout"),
    ("positions", "ALiBi linear attention bias", "model.pos=alibi", "Press et al. 2022"),
    ("positions", "none", "model.pos=none", "causal attention alone"),
    ("attention", "full causal (default)", "model.attn_pattern=full", "SDPA causal kernel"),
    ("attention", "sliding window of w keys", "model.attn_pattern=sliding model.attn_window=64", "Mistral convention"),
    ("attention", "strided sparse (block l)", "model.attn_pattern=strided model.attn_block=16", "Child et al. 2019"),
    ("attention", "fixed sparse (block l, c summary columns)",
     "model.attn_pattern=fixed model.attn_block=16 model.attn_summary=2", "Child et al. 2019"),
    ("attention", "grouped-query / multi-query", "model.n_kv_head=2 (1: multi-query)", "GQA, MQA"),
    ("attention", "attention dropout", "model.attn_dropout=0.1", ""),
    ("norm", "LayerNorm (default for gpt2-*)", "model.norm=layernorm", ""),
    ("norm", "RMSNorm (default for llama-*)", "model.norm=rmsnorm", "Zhang & Sennrich 2019"),
    ("norm", "pre-norm (default) / post-norm", "model.norm_position=post", "post: Vaswani et al. 2017"),
    ("norm", "final norm before the LM head (default on)", "model.final_norm=false", ""),
    ("norm", "LayerScale, initial value", "model.layer_scale=0.1", "Touvron et al. 2021 (CaiT)"),
    ("mlp", "plain MLP, GELU tanh (default for gpt2-*)", "model.mlp=gelu model.activation=gelu_tanh", "GPT-2"),
    ("mlp", "plain MLP, exact GELU / ReLU / SiLU (Swish) / Mish",
     "model.activation=gelu|relu|silu|mish", "Mish: Misra 2019"),
    ("mlp", "SwiGLU (default for llama-*), 2/3 width", "model.mlp=swiglu", "Shazeer 2020"),
    ("mlp", "GEGLU, 2/3 width", "model.mlp=geglu", "Shazeer 2020"),
    ("mlp", "ReGLU, 2/3 width", "model.mlp=reglu", "Shazeer 2020"),
    ("init", "normal(init_std), GPT-2 scaled residuals (default)", "model.init_scheme=normal model.init_std=0.02",
     "GPT-2, 1/sqrt(2 n_layer)"),
    ("init", "Xavier / Glorot: var 2 / (fan_in + fan_out)", "model.init_scheme=xavier", "Glorot & Bengio 2010"),
    ("init", "Kaiming / He: var 2 / fan_in", "model.init_scheme=kaiming", "He et al. 2015"),
    ("init", "small-init embeddings U(-1e-4, 1e-4)", "model.embed_init=small", "RWKV"),
    ("optimizer", "AdamW, no decay on norms/biases/embeddings (default)", "train.optimizer=adamw",
     "Loshchilov & Hutter 2019"),
    ("optimizer", "Adam (L2 decay in the gradient)", "train.optimizer=adam", "Kingma & Ba 2015"),
    ("optimizer", "SGD with momentum", "train.optimizer=sgd train.momentum=0.9", ""),
    ("optimizer", "Adafactor (factored second moments)", "train.optimizer=adafactor", "Shazeer & Stern 2018"),
    ("optimizer", "LAMB (layer-wise trust ratio)", "train.optimizer=lamb", "You et al. 2019"),
    ("schedule", "warmup + cosine (default)", "train.schedule=cosine train.warmup_steps=10", ""),
    ("schedule", "warmup + linear decay", "train.schedule=linear", ""),
    ("schedule", "warmup + inverse square root", "train.schedule=inverse_sqrt", "Vaswani et al. 2017"),
    ("schedule", "warmup + constant", "train.schedule=constant", ""),
    ("loss", "gradient-norm clipping (0: off)", "train.grad_clip=1.0", ""),
    ("loss", "z-loss on log Z", "train.z_loss=1e-4", "PaLM"),
    ("loss", "label smoothing", "train.label_smoothing=0.1", "Szegedy et al. 2016"),
]


def overrides_of(setting: str) -> list[str]:
    """The `key=value` overrides of a table row (the first alternative where it lists several)."""
    out = []
    for word in setting.split():
        if "=" in word:
            key, value = word.split("=", 1)
            out.append(f"{key}={value.split('|')[0]}")
    return out


def format_table() -> str:
    """The table as aligned text, for the terminal."""
    w1 = max(len(r[0]) for r in OPTIONS)
    w2 = max(len(r[1]) for r in OPTIONS)
    lines = [f"{'area':<{w1}}  {'option':<{w2}}  config"]
    for area, option, setting, _ in OPTIONS:
        lines.append(f"{area:<{w1}}  {option:<{w2}}  {setting}")
    lines.append("")
    lines.append("Export to Hugging Face keeps parity for learned/sinusoidal/no positions (GPT-2), rotary with a "
                 "gated MLP and RMSNorm (LLaMA), GQA/MQA, both norms and every activation; it refuses ALiBi, "
                 "sparse/sliding patterns, post-norm, no final norm and LayerScale, naming the option.")
    return "\n".join(lines)


def markdown_table() -> str:
    """The table as Markdown, for the README."""
    rows = ["| area | option | config key | reference |", "|---|---|---|---|"]
    rows += [f"| {a} | {o} | `{s}` | {ref} |" for a, o, s, ref in OPTIONS]
    return "\n".join(rows)

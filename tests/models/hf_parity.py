"""Shared helpers of the open-model parity tests: an HF directory from a published config with
random weights, its native import, a left-padded batch, logit differences and transformers'
greedy decoding."""

from __future__ import annotations

import json

import torch
import transformers as tf

from llmstack import models
from llmstack.models import hf
from llmstack.models.layers import causal_padding_mask

V = 128  # vocabulary of every test config
T = 96  # batch length: every row crosses every case's threshold (rope scaling, window) by 16 or more


def write_published(d, config: dict, seed: int = 0, tweak=None, **load):
    """An HF directory with the published-style config.json and random weights (perturbed away
    from init, so every tensor, norm gains and biases included, matters); `tweak(model)` may
    adjust them further. Returns transformers' model loaded from it (`load`: from_pretrained kwargs)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(d), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if tweak is not None:
            tweak(model)
    model.save_pretrained(d)
    (d / "config.json").write_text(json.dumps(config, indent=2))  # the published spelling, not transformers 5's
    return tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **load).eval()


def import_native(d, family: str = "gpt"):
    got, cfg, state, _ = hf.load_pretrained(d)
    assert got == family
    ours = models.build_model(family, cfg)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    return cfg, state, ours.eval()


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, :12] = 0  # left padding (as batched inference pads)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logit_diff(ours, theirs, ids, mask, segments: bool = False) -> float:
    """Max |ours - theirs| over the real tokens; `segments`: padding as segment ids (the path of
    generate's first pass and of training) instead of the dense reference mask."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if segments:
            a = ours(ids, position_ids=pos, segment_ids=torch.where(mask.bool(), 0, -1))
        else:
            a = ours(ids, position_ids=pos, attn_mask=causal_padding_mask(mask.bool()))
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


def hf_greedy(theirs, prompts, max_new_tokens):
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    theirs.generation_config.eos_token_id = None  # run every row to max_new_tokens, as ours does
    out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=0)
    return out[:, L:].tolist()

"""What the policy-optimisation stages (ppo, grpo) share: the actor's rollouts and the reward
function they call.

- `Sampler`: responses sampled from the actor's weights with the KV-cache decoder (generate.py):
  ZeRO 0-2 decode from the actor's module itself (the same tensors, no copy); ZeRO-3 from a plain
  copy in the training dtype (`decoding_copy`), refilled once per rollout by gathering one module
  at a time (not a gather per generated token). Seeded per (seed, step, rank).
- `reward_function`: the callable a `module:function` spec names.
"""

from __future__ import annotations

import importlib

import torch

from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.generate import generate
from llmstack.models.heads import PolicyLM


def chat_stops(tokenizer) -> tuple[tuple[int, ...], int]:
    """(ids that end a response, pad id) of a chat tokenizer: (<|end|>, EOS) under llmstack's
    template; the tokenizer's EOS under its own chat template (its end-of-turn token, e.g.
    <|im_end|> or <|eot_id|>), with a pad that is never that EOS. Exit 2 without them."""
    from data_pipeline.formats import chat_tokens, check_chat_tokenizer

    try:
        how = check_chat_tokenizer(tokenizer)
        if how["template"] == "own":
            if how["eos"] is None:
                raise ValueError(f"tokenizer {tokenizer.path} has a chat template but no EOS token "
                                 "(tokenizer_config.json eos_token): a response could never end")
            pad = tokenizer.pad_id if tokenizer.pad_id not in (None, how["eos"]) else int(how["eos"] == 0)
            return (how["eos"],), pad
        chat = chat_tokens(tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return (chat["end"], chat["eos"]), tokenizer.pad_id or 0


class Sampler:
    """Rollouts of the actor engine: `sample(step, prompts)` -> responses (and the sampler's own
    log-probs of each token with `with_logprobs`)."""

    def __init__(self, actor, arch, zero_stage: int, *, seed: int, max_new_tokens: int, temperature: float,
                 end_ids, pad_id: int):
        self.actor, self.zero3 = actor, zero_stage == 3
        self.decoder = decoding_copy(arch, actor.module, env.device()) if self.zero3 else actor.module
        self.seed, self.max_new, self.temperature, self.end_ids, self.pad = (
            seed, max_new_tokens, temperature, end_ids, pad_id)

    def sample(self, step: int, prompts: list[list[int]], with_logprobs: bool = False):
        self.actor.module.eval()
        if self.zero3:
            ds.copy_full_weights(self.actor.module, self.decoder, 3)
        gen = torch.Generator(device=env.device()).manual_seed(self.seed * 1_000_003 + step * 4099 + env.rank())
        return generate(self.decoder, prompts, max_new_tokens=self.max_new, temperature=self.temperature,
                        stop_ids=self.end_ids, pad_id=self.pad, generator=gen, with_logprobs=with_logprobs)


def reward_function(spec: str):
    """The callable named by 'module:function'."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"reward.function={spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise UsageError(f"reward.function={spec} is not callable")
    return fn


def decoding_copy(arch, actor: torch.nn.Module, device) -> PolicyLM:
    """The plain model that a ZeRO-3 actor's rollouts decode from (ds.copy_full_weights fills it
    at each step): made once, on `device`, in the dtype the actor trains in, so a bf16 run keeps a
    bf16 copy (half an fp32 one) that holds the very weights the training forward uses. Built on
    the meta device and allocated in that dtype: no fp32 instance exists even briefly."""
    dtype = next(actor.parameters()).dtype  # (a partitioned ZeRO-3 parameter keeps its dtype)
    from llmstack.models.hf_backend import HFPolicyLM

    if isinstance(actor, HFPolicyLM):  # built for real: its buffers (rotary frequencies) are computed at init
        return HFPolicyLM(actor.config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        model = PolicyLM(arch).to(dtype)
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # where each parameter is registered
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((m, n))
    model.to_empty(device=device)
    for (m0, n0), *others in places.values():  # to_empty gives every place its own tensor: tie them again
        for m, n in others:
            setattr(m, n, getattr(m0, n0))
    return model.eval().requires_grad_(False)


def max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the positions where mask is 1 (0.0 when there are none)."""
    return float((a.float() - b.float()).abs().masked_fill(mask == 0, 0.0).max()) if a.numel() else 0.0


def minibatches(order: torch.Tensor, mask: torch.Tensor, prompt_len: int, micro: int,
                accum: int) -> list[list[tuple[torch.Tensor, int]]]:
    """One epoch: mini-batches of micro x accum rows in `order`, each a list of its micro-batches
    (row indices, columns to keep); a micro-batch's columns end with the longest response among
    its rows (columns that are padding in every row are dropped)."""
    out = []
    for s in range(0, len(order), micro * accum):
        rows = order[s:s + micro * accum].to(mask.device)
        out.append([(mb, prompt_len + max(1, int(mask[mb].sum(-1).max()))) for mb in rows.split(micro)])
    return out

"""KV-cache decoding for GPT (decoder-only) and T5 (encoder-decoder).

Greedy, temperature, top-k, top-p (nucleus) and repetition penalty, stop tokens, batched prompts
of different lengths, max-new-tokens. Used by `llmstack generate`, and later by PPO rollouts and eval.

How a batch of prompts is decoded:
- prompts are left-padded to one length, so every row's next token sits in the last column.
  Pad positions are hidden from attention (keys) and the real tokens get positions 0, 1, ...
  regardless of their padding (transformers' convention: position = number of real tokens
  before), so a padded row produces the same tokens as the same prompt alone.
- one forward pass over the prompts fills the KV cache (preallocated for prompt + max_new_tokens,
  so nothing is copied as it grows); then each step feeds one token per row. Only the last
  position goes through the LM head. The prompt pass gives the padding as segment ids (0 real,
  -1 pad: layers.segments_from_valid), never as a (B, 1, P, P) mask; a step's mask is the
  (B, 1, 1, S) key validity.
- T5: the encoder runs once; the decoder starts from its start token (the pad id) and its
  cross-attention keys/values are computed once, at the first step.
- a row that emits a stop token is finished: it keeps receiving pad tokens (not returned) until
  every row is finished or max_new_tokens is reached. Nothing in a step waits for the device
  (no .item() or bool() per token): finished rows are masked on the device, and the host looks
  whether all are finished only every `stop_check_every` steps.
- a GPT step runs one of three ways (STEPS): `eager` (the cached keys so far, launched op by op:
  the CPU default), `static` (fixed shapes: the whole preallocated cache under a key-validity
  mask, positions and the cache's write column as device tensors updated in place), or
  `cuda_graph` (that static step captured once per call as a CUDA graph and replayed, the CUDA
  default: a small model's step is otherwise dominated by a few hundred kernel launches). On CPU
  `static` gives the tokens of `eager` (tested) and costs more (attention over every column).

Logit processing follows transformers' order and semantics, so greedy decoding with the same
options gives the same tokens: repetition penalty (CTRL, Keskar et al. 2019: a seen token's
logit is divided by the penalty if positive, multiplied if negative), then temperature, top-k,
top-p, then sampling; temperature 0 means greedy (argmax).

Where decoding runs (`resolve_placement`, `place_model`, `sampling_generator`, shared with
`llmstack-eval`): the model's device and dtype, by default `auto` = this process's GPU in bf16
when CUDA is available, else CPU in fp32. Token ids and the KV cache follow the model; logits are
upcast to fp32 before any penalty, softmax or argmax, and sampling draws its uniform numbers on
the model's device from a generator made there (on CPU the same stream as torch.Generator(), so
seeded CPU results do not depend on this).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import torch

from llmstack.errors import UsageError
from llmstack.models.gpt import GPT
from llmstack.models.layers import KVCache, decoding_layout, segments_from_valid
from llmstack.models.t5 import T5
from llmstack.train.meta import CheckpointMeta


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool of tokens already in the context."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too); others -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability reaches p.

    A token is dropped when the tokens strictly more likely than it already hold >= p of the
    mass; the most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, *, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) next tokens from last-position logits (B, V)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return sample(logits.softmax(dim=-1), generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one draw per row of the categorical distributions `probs` (B, V), by inverting the CDF.

    One uniform number per row, where torch.multinomial draws one exponential per vocabulary entry
    (a third of a CPU decoding step at batch 16, vocabulary 8k). Exact: token i is drawn when
    cdf[i-1] <= u < cdf[i], so a token of probability 0 never is. The CDF is summed in float64.
    """
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    u = u * cdf[:, -1:]  # u < the row's total mass, so some cdf entry exceeds it
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), valid (B, L) bool) with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, L - len(p):] = True
    return ids.to(device), valid.to(device)


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    with_logprobs: bool = False,
    stop_check_every: int = 8,
    step: str = "auto",
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """The new tokens of each prompt (a stop token, when one ends the row, included).

    model: a GPT or a T5 (in eval mode). prompts: token ids, any lengths. temperature 0 is greedy.
    use_cache=False recomputes the whole sequence at every step (the reference the cache is
    tested against). generator: seeds sampling. with_logprobs: also the log-probability of each
    new token under the distribution it was sampled from (the logits, fp32, divided by the
    temperature; after a repetition penalty, before top-k / top-p): what RL stages compare with
    their training forward.
    stop_check_every: with stop tokens, how many steps apart the host looks whether every row has
    stopped (the one host sync of the loop; the tokens are the same for any value).
    step: how a GPT decoding step runs (see STEPS): `auto` is `cuda_graph` on a CUDA device when
    the model allows it, else `eager`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if stop_check_every < 1:
        raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                generator=generator)
    stop = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long)
    from llmstack.models.hf_backend import HFCausalLM, Stepper as HFStepper

    if not isinstance(model, (GPT, T5, HFCausalLM)):
        raise TypeError(f"generate supports GPT, T5 and model.backend=hf models, not {type(model).__name__}")
    dev = next(model.parameters()).device
    if generator is not None and temperature > 0 and generator.device.type != dev.type:
        raise ValueError(f"the sampling generator is on {generator.device}, the model on {dev}: "
                         f"make it with sampling_generator(device, seed)")
    step = _step_kind(model, step, dev, use_cache)
    with decoding_layout():  # CPU: faster weight layouts for one-row products (layers.Linear)
        if isinstance(model, T5):
            stepper = _T5Stepper(model, prompts, max_new_tokens, use_cache)
        elif isinstance(model, HFCausalLM):  # (its own KV cache: the eager step only)
            stepper = HFStepper(model, prompts, max_new_tokens, use_cache, pad_id)
        else:
            stepper = _GPTStepper(model, prompts, max_new_tokens, use_cache, pad_id, step)
        tokens, logprobs = _decode(stepper, max_new_tokens, stop, pad_id, opts, with_logprobs, stop_check_every)
    return (tokens, logprobs) if with_logprobs else tokens


# How a GPT decoding step (one new token per row, after the prompt) runs:
STEPS = {
    "eager": "the cached keys so far (a view that grows by one column a step), operations launched one by one",
    "static": "the same shapes at every step: attention over the whole preallocated cache with a key-validity "
              "mask, positions, mask and the cache's write column as device tensors updated in place; run eagerly "
              "(what `cuda_graph` replays; on CPU, where it costs more than `eager`, for checking)",
    "cuda_graph": "the static step captured once as a CUDA graph and replayed: one launch a step instead of a few "
                  "hundred kernel launches (CUDA only)",
}


def _static_ok(model) -> str | None:
    """Why the static step cannot run this model, or None when it can."""
    if not isinstance(model, GPT):
        return "the static decoding step is for GPT models (T5 and model.backend=hf decode eagerly)"
    c = model.config
    if c.attn_pattern != "full" or c.pos == "alibi":
        # their masks depend on the query's position, which the model works out from cache.length on the host
        return (f"the static decoding step needs full attention without ALiBi "
                f"(attn_pattern={c.attn_pattern}, pos={c.pos})")
    if model.training:
        return "the model is in training mode (dropout would be captured): call model.eval()"
    if any(hasattr(p, "ds_id") for p in model.parameters()) or \
            any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        # (a ZeRO-3 partitioned model gathers its weights in such hooks)
        return "the model has forward hooks, which a captured step would not run"
    return None


def _step_kind(model, step: str, dev: torch.device, use_cache: bool) -> str:
    if step not in ("auto", *STEPS):
        raise ValueError(f"step={step!r}: expected auto, {', '.join(STEPS)}")
    why = _static_ok(model)
    if not use_cache:
        why = why or "use_cache=False recomputes the whole sequence at every step"
    if step == "auto":
        return "cuda_graph" if dev.type == "cuda" and why is None else "eager"
    if step != "eager" and why is not None:
        raise ValueError(f"step={step}: {why}")
    if step == "cuda_graph" and dev.type != "cuda":
        raise ValueError(f"step=cuda_graph needs the model on a CUDA device, not {dev}")
    return step


def _decode(stepper, max_new_tokens: int, stop: torch.Tensor, pad_id: int, opts: dict,
            with_logprobs: bool = False, check_every: int = 8) -> tuple[list[list[int]], list[list[float]] | None]:
    """The loop shared by both model kinds: pick a token per row, feed it back, until done.

    Nothing in a step waits for the device: a row that has stopped is masked to pad on the device,
    and the host looks whether all rows have stopped only every `check_every` steps (the rows'
    extra pad tokens are cut below, so the result does not depend on it). The tokens come back in
    one transfer at the end.
    """
    logits = stepper.first()
    B, dev = logits.shape[0], logits.device
    has_stop = len(stop) > 0  # (no stop token: every row runs to max_new_tokens, nothing to check)
    stops = set(stop.tolist())
    stop = stop.to(dev)
    penalty = opts["repetition_penalty"] != 1.0
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    out, lps = [], []
    for step in range(max_new_tokens):
        tok = next_tokens(logits, stepper.seen if penalty else None, **opts)
        if with_logprobs:
            scaled = logits.float()
            if penalty:
                scaled = apply_repetition_penalty(scaled, stepper.seen, opts["repetition_penalty"])
            scaled = scaled / opts["temperature"] if opts["temperature"] > 0 else scaled
            lps.append(torch.log_softmax(scaled, dim=-1).gather(-1, tok[:, None]).squeeze(-1))
        if has_stop:
            tok = tok.masked_fill(finished, pad_id)
            finished |= torch.isin(tok, stop)
        out.append(tok)
        if step == max_new_tokens - 1:
            break
        if has_stop and (step + 1) % check_every == 0 and bool(finished.all()):  # the loop's only host sync
            break
        if penalty:
            stepper.seen_add(tok)
        logits = stepper.step(tok)
    result = []
    for row in torch.stack(out, dim=1).tolist():  # (B, n)
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    if not with_logprobs:
        return result, None
    return result, [row[:len(r)] for row, r in zip(torch.stack(lps, dim=1).tolist(), result)]


class _GPTStepper:
    """Decoder-only state: the cache (or the full sequence without one), positions, key validity."""

    def __init__(self, model: GPT, prompts, max_new_tokens: int, use_cache: bool, pad_id: int, step: str = "eager"):
        self.model, self.use_cache, self.kind = model, use_cache, step
        dev = model.wte.weight.device
        self.padded = len({len(p) for p in prompts}) > 1  # (from the host lists: no device sync)
        ids, valid = left_pad(prompts, pad_id, dev)  # (B, L)
        B, L = ids.shape
        S = L + max_new_tokens
        if S > model.config.max_seq_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_seq_len={model.config.max_seq_len}")
        self.ids = ids
        self.pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L): real tokens count from 0
        self.next_pos = valid.sum(-1, keepdim=True)  # (B, 1): position of the first new token
        # key validity of every position the sequence will have: the prompt's, then the new tokens
        # (always real, a stopped row's pads included, as with transformers)
        self.valid = torch.ones(B, S, dtype=torch.bool, device=dev)
        self.valid[:, :L] = valid
        self.length = L  # positions so far (host int: the eager step's mask width)
        self.cache = model.new_cache(B, S) if use_cache else None
        self.static: _StaticStep | None = None  # made at the first step (nothing to make when 1 token is asked)
        V = model.config.vocab_size
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        self.seen.scatter_(1, ids, valid)  # real prompt tokens only

    def seen_add(self, tok: torch.Tensor) -> None:
        self.seen.scatter_(1, tok[:, None], True)

    def _last_logits(self, ids, pos, mask=None, segment_ids=None) -> torch.Tensor:
        h = self.model.hidden_states(ids, pos, mask, self.cache, segment_ids=segment_ids)[:, -1]  # (B, C)
        return self.model.lm_head(h)  # (B, V)

    def _full(self, ids, n: int) -> torch.Tensor:
        """Last-position logits of a forward over the first n positions (the prompt, or everything
        without a cache). Padding as segment ids: no (B, 1, n, n) mask."""
        if not self.padded:
            return self._last_logits(ids, None)
        return self._last_logits(ids, self.pos, segment_ids=segments_from_valid(self.valid[:, :n]))

    def first(self) -> torch.Tensor:
        return self._full(self.ids, self.length)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self.kind != "eager":
            if self.static is None:
                self.static = _StaticStep(self.model, self.cache, self.valid, self.next_pos, self.length,
                                          graph=self.kind == "cuda_graph")
            return self.static(tok)
        tok = tok[:, None]  # (B, 1)
        self.length += 1
        if self.use_cache:
            pos = self.next_pos if self.padded else None
            # the new token sees every real token so far: (B, 1, 1, past+1); none padded: no mask at all
            mask = self.valid[:, None, None, :self.length] if self.padded else None
            self.next_pos = self.next_pos + 1
            return self._last_logits(tok, pos, mask)
        # no cache: the whole sequence again
        self.ids = torch.cat([self.ids, tok], dim=1)
        self.pos = torch.cat([self.pos, self.next_pos], dim=1)
        self.next_pos = self.next_pos + 1
        return self._full(self.ids, self.length)


class _StaticCache:
    """A KVCache seen through fixed shapes: after the prompt (written as usual), each one-token step
    writes its keys and values at column `col`, a (1,) device tensor the step advances in place, and
    attention reads the whole preallocated (B, nkv, max_len, hd) buffers, whose columns not yet
    written the step's key-validity mask hides. `length` stays the prompt's (the model then takes
    its "cached keys" path; positions and mask are always given), so nothing in a step depends on
    a value the host would have to read or that changes between steps."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.length = cache.length
        self.col = torch.full((1,), cache.length, dtype=torch.long, device=cache.k[0].device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.cache.k[layer], self.cache.v[layer]
        kb.index_copy_(2, self.col, k)  # k, v: (B, nkv, 1, hd)
        vb.index_copy_(2, self.col, v)
        return kb, vb

    def advance(self, t: int) -> None:  # (the step advances `col` itself, on the device)
        pass


class _StaticStep:
    """The shape-static GPT decoding step (STEPS["static"]); with graph=True captured as a CUDA graph.

    Inputs and outputs live in fixed tensors: the step copies the new tokens into `tok` and runs
    (or replays) `_forward`, which marks the write column's key valid, runs the model over the
    one new token per row, leaves the logits in `logits` and advances positions and column.
    """

    def __init__(self, model: GPT, cache: KVCache, valid: torch.Tensor, next_pos: torch.Tensor, length: int,
                 graph: bool):
        self.model = model
        self.cache = _StaticCache(cache)
        B, S = valid.shape
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=valid.device)
        self.pos = next_pos.clone()  # (B, 1)
        self.key_valid = valid.clone()  # (B, S): the prompt's validity, then False until a column is written
        self.key_valid[:, length:] = False
        self.mask = self.key_valid[:, None, None, :]  # (B, 1, 1, S), a view: sees every in-place update
        self.graph = None
        self.logits: torch.Tensor | None = None
        if graph:
            self._capture()

    def _forward(self, advance: bool = True) -> torch.Tensor:
        self.key_valid.index_fill_(1, self.cache.col, True)
        h = self.model.hidden_states(self.tok, self.pos, self.mask, self.cache)[:, -1]  # (B, C)
        logits = self.model.lm_head(h)  # (B, V)
        if advance:
            self.pos += 1
            self.cache.col += 1
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream first (lazy initialisation, library workspaces: nothing of that
        # may happen during capture). The warm-up advances nothing; it writes only the next
        # column's keys, values and validity, which the first real step writes again.
        with torch.cuda.device(self.tok.device):  # (the model's GPU, whichever is current)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(advance=False)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run
                self.logits = self._forward()

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok[:, None])
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits  # (overwritten by the next replay, after this step's token is chosen from it)


class _T5Stepper:
    """Encoder-decoder state: encoder output and mask, decoder tokens and cache."""

    def __init__(self, model: T5, prompts, max_new_tokens: int, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        dev = model.embed.weight.device
        start = model.config.pad_id
        ids, valid = left_pad(prompts, start, dev)
        self.enc_mask = valid if len({len(p) for p in prompts}) > 1 else None  # (host lists: no device sync)
        self.memory = model.encode(ids, self.enc_mask)  # (B, S, C)
        B = ids.shape[0]
        self.dec = torch.full((B, 1), start, dtype=torch.long, device=dev)  # decoder start token
        self.cache = model.new_cache(B, max_new_tokens) if use_cache else None
        # like transformers, the penalty looks at the decoder's tokens (start token included)
        self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=dev)
        self.seen[:, start] = True

    def seen_add(self, tok: torch.Tensor) -> None:
        self.seen.scatter_(1, tok[:, None], True)

    def _last_logits(self, dec_ids) -> torch.Tensor:
        m = self.model
        h = m.decode(dec_ids, self.memory, self.enc_mask, cache=self.cache)[:, -1]
        return m.lm_head(m.head_input(h))

    def first(self) -> torch.Tensor:
        return self._last_logits(self.dec)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            return self._last_logits(tok[:, None])
        self.dec = torch.cat([self.dec, tok[:, None]], dim=1)
        return self._last_logits(self.dec)


# ---------------------------------------------------------------------------------------------
# Where decoding (and eval scoring) runs: device, dtype, sampling generator
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> a device. auto and cuda mean this process's GPU
    (cuda:LOCAL_RANK under a launcher, as dist.env.device()); auto falls back to the CPU, an
    explicit cuda without a usable GPU is a UsageError (exit 2)."""
    if isinstance(name, torch.device):
        return name
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(name).strip().lower())
    if m is None or (m[2] is not None and m[1] != "cuda"):
        raise UsageError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    kind, index = m[1], m[2]
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); use --device cpu or auto")
    i = int(index) if index is not None else int(os.environ.get("LOCAL_RANK", 0))
    if i >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: cuda:{i} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", i)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` | `fp32` | `bf16` | `fp16` -> a dtype for weights and activations on `device`.

    auto is bf16 on a GPU and fp32 on CPU: a CPU without bf16 matrix instructions runs bf16 slower
    than fp32 (a (64, 256) x (256, 1024) product on the 2-core test machine: 0.4 ms fp32, 2.0 ms
    bf16, 1.7 ms fp16), so bf16 there is for checking a model's bf16 numerics, not for speed.
    fp16 on CPU is refused: just as slow, with fp16's narrow range (overflow above 65504), and
    bf16 covers the checking use.
    """
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(str(name), str(name))
        if key == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if key not in DTYPES:
            raise UsageError(f"--dtype {name}: expected auto, {', '.join(DTYPES)}")
        dtype = DTYPES[key]
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("--dtype fp16 needs a CUDA device: on CPU it is slower than fp32 and less robust than bf16 "
                         "(use --dtype bf16 or fp32)")
    return dtype


def check_vocab(tokenizer, info: CheckpointMeta, where) -> None:
    """A tokenizer whose ids the model cannot embed is refused (UsageError naming both sizes):
    its larger ids would index past the embedding table (an IndexError mid-run). Only a
    tokenizer given apart from the model (--tokenizer with a directory that records no
    tokenizer hash) can get here; a recorded hash already rules the others out."""
    model_vocab = info.vocab_size
    if model_vocab is not None and tokenizer.vocab_size > model_vocab:
        raise UsageError(f"the tokenizer at {tokenizer.path} has {tokenizer.vocab_size} tokens but the model {where} "
                         f"embeds only {model_vocab}: its ids {model_vocab} and up have no embedding; use the "
                         "tokenizer the model was trained with (--tokenizer)")


def resolve_placement(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
                      ) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from the --device / --dtype values (see resolve_device, resolve_dtype)."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def place_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move `model` to `device` and cast its parameters to `dtype`, in place (returned too).

    Floating-point buffers are moved but keep their dtype: fixed tables (rotary cos/sin, sinusoidal
    positions, ALiBi slopes, rotary inverse frequencies) must stay fp32; rounded to bf16, positions
    above 256 collapse onto their neighbours. The models cast them to the activations' dtype at use.
    """
    keep = {name: buf for name, buf in model.named_buffers() if buf.is_floating_point()}
    model.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf.to(device)
    return model


def sampling_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded generator on the model's device, for `generate(..., generator=)`: `sample` draws
    its uniform numbers where the probabilities are. On CPU it is torch.Generator().manual_seed(seed)."""
    return torch.Generator(device=device).manual_seed(seed)

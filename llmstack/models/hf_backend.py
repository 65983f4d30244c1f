"""The generic backend (`model.backend=hf`): any transformers `AutoModelForCausalLM` trained through
its own class, under the same DeepSpeed engine, ZeRO stages, precision, checkpoints and stages
(SFT, reward model, DPO, PPO, GRPO) as the native families.

The transformers model sits in a thin module with the interface the stages use of a native GPT:
- `HFCausalLM` (a causal LM: `forward` gives logits, or the mean cross-entropy of `labels`;
  `hidden_states`), `HFPolicyLM` (per-token log-probs, as heads.PolicyLM), and
  `HFScalarHeadModel` (the transformers base model + a scalar head, as heads.ScalarHeadModel:
  reward model and critic);
- parameters are the transformers model's under the prefix `hf.` (`hf.model.layers.0...`), so a
  checkpoint's consolidated state is the transformers state dict once the prefix is dropped, and
  `llmstack export` writes the directory back with its config and tokenizer;
- padding arrives as segment ids (-1 for padding, layers.segments_from_valid) and goes to the
  model as its 2-D attention mask, positions as given;
- floating-point buffers (rotary inverse frequencies) stay fp32 when the engine casts the module to
  bf16, as the native families keep their position tables in fp32.

What it lacks against the native families (also said in `--help` and the README):
- packed sequences: a row holds one sequence (sft.packing=false);
- the fused, chunked LM-head loss and log-probs: the (B, T, V) logits are formed, in fp32 for the
  loss;
- our decoding step (static shapes, CUDA graphs): rollouts and `llmstack generate` decode through
  the model's own KV cache (transformers' DynamicCache), with our sampler;
- `llmstack plan`'s memory estimate, and `llmstack-eval` (its scorer passes the native families'
  (B, 1, T, S) masks): evaluate the export with lm-evaluation-harness' HF backend.
LoRA goes through peft on the model's own module names (`lora.target=[q_proj,v_proj]`; the short
names q k v o up gate down select the llama-style *_proj projections).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmstack.models.configs import HFConfig
from llmstack.models.heads import ScalarHeadModel

PREFIX = "hf."  # the transformers model's parameters in our state dicts
LORA_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "gate": "gate_proj",
                "down": "down_proj"}
# config.json keys that are not architecture: left out of the recorded one
_NOT_ARCH = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "_commit_hash")


def _transformers_config(hf_config: dict):
    from transformers import AutoConfig

    d = dict(hf_config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("config.json has no model_type")
    return AutoConfig.for_model(model_type, **d)


def _causal_class(config):
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if cls is None:
        raise ValueError(f"model_type {config.model_type!r} has no causal-LM class in transformers")
    return cls


def read_arch(path, activation_checkpointing: bool = False) -> HFConfig:
    """The architecture of a transformers causal LM directory; ValueError naming what is wrong."""
    p = Path(path)
    try:
        raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{p / 'config.json'}: {e}") from None
    hf_config = {k: v for k, v in raw.items() if k not in _NOT_ARCH}
    try:
        config = _transformers_config(hf_config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{p}: transformers does not know this model ({e})") from None
    _causal_class(config)
    text = config.get_text_config()
    n_head = text.num_attention_heads
    d_model = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or d_model // n_head
    max_len = getattr(text, "max_position_embeddings", None)
    if not max_len:
        raise ValueError(f"{p}: config.json gives no max_position_embeddings (the model's context)")
    return HFConfig(hf_config=hf_config, vocab_size=text.vocab_size, max_seq_len=int(max_len), d_model=d_model,
                    n_layer=text.num_hidden_layers, n_head=n_head, head_dim=int(head_dim),
                    kv_heads=getattr(text, "num_key_value_heads", None) or n_head,
                    tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)), source=str(p),
                    activation_checkpointing=activation_checkpointing)


def read_state(path) -> dict[str, torch.Tensor]:
    """The fp32 state of a transformers directory, keyed as HFCausalLM's parameters: loaded by the
    model's own class (from_pretrained applies whatever renaming its checkpoints need), on the host."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # (one bar per rank for a load that takes seconds)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def _keep_fp32_buffers(module: nn.Module, apply, fn, recurse: bool):
    """module._apply(fn) with floating buffers kept in their dtype (fp32) when fn casts them:
    DeepSpeed's bf16 engine calls module.bfloat16(), which would round a rotary embedding's
    inverse frequencies to 8 bits (positions in the thousands then rotate by the wrong angles)."""
    saved = {n: b for n, b in module.named_buffers() if b.is_floating_point()}
    out = apply(fn, recurse)
    for name, old in saved.items():
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        new = holder._buffers.get(leaf)
        if new is not None and new.dtype != old.dtype:
            holder._buffers[leaf] = old.to(new.device)
    return out


class _HFModule(nn.Module):
    """What the wrapped transformers models share: inputs, fp32 buffers, accounting."""

    config: HFConfig
    hf: nn.Module

    def _finish(self, cfg: HFConfig) -> None:
        self.hf.config.use_cache = False
        if cfg.activation_checkpointing:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _apply(self, fn, recurse=True):
        return _keep_fp32_buffers(self, super()._apply, fn, recurse)

    def init_module_(self, module: nn.Module) -> None:
        """Nothing: the weights come from model.init (a transformers directory or a checkpoint)."""

    def init_weights(self) -> None:
        pass

    @staticmethod
    def _inputs(input_ids, position_ids, attn_mask, segment_ids) -> dict:
        if attn_mask is not None:
            raise ValueError("model.backend=hf takes padding as segment_ids, not a (B, 1, T, S) attn_mask")
        mask = None
        if segment_ids is not None:
            if bool((segment_ids > 0).any()):
                raise ValueError("model.backend=hf does not pack sequences: a row holds one sequence and its "
                                 "padding (set sft.packing=false)")
            mask = (segment_ids >= 0).long()
        return dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def matmul_params(self) -> int:
        """The N of the PaLM FLOPs formula (train/metrics.matmul_params)."""
        from llmstack.train.metrics import matmul_params

        return matmul_params(self)

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def _from_config(auto, config):
    """`auto` (AutoModelForCausalLM, AutoModel).from_config, with SDPA attention where the model has
    it, without transformers' weight initialisation: the weights always come from model.init, and
    under ZeRO-3 the parameters are already partitioned (empty on this rank) when it would run.
    Buffers (rotary frequencies) are computed by the modules' constructors as usual."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        try:
            return auto.from_config(config, attn_implementation="sdpa")
        except ValueError:  # a model without an SDPA implementation
            return auto.from_config(config, attn_implementation="eager")


class HFCausalLM(_HFModule):
    """A transformers causal LM with the native GPT's training interface."""

    lora_aliases = LORA_ALIASES  # (models/lora.py: the short target names)

    def __init__(self, cfg: HFConfig):
        super().__init__()
        self.config = cfg
        from transformers import AutoModelForCausalLM

        self.hf = _from_config(AutoModelForCausalLM, _transformers_config(cfg.hf_config))
        self._finish(cfg)

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None, segment_ids=None):
        """The base model's last hidden states (B, T, C) (after its final norm)."""
        if cache is not None:
            raise ValueError("model.backend=hf decodes through llmstack.generate, which keeps the model's own cache")
        return self.hf.base_model(**self._inputs(input_ids, position_ids, attn_mask, segment_ids)).last_hidden_state

    def logits(self, input_ids, position_ids=None, segment_ids=None) -> torch.Tensor:
        return self.hf(**self._inputs(input_ids, position_ids, None, segment_ids)).logits

    def forward(self, input_ids, labels=None, position_ids=None, attn_mask=None, cache=None,
                label_smoothing: float = 0.0, z_loss: float = 0.0, segment_ids=None):
        """Logits (B, T, V), or the mean cross-entropy (fp32) over labels != -100 (labels are the
        targets of each position, already shifted, as in the native models)."""
        if cache is not None:
            raise ValueError("model.backend=hf decodes through llmstack.generate, which keeps the model's own cache")
        logits = self.hf(**self._inputs(input_ids, position_ids, attn_mask, segment_ids)).logits
        if labels is None:
            return logits
        return causal_loss(logits, labels, label_smoothing, z_loss)


def causal_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                z_loss: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32 (0 with grad when none is supervised), plus
    z_loss * mean(logsumexp^2) over the same positions."""
    flat, y = logits.float().flatten(0, 1), labels.flatten()
    valid = y != -100
    if not bool(valid.any()):
        return flat.sum() * 0.0
    loss = F.cross_entropy(flat, y, ignore_index=-100, label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat[valid], dim=-1).pow(2).mean()
    return loss


class HFPolicyLM(HFCausalLM):
    """heads.PolicyLM for a transformers model: forward gives the log-probs (and entropies) of the
    input's own tokens from column `start` on."""

    def forward(self, input_ids, position_ids=None, segment_ids=None, *, start: int = 1, temperature: float = 1.0,
                with_entropy: bool = False):
        if start < 1:
            raise ValueError(f"start must be >= 1 (nothing predicts column 0), got {start}")
        logits = self.logits(input_ids, position_ids, segment_ids)[:, start - 1:-1].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, input_ids[:, start:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return chosen, entropy


class HFBackbone(_HFModule):
    """The transformers base model (no LM head) of a scalar-head model."""

    def __init__(self, cfg: HFConfig):
        super().__init__()
        from transformers import AutoModel

        self.config = cfg
        self.hf = _from_config(AutoModel, _transformers_config(cfg.hf_config))
        self._finish(cfg)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache=None, segment_ids=None):
        return self.hf(**self._inputs(input_ids, position_ids, attn_mask, segment_ids)).last_hidden_state


class HFScalarHeadModel(ScalarHeadModel):
    """heads.ScalarHeadModel (reward model, critic) on a transformers base model."""

    def __init__(self, cfg: HFConfig):
        nn.Module.__init__(self)
        self.backbone = HFBackbone(cfg)
        self.head = nn.Linear(cfg.d_model, 1, bias=True)


def import_model_code(cfg: HFConfig) -> None:
    """Import the model's transformers modules (and what they import: torch._dynamo, generation)
    now, not first inside DeepSpeed's ZeRO-3 construction context, which patches torch.Tensor.__new__
    and breaks torch._dynamo's import-time checks."""
    import torch._dynamo  # noqa: F401
    from transformers import AutoModel, DynamicCache  # noqa: F401

    config = _transformers_config(cfg.hf_config)
    _causal_class(config)
    AutoModel._model_mapping.get(type(config), None)


def model_class(cls):
    """The backend's class standing for a native one (None: the causal LM)."""
    from llmstack.models.heads import PolicyLM

    if cls is None or cls is HFCausalLM:
        return HFCausalLM
    if cls is PolicyLM or cls is HFPolicyLM:
        return HFPolicyLM
    if cls is ScalarHeadModel or cls is HFScalarHeadModel:
        return HFScalarHeadModel
    raise ValueError(f"model.backend=hf has no counterpart of {cls.__name__}")


def backbone_state(state: dict[str, torch.Tensor], cfg: HFConfig) -> dict[str, torch.Tensor]:
    """A causal LM's state (HFCausalLM keys) as a scalar model's backbone (HFBackbone keys): the
    base model's parameters, without the LM head."""
    prefix = PREFIX + _causal_class(_transformers_config(cfg.hf_config)).base_model_prefix + "."
    return {PREFIX + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers state dict of a causal LM's consolidated state."""
    bad = [k for k in state if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"not the state of a model.backend=hf causal LM (e.g. {bad[0]!r})")
    return {k[len(PREFIX):]: v for k, v in state.items()}


def save_pretrained(cfg: HFConfig, state: dict[str, torch.Tensor], out_dir, dtype: torch.dtype = torch.float32,
                    max_shard_bytes: int = 5 << 30, pad_id: int | None = None) -> None:
    """Write the causal LM as a transformers directory (config.json, safetensors) through its own
    class, so transformers reads it back as it wrote it; `pad_id` (a pad token the run added) goes
    into config.json when it names none."""
    model = HFCausalLM(cfg)
    missing, unexpected = model.hf.load_state_dict(export_state(state), strict=False)
    head = model.hf.get_output_embeddings()
    tied = {f"{n}.weight" for n, m in model.hf.named_modules() if m is head} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"the weights do not fit {cfg.hf_config.get('model_type')}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.hf.to(dtype)
    model.hf.config.use_cache = True
    if pad_id is not None and getattr(model.hf.config, "pad_token_id", None) is None:
        model.hf.config.pad_token_id = pad_id
        if model.hf.generation_config is not None:
            model.hf.generation_config.pad_token_id = pad_id
    model.hf.save_pretrained(str(out_dir), max_shard_size=max_shard_bytes)


class Stepper:
    """llmstack.generate's decoding state for a transformers model: its own KV cache
    (transformers' DynamicCache), left-padded prompts with a 2-D attention mask and positions that
    count real tokens only, as transformers' `generate` does."""

    def __init__(self, model: HFCausalLM, prompts, max_new_tokens: int, use_cache: bool, pad_id: int):
        from transformers import DynamicCache

        from llmstack.generate import left_pad

        dev = next(model.parameters()).device
        ids, valid = left_pad(prompts, pad_id, dev)
        B, L = ids.shape
        if L + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_seq_len={model.config.max_seq_len}")
        self.model, self.use_cache = model, use_cache
        self.ids, self.mask = ids, valid.long()
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache() if use_cache else None
        V = model.hf.get_output_embeddings().weight.shape[0]
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        self.seen.scatter_(1, ids, valid)

    def seen_add(self, tok: torch.Tensor) -> None:
        self.seen.scatter_(1, tok[:, None], True)

    def _last(self, ids, pos) -> torch.Tensor:
        out = self.model.hf(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                            use_cache=self.use_cache)
        return out.logits[:, -1]

    def first(self) -> torch.Tensor:
        return self._last(self.ids, self.pos)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        tok = tok[:, None]
        nxt = self.pos[:, -1:] + 1
        self.mask = torch.cat([self.mask, torch.ones_like(tok)], dim=1)
        self.pos = torch.cat([self.pos, nxt], dim=1)
        if self.use_cache:
            return self._last(tok, nxt)
        self.ids = torch.cat([self.ids, tok], dim=1)
        return self._last(self.ids, self.pos)

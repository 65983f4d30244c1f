"""`llmstack plan CONFIG --gpus N --gpu-mem GB`: memory per device for ZeRO 0-3, before launch.

The estimate follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3) plus the
activations of our GPT blocks:
- weights: N x bytes of the training dtype; partitioned by ZeRO-3; moved to the host by
  param offload
- gradients: N x bytes of the training dtype; partitioned by ZeRO-2 and 3; in fp32 (4 bytes)
  for bf16 under ZeRO 1-3, which accumulate them in fp32 (distributed/deepspeed.py)
- optimizer: Adam moments (8 bytes/param) plus an fp32 master copy (4 bytes/param) when training
  in bf16/fp16; partitioned by ZeRO 1-3; moved to the host by optimizer offload
- activations per layer and token: what our block saves for backward (norm inputs and outputs,
  q/k/v and their contiguous copies for SDPA, attention output, MLP hidden states), or only the
  block input with activation checkpointing (plus one block's worth during its recompute)
- LM head: our fused cross-entropy keeps a gradient of the output embedding (fp32) and works in
  chunks of logits, never the whole (B, T, V) tensor
- transients: torch's foreach AdamW on CPU makes a parameter-sized temporary or two during the
  step; ZeRO-3 gathers about two blocks' parameters at a time; ZeRO 1-2 reduce in buckets.
The peak is the persistent states plus the larger of (forward/backward working set, optimizer
step transients). Figures are estimates: CUDA context, allocator fragmentation and framework
buffers come on top, hence the headroom kept when suggesting a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmstack.config import PretrainConfig
from llmstack.distributed.deepspeed import bucket_elements
from llmstack.errors import UsageError
from llmstack.models.gpt import GPT, GPTConfig

GB = 1024**3
CE_CHUNK_ELEMS = {"cpu": 1 << 22, "gpu": 1 << 27}  # as llmstack.models.layers chooses its chunks


@dataclass
class Estimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    transient: float
    host: float  # bytes held in host memory by offload

    @property
    def total(self) -> float:
        states = self.weights + self.grads + self.optimizer
        return states + max(self.activations, self.transient)


def activation_bytes_per_token_layer(arch: GPTConfig, act_bytes: int) -> float:
    """Bytes one block saves for backward per token (no checkpointing)."""
    h, r = arch.d_model, arch.kv_heads / arch.n_head
    qkv = (1 + 2 * r) * h
    attn = 2 * h + 2 * qkv + h  # norm in/out, qkv output and its contiguous q/k/v, attention output
    if arch.pos == "rotary":
        attn += (1 + r) * h  # rotated q and k
    mlp = 2 * h + (4 * arch.ff_dim if arch.mlp == "swiglu" else 2 * arch.ff_dim)  # norm in/out, hidden states
    return (attn + mlp) * act_bytes


def param_counts(arch: GPTConfig) -> tuple[int, int]:
    """(parameters of the model, parameters of one block), from a model built on the meta device
    (shapes only, no memory)."""
    with torch.device("meta"):
        return _counts(GPT(arch))


def _counts(model: GPT) -> tuple[int, int]:
    return model.num_params(), sum(p.numel() for p in model.blocks[0].parameters())


def estimate(arch: GPTConfig, *, seq_len: int, micro_batch: int, zero_stage: int, world: int, precision: str,
             offload_optimizer: bool = False, offload_params: bool = False, activation_checkpointing: bool = False,
             device: str = "gpu", counts: tuple[int, int] | None = None) -> Estimate:
    """Peak memory of one data-parallel process, by component (bytes). `counts`: `param_counts(arch)`
    when the caller has it (a table of estimates builds the model once, not once per cell)."""
    n, layer_params = counts or param_counts(arch)
    bw = 2 if precision in ("bf16", "fp16") else 4
    d = world
    weights = n * bw / (d if zero_stage == 3 else 1)
    grad_bytes = 4 if precision == "bf16" and zero_stage >= 1 else bw  # fp32 accumulation (build_ds_config)
    grads = n * grad_bytes / (d if zero_stage >= 2 else 1)
    opt = (8 + (4 if bw == 2 else 0)) * n / (d if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host += opt
        opt = 0.0
    if offload_params:
        host += weights
        weights = 0.0
    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(arch, bw)
    if activation_checkpointing:
        acts = tokens * arch.n_layer * arch.d_model * bw + tokens * per_layer
    else:
        acts = tokens * arch.n_layer * per_layer
    rows = max(CE_CHUNK_ELEMS[device] // arch.vocab_size, 2 * arch.d_model)
    lm_head = arch.vocab_size * arch.d_model * 4 + 3 * min(rows, tokens) * arch.vocab_size * 4
    embed_grad = arch.vocab_size * arch.d_model * 4  # dense gradient of the lookup embedding
    acts += lm_head + embed_grad + tokens * arch.d_model * 4 * 2  # + final norm in/out
    transient = 0.0
    if device == "cpu" and not offload_optimizer:
        transient = 2 * 4 * n / (d if zero_stage >= 1 else 1)  # foreach AdamW temporaries
    if zero_stage == 3:
        acts += 2 * layer_params * bw  # gathered blocks (current + prefetch)
    if zero_stage >= 1:  # gradient bucket(s) in the fp32 communication dtype; two with overlap_comm (on GPUs)
        acts += bucket_elements(n) * 4 * (2 if device == "gpu" else 1)
    return Estimate(weights, grads, opt, acts, transient, host)


def suggest_micro_batch(arch, budget: float, **kw) -> int:
    """Largest micro-batch (up to 1024) whose estimate fits `budget` bytes; 0 if none does."""
    if kw.get("counts") is None:
        kw["counts"] = param_counts(arch)
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if estimate(arch, micro_batch=b, **kw).total <= budget:
            best = b
    return best


def run(cfg: PretrainConfig, gpus: int, gpu_mem_gb: float, headroom: float = 0.9) -> int:
    """Print parameters, FLOPs/token and a per-stage memory table; exit 2 if nothing fits."""
    from llmstack.distributed.deepspeed import resolve_batch
    from llmstack.stages.common import model_config

    if gpus < 1 or gpu_mem_gb <= 0:
        raise UsageError("--gpus must be >= 1 and --gpu-mem > 0")
    vocab = -(-cfg.tokenizer.vocab_size // 64) * 64
    arch = model_config(cfg.model, vocab, cfg.data.seq_len, cfg.train.activation_checkpointing)
    if not isinstance(arch, GPTConfig):
        raise UsageError(f"llmstack plan models GPT blocks; model.family={cfg.model.family} is not supported yet")
    t = cfg.train
    micro, accum, global_batch = resolve_batch(t.micro_batch, t.grad_accum, t.global_batch, gpus)
    with torch.device("meta"):
        model = GPT(arch)
    counts = _counts(model)
    budget = gpu_mem_gb * GB * headroom
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, {model.flops_per_token(cfg.data.seq_len) / 1e9:.2f} "
          f"GFLOPs/token; {gpus} GPUs x {gpu_mem_gb:g} GB ({headroom:.0%} usable); {cfg.precision}; "
          f"micro-batch {micro} x accumulation {accum} x {gpus} = global batch {global_batch}; seq {cfg.data.seq_len}")
    header = f"{'setting':<32}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total':>9}{'host':>9}  fits  max micro"
    print(header + "\n" + "-" * len(header))
    any_fits = False
    for stage in (0, 1, 2, 3):
        for off_opt, off_par in ((False, False), (True, False), (True, True)):
            if (off_opt and stage == 0) or (off_par and stage != 3):
                continue
            for ckpt in (False, True):
                kw = dict(seq_len=cfg.data.seq_len, zero_stage=stage, world=gpus, precision=cfg.precision,
                          offload_optimizer=off_opt, offload_params=off_par, activation_checkpointing=ckpt,
                          counts=counts)
                e = estimate(arch, micro_batch=micro, **kw)
                fits = e.total <= budget
                any_fits |= fits
                name = f"ZeRO-{stage}" + (" +off-opt" if off_opt else "") + (" +off-par" if off_par else "") + (" +ckpt" if ckpt else "")
                cells = [f"{v / GB:9.2f}" for v in (e.weights, e.grads, e.optimizer, max(e.activations, e.transient), e.total, e.host)]
                print(f"{name:<32}{''.join(cells)}  {'yes ' if fits else 'no  '}  {suggest_micro_batch(arch, budget, **kw)}")
    print("(GB per GPU; activ = the larger of the forward/backward working set and optimizer-step temporaries)")
    if not any_fits:
        raise UsageError(f"no ZeRO setting fits micro-batch {micro} in {gpu_mem_gb:g} GB per GPU: use more GPUs, "
                         "a smaller micro-batch or a shorter sequence")
    return 0

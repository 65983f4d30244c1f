"""`llmstack plan CONFIG --gpus N --gpu-mem GB`: memory per device for ZeRO 0-3, before launch.

The estimate follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3), refined to
what DeepSpeed 0.19 actually allocates with the optimizer and ds_config we give it
(distributed/deepspeed.py), plus the activations of our GPT blocks. Each term below is a named
field of `Estimate` and a line of the command's breakdown. n parameters, d data-parallel ranks.
- weights: n x bytes of the training dtype; partitioned by ZeRO-3 (param offload: on the host)
- fp32 master: DeepSpeed's optimizer wrappers step an fp32 copy of the weights. Without ZeRO only
  in bf16/fp16 (`FP16_UnfusedOptimizer`); with ZeRO 1-3 always, a 4n/d partition even for fp32
  models (stage_1_and_2.py `single_partition_of_fp32_groups`; stage3.py `fp32_partitioned_groups_flat`,
  whose "share the fp32 weights" branch compares a torch.device with a device name string and
  never runs). Optimizer offload moves it to the host.
- gradients, resident: ZeRO-1 in bf16 (`BF16_Optimizer`, bf16_optimizer.py) keeps an fp32
  accumulation buffer of all n gradients, not partitioned; ZeRO-3 a 4n/d fp32 buffer
  (`grad_partitions_flat_buffer`; fp32 = our `data_types.grad_accum_dtype` in bf16)
- gradients, backward to step: the model-dtype `.grad`s (ZeRO 0-1: all n; bf16 ZeRO-1: the bf16
  ones beside the fp32 buffer), or ZeRO-2's n/d partition (fp32 in bf16); freed by the step
- optimizer: Adam's two fp32 moments, 8n (ZeRO-0) or 8n/d
- reduction: at the end of backward the engine flattens all gradients for the all-reduce (ZeRO-0,
  and bf16 ZeRO-1 over its fp32 buffer; plus an fp32 copy of bf16 gradients, the communication
  dtype); ZeRO 1-2 copy gradients into an fp32 bucket of reduce_bucket_size (two with
  overlap_comm, on GPUs); ZeRO-3's bucket is allocated once, resident
- optimizer step: the fp32 gradients flattened for the optimizer (ZeRO-0 in bf16/fp16, fp32
  ZeRO 1-2 and ZeRO-3), and on CPU one parameter-sized temporary of torch's foreach AdamW
  (measured: the square root of the second moment); fused AdamW on GPUs needs none
- activations per layer and token: what our block saves for backward (layers.py, measured with
  saved-tensor hooks: norm inputs, RMSNorm's fp32 intermediates, the linear layers' inputs, the
  fused qkv output that SDPA keeps q/k/v views of, rotated q/k, the attention output and its
  log-sum-exp, MLP hidden states), or only the block input with activation checkpointing (plus
  one block's worth during its recompute). Attention is flash-style: nothing (B, nh, T, T) is
  kept, and packed documents pass segment ids (B, T), never a dense (B, 1, T, T) mask. On CPU,
  segment ids gather each document into rows of its own (padded to at most 1.25x) and SDPA saves
  those copies; on GPUs FlexAttention reads q/k/v in place.
- LM head: our fused cross-entropy keeps a gradient of the output embedding (fp32) and works in
  chunks of logits, never the whole (B, T, V) tensor
- ZeRO-3 with d > 1 gathers parameters for forward and backward and keeps them while they will be
  used again within stage3_max_reuse_distance (DeepSpeed default 1e9), up to
  stage3_max_live_parameters (1e9), plus an all-gather bucket (measured: a small model on two
  ranks holds all its weights gathered from the first forward on). With d = 1 the partition is
  the parameter.
- GPU only: the CUDA context of each process and NCCL's communication buffers (see the constants)
The peak is the resident states plus the largest of three working sets: forward/backward
(activations and ZeRO-3's gathered parameters; ZeRO-2 also its gradient partition and buckets
when the gradients outnumber a bucket, which is then reduced while backward goes on; gradients
too when accumulating over micro-batches), the end-of-backward reduction, and the optimizer
step. Allocator
fragmentation and framework buffers come on top (on CPU about 20-60 MB measured), hence the
headroom kept when suggesting a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from llmstack.config import PretrainConfig
from llmstack.distributed.deepspeed import bucket_elements
from llmstack.errors import UsageError
from llmstack.models.gpt import GPT, GPTConfig

GB = 1024**3
CE_CHUNK_ELEMS = {"cpu": 1 << 22, "gpu": 1 << 27}  # as llmstack.models.layers chooses its chunks
# The engine's all-reduce without ZeRO flattens gradients in buckets of this many elements
# (deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_BUCKET = 500_000_000
# ZeRO-3's defaults for stage3_max_live_parameters and stage3_max_reuse_distance (zero/config.py).
MAX_LIVE_PARAMETERS = 1_000_000_000
# CUDA context per process: the driver context, the kernel images torch loads and the cuBLAS
# workspace. pytorch/pytorch#34323 shows ~780 MB in nvidia-smi for a process that only touched
# the GPU; lazy module loading (the default since CUDA 11.7) brings it nearer 500 MB. A planning
# figure between the two; 0 on CPU.
CUDA_CONTEXT = 0.75 * GB
# NCCL's buffers per process with d > 1: NCCL_BUFFSIZE (default 4 MiB, NCCL's environment
# variables documentation) per channel and peer for the Simple protocol, about as much again for
# LL128, times the channels (up to 32 over NVLink on H100 systems): a few hundred MB. A
# documented estimate, not a measurement; NVLS (NVSwitch multicast) can add more.
NCCL_BUFFERS = 0.5 * GB
SEGMENT_PADDING = 1.25  # layers._bucket_len pads a document by at most a quarter on CPU


@dataclass
class Estimate:
    """Bytes per process, by component (see the module docstring for what each holds)."""
    weights: float
    master: float  # fp32 master weights
    grads: float  # gradient buffers resident throughout training
    grads_step: float  # gradients that live from backward to the end of the optimizer step
    optimizer: float  # Adam moments
    activations: float  # saved for backward, the LM head's workspace
    gathered: float  # ZeRO-3: parameters gathered for forward/backward
    buckets: float  # resident communication buckets (ZeRO-3's reduce bucket)
    reduction: float  # end of backward: flattened gradients / reduce buckets
    transient: float  # optimizer-step temporaries
    context: float = 0.0  # CUDA context
    nccl: float = 0.0  # NCCL buffers
    host: float = 0.0  # bytes held in host memory by offload
    reduce_in_backward: bool = False  # ZeRO-2 with more gradients than a bucket: reduced while backward runs
    accumulating: bool = False  # grad_accum > 1: gradients live through the next forward

    @property
    def resident(self) -> float:
        return self.weights + self.master + self.grads + self.optimizer + self.buckets + self.context + self.nccl

    @property
    def working(self) -> float:
        """The largest working set: forward/backward, end-of-backward reduction, optimizer step."""
        fwd_bwd = self.activations + self.gathered
        if self.accumulating or self.reduce_in_backward:
            fwd_bwd += self.grads_step
        if self.reduce_in_backward:
            fwd_bwd += self.reduction
        return max(fwd_bwd, self.grads_step + self.reduction, self.grads_step + self.transient)

    @property
    def total(self) -> float:
        return self.resident + self.working

    def lines(self) -> list[tuple[str, str, float]]:
        """(name, where the figure comes from, bytes) of every term, for a breakdown."""
        return [(*TERMS[f.name], getattr(self, f.name)) for f in fields(self) if f.name in TERMS]


# Each term of the breakdown: its name and, in a few words, where the figure comes from.
TERMS = {
    "weights": ("weights", "training dtype; ZeRO-3 partitions them"),
    "master": ("fp32 master weights", "DeepSpeed's optimizer wrapper steps an fp32 copy"),
    "grads": ("gradients (resident)", "bf16 ZeRO-1: fp32 buffer of all; ZeRO-3: fp32 partition"),
    "grads_step": ("gradients (backward to step)", ".grad, or ZeRO-2's partition (fp32 in bf16)"),
    "optimizer": ("Adam moments", "two fp32 moments, partitioned by ZeRO 1-3"),
    "activations": ("activations", "saved for backward (our blocks), fused LM head"),
    "gathered": ("gathered parameters", "ZeRO-3: kept for reuse (DeepSpeed defaults)"),
    "buckets": ("reduce bucket (resident)", "ZeRO-3 reduce_bucket_size, fp32"),
    "reduction": ("gradient reduction", "flattened all-reduce copies, ZeRO 1-2 buckets"),
    "transient": ("optimizer-step temporaries", "flattened fp32 gradients; foreach AdamW on CPU"),
    "context": ("CUDA context", "planning figure; pytorch/pytorch#34323 shows ~0.78 GB"),
    "nccl": ("NCCL buffers", "estimate: NCCL_BUFFSIZE x channels x peers"),
    "host": ("host (offloaded)", "CPU Adam's states, gradients, offloaded weights"),
}


def activation_bytes_per_token_layer(arch: GPTConfig, act_bytes: int, segments: bool = False) -> float:
    """Bytes one block saves for backward per token (no checkpointing), in the attention path the
    model runs: flash-style SDPA (output and an fp32 log-sum-exp per head, nothing T x T), or with
    `segments` the CPU gathering path of packed documents (layers.SegmentPlan)."""
    h, r, b = arch.d_model, arch.kv_heads / arch.n_head, act_bytes
    norm = 8 * h if arch.norm == "rmsnorm" else h * b  # RMSNorm saves its input and result in fp32
    linear_inputs = 2 * h * b  # the qkv and MLP input projections save their (normed) input
    qkv = (1 + 2 * r) * h * b  # fused projection output; SDPA saves q, k, v as views of it
    if arch.pos == "rotary":
        qkv += (1 + r) * h * b  # rotated q and k (the rotation itself saves only cos/sin)
    lse = arch.n_head * 4
    if segments:  # gathered per-document q, k, v and SDPA's output on them, then the scattered output
        attn = SEGMENT_PADDING * ((1 + 2 * r) * h * b + h * b + lse) + h * b
    else:
        attn = qkv + h * b + lse  # + SDPA output (the output projection reads a view of it)
    mlp = (4 if arch.mlp in ("swiglu", "geglu", "reglu") else 2) * arch.ff_dim * b  # hidden states
    scale = 2 * h * b if arch.layer_scale is not None else 0  # LayerScale saves its input
    return 2 * norm + linear_inputs + attn + mlp + scale


def param_counts(arch: GPTConfig) -> tuple[int, int]:
    """(parameters of the model, parameters of one block), from a model built on the meta device
    (shapes only, no memory)."""
    with torch.device("meta"):
        return _counts(GPT(arch))


def _counts(model: GPT) -> tuple[int, int]:
    return model.num_params(), sum(p.numel() for p in model.blocks[0].parameters())


def estimate(arch: GPTConfig, *, seq_len: int, micro_batch: int, zero_stage: int, world: int, precision: str,
             offload_optimizer: bool = False, offload_params: bool = False, activation_checkpointing: bool = False,
             device: str = "gpu", grad_accum: int = 1, segments: bool = False,
             counts: tuple[int, int] | None = None) -> Estimate:
    """Peak memory of one data-parallel process, by component (bytes). `segments`: packed
    documents with segment ids (data.doc_mask). `counts`: `param_counts(arch)` when the caller has
    it (a table of estimates builds the model once, not once per cell)."""
    n, _ = counts or param_counts(arch)
    bw = 2 if precision in ("bf16", "fp16") else 4
    low = bw == 2
    part = n / world if zero_stage >= 1 else n  # the optimizer's share of each rank
    accum_bytes = 2 if precision == "fp16" else 4  # ZeRO's gradient dtype: fp32 in bf16 (build_ds_config)
    bucket = bucket_elements(n) * 4 * (2 if device == "gpu" and zero_stage in (1, 2) else 1)  # fp32, overlap_comm

    weights = n * bw / (world if zero_stage == 3 else 1)
    master = 4 * part if (zero_stage >= 1 or low) else 0.0
    optimizer = 8 * part
    grads = grads_step = buckets = reduction = 0.0
    flat_for_step = 0.0
    if zero_stage == 0:
        grads_step = n * bw
        reduction = min(n, ALLREDUCE_BUCKET) * (bw + (4 if low else 0))  # flattened (+ fp32 communication copy)
        flat_for_step = 4 * n if low else 0.0  # FP16_UnfusedOptimizer's fp32 copies of the gradients
    elif zero_stage == 1 and precision == "bf16" and not offload_optimizer:  # BF16_Optimizer (engine.py)
        grads, grads_step = 4 * n, 2 * n
        reduction = 4 * min(n, ALLREDUCE_BUCKET)
    elif zero_stage in (1, 2):
        grads_step = n * bw if zero_stage == 1 else part * accum_bytes
        reduction = bucket
        if zero_stage == 2 and precision == "bf16":
            reduction *= 2  # measured: a bucket-sized copy while it is added into the fp32 partition
        flat_for_step = 0.0 if precision == "bf16" else part * (4 + (2 if precision == "fp16" else 0))
    else:
        grads, buckets = part * accum_bytes, bucket
        flat_for_step = part * (4 + (2 if precision == "fp16" else 0))  # averaged gradients flattened per sub-group
    host = 0.0
    if offload_optimizer:  # DeepSpeed's CPU Adam steps fp32 master weights and gradients on the host
        host = master + optimizer + (grads if zero_stage == 3 else 4 * part)
        master = optimizer = flat_for_step = 0.0
        if zero_stage == 3:
            grads = 0.0
    if offload_params:
        host += weights
        weights = 0.0
    temp = 4 * part if device == "cpu" and not offload_optimizer else 0.0  # foreach AdamW's sqrt(v)
    transient = flat_for_step + temp

    tokens = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(arch, bw, segments and device == "cpu")
    if activation_checkpointing:
        acts = tokens * arch.n_layer * arch.d_model * bw + tokens * per_layer
    else:
        acts = tokens * arch.n_layer * per_layer
    rows = max(CE_CHUNK_ELEMS[device] // arch.vocab_size, 2 * arch.d_model)
    lm_head = arch.vocab_size * arch.d_model * 4 + 3 * min(rows, tokens) * arch.vocab_size * 4
    embed_grad = arch.vocab_size * arch.d_model * 4  # dense gradient of the lookup embedding
    acts += lm_head + embed_grad + tokens * arch.d_model * 4 * 2  # + final norm in/out
    if arch.pos == "alibi" and not segments:
        acts += arch.n_head * seq_len * seq_len * bw  # one (1, nh, T, T) bias shared by the layers
    elif arch.attn_pattern != "full" and not segments:
        acts += seq_len * seq_len  # one (T, T) boolean pattern mask
    gathered = 0.0
    if zero_stage == 3 and world > 1:  # (with one rank the partition is the parameter: nothing gathered)
        gathered = (min(n, MAX_LIVE_PARAMETERS) + bucket_elements(n)) * bw
    gpu = device == "gpu"
    return Estimate(weights, master, grads, grads_step, optimizer, acts, gathered, buckets, reduction, transient,
                    context=CUDA_CONTEXT if gpu else 0.0, nccl=NCCL_BUFFERS if gpu and world > 1 else 0.0,
                    host=host, reduce_in_backward=zero_stage == 2 and n > bucket_elements(n),
                    accumulating=grad_accum > 1)


def suggest_micro_batch(arch, budget: float, **kw) -> int:
    """Largest micro-batch (up to 1024) whose estimate fits `budget` bytes; 0 if none does."""
    if kw.get("counts") is None:
        kw["counts"] = param_counts(arch)
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if estimate(arch, micro_batch=b, **kw).total <= budget:
            best = b
    return best


def _setting_name(stage: int, off_opt: bool, off_par: bool, ckpt: bool) -> str:
    return (f"ZeRO-{stage}" + (" +off-opt" if off_opt else "") + (" +off-par" if off_par else "")
            + (" +ckpt" if ckpt else ""))


def run(cfg: PretrainConfig, gpus: int, gpu_mem_gb: float, headroom: float = 0.9) -> int:
    """Print parameters, FLOPs/token, a per-stage memory table and the breakdown of the config's
    own setting; exit 2 if nothing fits."""
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
          f"micro-batch {micro} x accumulation {accum} x {gpus} = global batch {global_batch}; seq {cfg.data.seq_len}"
          + ("; packed documents (segment ids)" if cfg.data.doc_mask else ""))
    common = dict(seq_len=cfg.data.seq_len, world=gpus, precision=cfg.precision, grad_accum=accum,
                  segments=cfg.data.doc_mask, counts=counts)
    cols = ("weights", "master", "grads", "optim", "activ", "reduce", "step", "total", "host")
    header = f"{'setting':<32}" + "".join(f"{c:>9}" for c in cols) + "  fits  max micro"
    print(header + "\n" + "-" * len(header))
    any_fits = False
    for stage in (0, 1, 2, 3):
        for off_opt, off_par in ((False, False), (True, False), (True, True)):
            if (off_opt and stage == 0) or (off_par and stage != 3):
                continue
            for ckpt in (False, True):
                kw = dict(common, zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par,
                          activation_checkpointing=ckpt)
                e = estimate(arch, micro_batch=micro, **kw)
                fits = e.total <= budget
                any_fits |= fits
                values = (e.weights, e.master, e.grads + e.grads_step, e.optimizer, e.activations + e.gathered,
                          e.buckets + e.reduction, e.transient, e.total, e.host)
                print(f"{_setting_name(stage, off_opt, off_par, ckpt):<32}" + "".join(f"{v / GB:9.2f}" for v in values)
                      + f"  {'yes ' if fits else 'no  '}  {suggest_micro_batch(arch, budget, **kw)}")
    e = estimate(arch, micro_batch=micro, **common, zero_stage=cfg.zero.stage,
                 offload_optimizer=cfg.zero.offload_optimizer, offload_params=cfg.zero.offload_params,
                 activation_checkpointing=t.activation_checkpointing)
    print(f"(GB per GPU. total = weights + master + resident gradients + optim + resident buckets + CUDA context "
          f"{e.context / GB:.2f} + NCCL {e.nccl / GB:.2f}, plus the largest working set: activations (ZeRO-3: and "
          "gathered parameters), the gradient reduction at the end of backward, or the optimizer step)")
    setting = _setting_name(cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params,
                            t.activation_checkpointing)
    print(f"\nthis config ({setting}), GB per GPU:")
    for name, note, value in [*e.lines(), ("peak", "resident + largest working set", e.total)]:
        print(f"  {name:<30}{value / GB:9.2f}   {note}")
    if not any_fits:
        raise UsageError(f"no ZeRO setting fits micro-batch {micro} in {gpu_mem_gb:g} GB per GPU: use more GPUs, "
                         "a smaller micro-batch or a shorter sequence")
    return 0

"""All DeepSpeed code lives here (DESIGN.md principle 4).

- the ds_config is generated from plain typed arguments; a raw ds_config may be merged on top
- batch arithmetic is validated once: global = micro x accumulation x data-parallel world
- ZeRO-3 models are constructed under `deepspeed.zero.Init` and initialised module by module
  with gathered parameters, so every stage starts from bit-identical weights
- the engine is created here; checkpoint I/O of the engine and consolidation to one state dict
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from llmstack.distributed import env
from llmstack.errors import UsageError


def _quiet_deepspeed() -> None:
    # DeepSpeed logs every engine detail at INFO on every rank; keep warnings only.
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def resolve_batch(micro_batch: int, grad_accum: int, global_batch: int | None, world: int) -> tuple[int, int, int]:
    """(micro, accum, global) with global = micro x accum x world, or a UsageError saying why not.

    If global_batch is given, accumulation is derived from it (and must come out whole).
    """
    if global_batch is not None:
        per_step = micro_batch * world
        if global_batch % per_step:
            raise UsageError(
                f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch} "
                f"x world size {world} = {per_step}; choose a global batch that is a multiple of {per_step}"
            )
        grad_accum = global_batch // per_step
    return micro_batch, grad_accum, micro_batch * grad_accum * world


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(
    *,
    micro_batch: int,
    grad_accum: int,
    world: int,
    precision: str,
    zero_stage: int,
    offload_optimizer: bool,
    offload_params: bool,
    grad_clip: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    comm_dtype: str = "auto",
    extra: dict | None = None,
) -> dict:
    """The ds_config dict for these settings, with `extra` (a user's raw ds_config) merged on top.

    Low precision: gradients are all-reduced / reduce-scattered in `comm_dtype` (auto: fp32; bf16
    halves the traffic at the cost of rounding every partial sum), and with ZeRO 1-3 in bf16 the
    micro-batch gradients accumulate in fp32 (DeepSpeed's `data_types.grad_accum_dtype`, which
    otherwise follows the model's dtype: a sum of many bf16 gradients loses their low bits).
    Without ZeRO, DeepSpeed 0.19 has no fp32 accumulation for bf16 models (it refuses the
    combination), so zero.stage=0 in bf16 accumulates in bf16: use zero.stage >= 1 with grad_accum > 1.
    """
    pin = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        # overlap_comm reduces finished buckets while backward goes on (GPU streams; nothing to overlap on CPU)
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "communication_data_type": "fp32" if comm_dtype == "auto" else comm_dtype,
        # we pass a torch optimizer (see create_engine); DeepSpeed supports it under ZeRO but calls it untested
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and zero_stage > 0:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if offload_optimizer:
        # offload needs DeepSpeed's CPU Adam, which it builds from this section
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        }
    return _merge(cfg, extra or {})


def model_init_context(ds_config: dict, zero_stage: int):
    """Context to construct a model in: partitioned at construction under ZeRO-3, plain otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    _quiet_deepspeed()
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def init_weights(model: nn.Module, init_module: Callable[[nn.Module], None], zero_stage: int) -> None:
    """Run `init_module` over every module in order.

    Under ZeRO-3 each module's own parameters are gathered, initialised on rank 0 (consuming the
    RNG exactly as a plain run does) and re-partitioned, so all stages start from the same weights.
    A model built without ZeRO-3 is initialised on the host in fp32 before the engine moves it to
    the GPU and casts it; a ZeRO-3 model is built on the GPU in the training dtype. So each
    module is initialised in fp32 host tensors (the CPU generator, fp32 draws) and copied in
    with the same cast the engine applies, or ZeRO-3 would start from other weights on GPUs.
    """
    if zero_stage != 3:
        for m in model.modules():
            init_module(m)
        return
    import deepspeed

    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if not params:
            init_module(m)
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if env.is_main():
                _init_on_host(m, params, init_module)


def _init_on_host(module: nn.Module, params: list[nn.Parameter], init_module: Callable[[nn.Module], None]) -> None:
    """Run `init_module(module)` with its (gathered) parameters swapped for fp32 CPU tensors, then
    copy the values back (cast to the parameters' dtype, on their device). The host copies start
    as the current values: a parameter the module leaves alone (a tied LM head) keeps them."""
    full = [p.data for p in params]
    host = [d.detach().to("cpu", torch.float32, copy=True) for d in full]
    try:
        for p, h in zip(params, host):
            p.data = h
        init_module(module)
    finally:
        for p, d in zip(params, full):
            p.data = d
    with torch.no_grad():
        for d, h in zip(full, host):
            d.copy_(h)


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], zero_stage: int) -> None:
    """Copy a full (consolidated) state dict into a possibly ZeRO-3 partitioned model."""
    sources = _param_sources(model, state)
    if zero_stage != 3:
        with torch.no_grad():
            for name, p in sources.items():
                p.copy_(state[name].to(p.dtype))
        return
    import deepspeed

    for name, p in sources.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if env.is_main():
                p.data.copy_(state[name].to(p.dtype))


def _param_sources(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """{state key to load from: parameter}, one entry per distinct parameter, after checking that
    the state fits the model. A tied parameter (a GPT's embedding and LM head) has several names;
    any one of them present in the state provides it, and two present must hold equal values."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    known = {n for ns in names.values() for n in ns}
    missing = [ns[0] for ns in names.values() if not any(n in state for n in ns)]
    unexpected = [k for k in state if k not in known]
    if missing or unexpected:
        raise UsageError(
            f"checkpoint does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    sources = {}
    for key, ns in names.items():
        present = [n for n in ns if n in state]
        for other in present[1:]:
            if not torch.equal(state[present[0]], state[other]):
                raise UsageError(f"checkpoint holds different {present[0]} and {other}; the model ties them "
                                 "(train or import it with untied embeddings: model.tie_embeddings=false)")
        p = params[key]
        want = tuple(getattr(p, "ds_shape", p.shape))  # (a ZeRO-3 partitioned parameter's full shape)
        if tuple(state[present[0]].shape) != want:
            raise UsageError(f"checkpoint does not fit the model: {present[0]} has shape "
                             f"{tuple(state[present[0]].shape)}, the model's {want}")
        sources[present[0]] = p
    return sources


def check_precision(precision: str) -> None:
    """Refuse, before any work, a precision this machine's accelerator does not train in.

    DeepSpeed has no fp16 training on CPU: its engine stopped with a ValueError traceback, after
    the tokenizer, the data and the model had been built. Stages call this right after init.
    """
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        other = "bf16 or fp32" if precision == "fp16" and acc.is_bf16_supported() else "fp32"
        raise UsageError(f"precision={precision} is not supported by DeepSpeed on this machine's {acc.device_name()} "
                         f"accelerator (fp16 training needs a GPU); use precision={other}")


def create_engine(model: nn.Module, param_groups: list[dict], ds_config: dict, *, lr, betas, eps,
                  optimizer: str = "adamw", momentum: float = 0.9, zero_stage: int | None = None):
    """A DeepSpeed engine around `model` with the named optimizer (train/optim.py).

    Without optimizer offload we hand DeepSpeed a torch optimizer instance; with offload the
    ds_config's optimizer section makes DeepSpeed build its CPU Adam over the same groups, so only
    adamw and adam can be offloaded. LAMB and Adafactor need whole-parameter statistics: under ZeRO
    1/2 they are told which pieces of which parameters their flat partition holds (see
    `_zero_layout`); ZeRO-3 and bf16 without ZeRO (DeepSpeed's BF16 optimizer) are refused for them.
    """
    import deepspeed

    from llmstack.train import optim

    _quiet_deepspeed()
    for precision in ("fp16", "bf16"):  # for stages that did not check at their start
        if ds_config.get(precision, {}).get("enabled"):
            check_precision(precision)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0) if zero_stage is None else zero_stage
    layered = optimizer in ("lamb", "adafactor")
    if layered and stage == 3:
        raise UsageError(f"train.optimizer={optimizer} does not run under zero.stage=3 (its per-parameter "
                         "statistics are not implemented over ZeRO-3 partitions); use zero.stage 0, 1 or 2")
    if layered and ds_config.get("bf16", {}).get("enabled") and stage == 0:
        raise UsageError(f"train.optimizer={optimizer} with precision=bf16 needs zero.stage 1 or 2 "
                         "(DeepSpeed's stage-0 bf16 optimizer partitions parameters in a layout it does not expose)")
    ds_config = size_buckets(ds_config, model)
    opt = None
    if "optimizer" in ds_config:
        if optimizer not in ("adamw", "adam"):
            why = "zero.offload_optimizer" if "offload_optimizer" in ds_config.get("zero_optimization", {}) \
                else "an optimizer section in the raw deepspeed config"
            raise UsageError(f"train.optimizer={optimizer} cannot be combined with {why}: DeepSpeed then builds "
                             "its own Adam/AdamW (offload runs only DeepSpeed's CPU Adam)")
        if optimizer == "adam":
            section = ds_config["optimizer"]
            ds_config = {**ds_config, "optimizer": {"type": "Adam", "params": {**section.get("params", {}),
                                                                                "adam_w_mode": False}}}
    else:
        opt = optim.build_optimizer(optimizer, param_groups, lr=lr, betas=betas, eps=eps, momentum=momentum)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        model_parameters=param_groups if opt is None else None,
        config=ds_config,
    )
    if layered:
        opt.set_layout(_layout(engine, opt, model, optimizer))
    return engine


def _layout(engine, opt, model: nn.Module, name: str):
    """Which model parameter elements each tensor of `opt` holds after DeepSpeed wrapped it."""
    from llmstack.train import optim

    held = [p for g in opt.param_groups for p in g["params"]]
    if {id(p) for p in held} <= {id(p) for p in model.parameters()}:
        return optim.whole_layout(opt.param_groups)  # DeepSpeed left the parameters as they are
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        raise UsageError(f"train.optimizer={name} cannot run inside DeepSpeed's {type(engine.optimizer).__name__} "
                         "(its mixed-precision wrapper without ZeRO); use zero.stage 1 or 2")
    return _zero_layout(engine.optimizer, opt)


def _zero_layout(zopt, opt):
    """ZeRO 1/2: each param group is flattened in order (with alignment padding between parameters,
    `round_robin_bit16_offsets`), split into one contiguous partition per rank, and the optimizer
    holds this rank's fp32 copy. The pieces are checked against the parameters' current values."""
    import torch.distributed as dist

    from llmstack.train import optim

    shapes, pieces = [], {}
    for i, params in enumerate(zopt.round_robin_bit16_groups):
        group = zopt.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        sizes = [t.numel() for t in zopt.parallel_partitioned_bit16_groups[i]]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        flat = zopt.single_partition_of_fp32_groups[i]
        if opt.param_groups[i]["params"][0] is not flat:
            raise UsageError("unexpected ZeRO optimizer layout: param group order changed")
        held = []
        for p, off in zip(params, zopt.round_robin_bit16_offsets[i]):
            index = len(shapes)
            shapes.append(tuple(p.shape))
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a < b:
                piece = optim.Piece(index, a - lo, a - off, b - a)
                mine = flat[piece.offset: piece.offset + piece.numel].to(p.dtype)
                if not torch.equal(mine, p.data.view(-1)[piece.start: piece.start + piece.numel]):
                    raise UsageError("unexpected ZeRO optimizer layout: a partition does not hold the parameter "
                                     "elements computed for it")
                held.append(piece)
        pieces[id(flat)] = held
    group = zopt.real_dp_process_group[0]
    return optim.Layout(shapes, pieces, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))


# Reduce / all-gather bucket (elements). DeepSpeed's default is 5e8, and a bucket is reduced when it
# fills: a model under ~5e8 parameters then fills one bucket only at the end of backward, and no
# gradient communication overlaps with computation. 5e7 (200 MB of fp32 gradients) is the low end
# of the sizes large-model recipes use (5e7-2e8): a 124M model reduces in 3 buckets, the first two
# while backward goes on.
DEFAULT_BUCKET = 50_000_000


def bucket_elements(num_params: int) -> int:
    """Bucket size for a model: DEFAULT_BUCKET, but never larger than the model.

    ZeRO 1-3 allocate their gradient bucket at full size up front (twice with overlap_comm)
    whatever the model's size; a bucket larger than all the gradients only wastes memory. Rounded
    up to a multiple of 64: ZeRO 1/2 require the all-gather bucket to be a multiple of their
    alignment factor (a model with an odd parameter count, e.g. a scalar head's bias, would
    otherwise fail an assertion).
    """
    return int(min(DEFAULT_BUCKET, -(-max(num_params, 1) // 64) * 64))


def size_buckets(ds_config: dict, model: nn.Module) -> dict:
    """ds_config with reduce/all-gather buckets sized to the model, unless the user set them."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) == 0:
        return ds_config
    n = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())
    sized = {k: bucket_elements(n) for k in ("reduce_bucket_size", "allgather_bucket_size") if k not in zero}
    return {**ds_config, "zero_optimization": {**zero, **sized}}


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --- skipping an update whose gradients are not finite (train/guard.py RunGuard) ---------------
#
# DeepSpeed's optimizer wrappers (ZeRO 1-3 in every precision, the bf16 and fp16 wrappers without
# ZeRO) compute the global gradient norm at the accumulation boundary and, when it is inf or NaN,
# skip the update: no parameter or optimizer state changes, gradients cleared, `overflow` set,
# the engine's `was_step_applied()` False and its counters advanced as for any step. In fp16 the
# loss scaler also skips steps whose scaled gradients overflow, as part of normal training. Only
# fp32 without ZeRO runs the bare torch optimizer, which has no such check: there the caller
# looks at the (already all-reduced) gradients itself and runs engine.step() under `no_update`.


def skips_nonfinite_updates(engine) -> bool:
    """Whether DeepSpeed itself skips an update whose global gradient norm is not finite."""
    return hasattr(engine.optimizer, "overflow")


def uses_loss_scaler(engine) -> bool:
    """fp16: skipped steps are also the loss scaler's normal overflow handling."""
    return bool(engine.fp16_enabled())


def step_applied(engine) -> bool:
    """Whether the last engine.step() at an accumulation boundary updated the parameters."""
    return bool(engine.was_step_applied())


def grads_finite(engine) -> bool:
    """Every gradient element finite (for the bare-optimizer case: full, all-reduced gradients,
    the same on every rank). Synchronises with the device."""
    flags = [torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


@contextlib.contextmanager
def no_update(engine):
    """engine.step() inside this block does its bookkeeping (step counters, clipping, zeroed
    gradients) but the bare torch optimizer's step() does nothing: no parameter, moment or
    step-count change. For engines where `skips_nonfinite_updates` is False. (Setting the
    gradients to None instead would crash DeepSpeed's fp32 gradient clipping, which indexes the
    first parameter that has one.)"""
    opt = engine.optimizer
    opt.step = lambda *args, **kwargs: None  # an instance attribute shadows the class's step()
    try:
        yield
    finally:
        del opt.step


def params_finite(engine) -> bool:
    """Whether every parameter element this rank holds is finite (its partition under ZeRO-3;
    combine over ranks with a collective)."""
    # one check per tensor (partitions may live on the host under parameter offload); only at saves
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O of the engine (the atomic protocol around it is in train/checkpoint.py)
# ---------------------------------------------------------------------------------------------


_FORCE_WO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def checkpoint_safe_globals(deepspeed_state: bool = True) -> list:
    """The non-tensor classes our checkpoint files may hold, allowed under `weights_only=True`.

    Found by listing `torch.serialization.get_unsafe_globals_in_checkpoint` over checkpoints of
    ZeRO 0-3 (fp32, bf16, optimizer and parameter offload, LoRA, one and two processes) and their
    universal conversions: numpy arrays in the RNG states (rng_rank<R>.pt); DeepSpeed's ZeRO
    stage enum, loss scaler and fragment addresses in its optimizer state files. fp16 runs (GPU
    only) store a DynamicLossScaler instead, checked by pickling one. Each is plain data rebuilt from its
    attributes (no `__reduce__` that runs code), which is what makes it safe to allow. The
    DeepSpeed classes are imported (with deepspeed) only when `deepspeed_state` is asked for.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    # files written under numpy 1.x name the function by its old module
    allowed: list = [np.ndarray, np.dtype, _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
    # numpy >= 1.25 rebuilds a dtype through its class (numpy.dtypes.UInt32DType for the RNG key)
    allowed += sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefdg"}, key=lambda t: t.__name__)
    if deepspeed_state:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    return allowed


def _refusal(where, err: Exception) -> str:
    import re

    text = str(err)
    if m := re.search(r"GLOBAL (\S+) was not an allowed global", text):
        what = f"a reference to {m.group(1)}"
    else:  # torch's own reason follows "WeightsUnpickler error:"
        detail = [ln.strip() for ln in text.partition("WeightsUnpickler error:")[2].splitlines() if ln.strip()]
        what = detail[0] if detail else text.strip().splitlines()[0]
    return (f"refusing to load {where}: it holds Python objects other than weights ({what}); checkpoint files "
            "are read with torch.load(weights_only=True) so that a crafted file cannot run code")


@contextlib.contextmanager
def weights_only_loads(where, *, deepspeed_state: bool = True, error: type[UsageError] = UsageError):
    """Every `torch.load` inside the block, ours and DeepSpeed's (which passes weights_only=False
    itself, e.g. in `engine.load_checkpoint` and zero_to_fp32), runs with weights_only=True and
    only `checkpoint_safe_globals` allowed; a file that holds anything else (a pickle that would
    run code when loaded) raises `error` naming `where` instead of being executed.

    torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over an explicit weights_only=False, and reads it
    at every call, so setting it here also covers worker processes started inside the block.
    Not thread-safe (environment and allow-list are process-wide); checkpoint I/O is not threaded.
    """
    import os
    import pickle

    saved = {k: os.environ.get(k) for k in (_FORCE_WO, _FORCE_NO_WO)}
    os.environ[_FORCE_WO] = "1"
    os.environ.pop(_FORCE_NO_WO, None)  # both set is an error in torch
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals(deepspeed_state)):
            yield
    except pickle.UnpicklingError as e:
        raise error(_refusal(where, e)) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def safe_load(path: str | Path, *, deepspeed_state: bool = False, error: type[UsageError] = UsageError):
    """`torch.load` of one checkpoint file on the CPU, weights only (see `weights_only_loads`)."""
    with weights_only_loads(path, deepspeed_state=deepspeed_state, error=error):
        return torch.load(path, map_location="cpu", weights_only=True)


def save_engine(engine, root: Path, tag: str, client_state: dict) -> None:
    """Write the engine's model/optimizer (partitioned per rank under ZeRO) to root/tag/. All ranks call."""
    # `universal_checkpoint_info` lets DeepSpeed's ds_to_universal convert this checkpoint for a
    # different world size later (it refuses checkpoints without it).
    state = {"universal_checkpoint_info": {}, **client_state}
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)


def load_engine(engine, root: Path, tag: str, *, load_optimizer: bool = True, universal: bool = False) -> dict:
    """Restore engine state from root/tag/ and return the client state saved with it."""
    from llmstack.errors import RankError

    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    # RankError: a crafted file may be one rank's own partition, which its peers never read
    with weights_only_loads(root / tag, error=RankError):
        path, client = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False
        )
    if path is None:
        raise UsageError(f"could not load DeepSpeed checkpoint {root / tag}")
    if universal:
        # DeepSpeed's ZeRO-3 universal loader copies param group 0's hyperparameters onto every
        # group, which would put weight decay on the no-decay group (norms, biases, embeddings).
        # The groups' own values are the ones our config built; put them back.
        for group, own in zip(engine.optimizer.param_groups, hyper):
            group.update(own)
        # It also gives every sub-group's Adam state the *same* `step` tensor object; torch's
        # AdamW increments `step` in place once per sub-group, so the shared counter would
        # advance several times per iteration and skew the bias correction. Un-alias them.
        inner = getattr(engine.optimizer, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    return client or {}


def consolidated_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a checkpoint directory of any ZeRO stage and world size.

    ZeRO 1-3 checkpoints are gathered from the per-rank fp32 optimizer partitions (DeepSpeed's
    zero_to_fp32, which also covers bf16 runs at ZeRO 2-3); bf16 at ZeRO-1 runs DeepSpeed's bf16
    optimizer (fp32 gradient accumulation), whose `bf16_zero_pp_rank_*` files zero_to_fp32 does not
    read (`_bf16_zero1_state_dict`); stage 0 stores the whole module in one file.
    """
    ckpt_dir = Path(ckpt_dir)
    if any(ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with weights_only_loads(ckpt_dir):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        except ValueError as e:
            # the bf16 optimizer's files (also named bf16_zero_pp_rank_*, as ZeRO 1-3's in bf16) carry no ZeRO stage
            if "is not a zero checkpoint" not in str(e) or not any(ckpt_dir.glob("bf16_zero_pp_rank_*")):
                raise
            sd = _bf16_zero1_state_dict(ckpt_dir)
    elif (ckpt_dir / "mp_rank_00_model_states.pt").is_file():
        sd = safe_load(ckpt_dir / "mp_rank_00_model_states.pt")["module"]
    else:
        raise UsageError(f"{ckpt_dir} is not a DeepSpeed checkpoint (no model or optimizer state files)")
    return {k: v.float() for k, v in sd.items()}


def _bf16_zero1_state_dict(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a bf16 ZeRO-1 checkpoint (DeepSpeed's BF16_Optimizer): each rank's file holds,
    per param group, its flat fp32 partition and where each parameter's piece lies in it
    (`param_slice_mappings`: name -> (start, numel)). A parameter's pieces, in rank order, are its
    flattened fp32 values; shapes and tied names come from the saved (bf16) module."""
    import re

    def rank_of(f: Path) -> int:
        return int(re.search(r"bf16_zero_pp_rank_(\d+)_", f.name).group(1))

    module = safe_load(ckpt_dir / "mp_rank_00_model_states.pt", deepspeed_state=True)["module"]
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in sorted(ckpt_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of):
        opt = safe_load(f, deepspeed_state=True)["optimizer_state_dict"]
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat[frag.start: frag.start + frag.numel])
    # (the saved tensors are views of DeepSpeed's flat buffers: compare where each view starts)
    by_address = {(module[n].data_ptr(), module[n].shape): n for n in pieces}
    sd = {}
    for name, t in module.items():
        # a tied name (lm_head.weight) is the same tensor as the one the optimizer holds
        src = name if name in pieces else by_address.get((t.data_ptr(), t.shape))
        sd[name] = torch.cat(pieces[src]).view(t.shape) if src is not None else t  # frozen: as saved
    return sd


# The converter run under `weights_only_loads` (it loads every file with weights_only=False);
# its worker processes are forked, so they inherit the setting. A refused file exits 2.
_UNIVERSAL_RUNNER = """
import runpy, sys, warnings
from llmstack.distributed.deepspeed import weights_only_loads
from llmstack.errors import UsageError
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")
sys.argv[0] = "ds_to_universal"
try:
    with weights_only_loads(sys.argv[2]):
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def to_universal(ckpt_dir: Path, out_dir: Path) -> None:
    """Convert a ZeRO checkpoint dir into DeepSpeed's universal format (loadable on any world size).

    Runs DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) as a subprocess: it
    parses its own argv and uses worker pools, neither of which belongs in our process.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _UNIVERSAL_RUNNER, "--input_folder", str(ckpt_dir), "--output_folder", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    refused = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: refusing to load")]
    if proc.returncode == 2 and refused:
        raise UsageError(refused[-1].removeprefix("error: "))
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise UsageError(f"DeepSpeed could not convert {ckpt_dir} to a universal checkpoint:\n{tail}")


# ---------------------------------------------------------------------------------------------
# Frozen models and ZeRO-3 gathering for RLHF (reference / reward models, rollouts)
# ---------------------------------------------------------------------------------------------


def create_inference_engine(model: nn.Module, ds_config: dict):
    """An engine without optimizer around a frozen model (PPO's reference and reward models,
    DPO's reference): under ZeRO-3 its parameters stay partitioned and are gathered layer by
    layer in forward. Other stages partition nothing without an optimizer, so the plain module
    (in eval mode, no gradients) is returned instead."""
    model.requires_grad_(False)
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return model.eval()
    import deepspeed

    _quiet_deepspeed()
    cfg = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, *_ = deepspeed.initialize(model=model, config=size_buckets(cfg, model))
    engine.eval()
    return engine


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module, zero_stage: int) -> None:
    """dst's parameters and buffers <- src's full values (same architecture; cast to dst's dtype).

    Under ZeRO-3 src is gathered module by module (each module's own parameters, then released
    before the next), so a rollout decodes from plain tensors instead of gathering every layer at
    every generated token, and the copy never needs more than one module's full weights (the
    largest: the embedding or the LM head) besides dst. Gathering the whole model at once would
    hold a second full copy of it for the duration. Buffers are never partitioned: copied as they are.
    """
    dst_modules = dict(dst.named_modules())
    seen: set[int] = set()  # a tied parameter (embedding = LM head) is copied once
    for name, m in src.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        target = dst_modules[name]
        if zero_stage != 3:
            for n, p in own:
                getattr(target, n).copy_(p)
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in own]):  # read only: no modifier rank
            for n, p in own:
                d = getattr(target, n)
                d.copy_(p.data.view(d.shape))
    dst_buffers = dict(dst.named_buffers())
    for n, b in src.named_buffers():
        dst_buffers[n].copy_(b)


def compile_engine(engine) -> None:
    """torch.compile a training engine's model (train.compile) the way DeepSpeed supports it:
    after `deepspeed.initialize`, through `engine.compile()`, which compiles `engine.module` in
    place (`nn.Module.compile`: parameter names and checkpoints unchanged) with the accelerator's
    backend (inductor on CPU and CUDA), marks the engine compiled and, when the raw ds_config
    enables DeepCompile (`compile: {deepcompile: true}`), installs its passes. Under ZeRO-3 the
    hooks that gather and release each layer's parameters are installed before tracing; dynamo
    recompiles them per module type and, past its recompile limit (8), runs them eagerly (a
    warning, not an error). Compiling the bare model before `deepspeed.initialize`, as the stages
    used to, bypasses all of this. Checked on CPU (torch 2.13, deepspeed 0.19.8): per-step losses
    of compiled ZeRO-0 and 2-process ZeRO-3 runs equal the eager run's (tests/distributed/test_compile.py)."""
    engine.compile(compile_kwargs={})

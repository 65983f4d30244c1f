"""Checkpoints that survive faults: temp dir, then rename, then the `latest` pointer.

Layout under `run.dir/checkpoints/`:
    step_<N>/              a complete checkpoint (DeepSpeed files + meta.json + rng_rank<R>.pt)
    .tmp_step_<N>/         a checkpoint being written; ignored and cleaned up by later runs
    latest                 text file naming the newest complete tag (DeepSpeed's convention,
                           so DeepSpeed's own tools read it too); replaced atomically
A directory is renamed to step_<N> only after every rank has written its files, so any
step_<N> that exists is complete; `resume=auto` takes `latest`, or the newest step_<N>.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from llmstack.dist import deepspeed as ds
from llmstack.dist import env
from llmstack.errors import UsageError

_STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
# Test hook: SIGKILL this process after the files of checkpoint step N are written but before the
# rename, i.e. the worst moment for a crash. Used by the fault-tolerance test.
FAULT_ENV = "LLMSTACK_FAULT_KILL_IN_SAVE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a user path: step_N/, a `latest` file, or a checkpoints/ or run dir."""
    p = Path(path)
    if p.name == "latest" and p.is_file():
        return p.parent / p.read_text().strip()
    if p.is_dir() and (p / META).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            return resolve(root / "latest")
        if steps := step_dirs(root):
            return steps[-1][1]
    if not p.exists():
        raise UsageError(f"checkpoint not found: {p}")
    raise UsageError(f"{p} is not a checkpoint (expected step_N/ with {META}, a latest file, or a run dir)")


def find_resume(root: Path) -> Path | None:
    """The newest complete checkpoint under root (latest first, then the highest step_N), or None."""
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if (cand / META).is_file():
            return cand
    steps = [(n, p) for n, p in step_dirs(root) if (p / META).is_file()]
    return steps[-1][1] if steps else None


def save(engine, root: Path, step: int, meta: dict, client_state: dict, keep_last: int) -> Path:
    """Write checkpoint step_<step> atomically. Every rank calls this."""
    tag = f"step_{step}"
    tmp, final = root / f".tmp_{tag}", root / tag
    if env.is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save of the same step
    env.barrier()
    ds.save_engine(engine, root, tmp.name, client_state)
    torch.save(rng_state(), tmp / f"rng_rank{env.rank()}.pt")
    env.barrier()
    if os.environ.get(FAULT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if env.is_main():
        _write_atomic(tmp / META, json.dumps(meta, indent=2, default=str))
        if final.exists():  # re-saving the same step (e.g. the final step after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", tag)
        for _, old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    env.barrier()
    return final


def load(engine, ckpt: Path, *, load_optimizer: bool = True, restore_rng: bool = True) -> tuple[dict, dict]:
    """Restore engine (and this rank's RNG) from a checkpoint dir; returns (meta, client_state)."""
    meta_file = ckpt / META
    if not meta_file.is_file():
        raise UsageError(f"{ckpt} is not a complete checkpoint (no {META})")
    meta = json.loads(meta_file.read_text())
    client = ds.load_engine(engine, ckpt.parent, ckpt.name, load_optimizer=load_optimizer,
                            universal=bool(meta.get("universal")))
    rng_file = ckpt / f"rng_rank{env.rank()}.pt"
    if restore_rng and rng_file.is_file() and meta.get("world_size") == env.world_size():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta, client


def read_meta(ckpt: Path) -> dict:
    meta_file = Path(ckpt) / META
    if not meta_file.is_file():
        raise UsageError(f"{ckpt} is not a complete checkpoint (no {META})")
    return json.loads(meta_file.read_text())


def consolidate(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write one checkpoint (any ZeRO stage, any world size) as a single fp32 model file.

    out_dir gets `model.safetensors` (a tied output embedding is stored once, as safetensors
    requires), and `llmstack_model.json` with the architecture, tokenizer hash and source step.
    """
    from safetensors.torch import save_file

    src = resolve(ckpt)
    meta = read_meta(src)
    state = merge_adapters(ds.consolidated_state_dict(src), meta, src)
    if meta.get("model", {}).get("tie_embeddings"):
        state.pop("lm_head.weight", None)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    info = {k: meta.get(k) for k in ("model_family", "model", "config", "tokenizer_hash", "tokenizer_path", "step", "tokens")}
    (tmp / "llmstack_model.json").write_text(json.dumps({**info, "source": str(src)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def reshape(ckpt: str | Path, out: str | Path | None = None) -> Path:
    """Make a checkpoint resumable on any number of processes (DeepSpeed universal format).

    Writes `<step_N>_universal/` beside the checkpoint (or `out`) atomically, with meta.json
    marked `universal`; resume from it with `train.resume=<that path>`. Per-rank RNG states are
    not carried over: they belong to the old ranks.
    """
    src = resolve(ckpt)
    meta = read_meta(src)
    if meta.get("universal"):
        raise UsageError(f"{src} is already a universal checkpoint")
    if meta.get("zero_stage", 0) == 0:
        raise UsageError(f"{src} was written with ZeRO stage 0: it is not partitioned, every world size can load it")
    final = Path(out) if out else src.parent / f"{src.name}_universal"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.to_universal(src, tmp)
    _write_atomic(tmp / META, json.dumps({**meta, "universal": True, "source": str(src)}, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if (final.parent / "latest_universal").is_file():  # the converter's pointer names the temp dir
        _write_atomic(final.parent / "latest_universal", final.name)
    return final


def load_consolidated(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(info, state dict) of a directory written by `consolidate`."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / "model.safetensors").is_file():
        raise UsageError(f"{d} has no model.safetensors (make one with `llmstack checkpoint consolidate`)")
    return json.loads((d / "llmstack_model.json").read_text()), load_file(str(d / "model.safetensors"))


def read_weights(path: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(source, info, fp32 state dict) of any weights a stage can start from.

    A consolidated or imported directory (llmstack_model.json), a Hugging Face model directory
    (config.json; converted in memory), or a checkpoint of any ZeRO stage (step_N, a `latest`
    file, a run dir). `info` has at least model_family, model (the architecture) and tokenizer_hash.
    """
    p = Path(path)
    if (p / "llmstack_model.json").is_file():
        info, state = load_consolidated(p)
        if (p / "tokenizer.json").is_file():  # an imported directory carries its tokenizer, wherever it moved
            info["tokenizer_path"] = str(p)
        return p, info, state
    if (p / "config.json").is_file() and not (p / META).is_file():
        from dataclasses import asdict

        from data_pipeline.tokenizer import tokenizer_hash
        from llmstack.models.hf import ConversionError, load_pretrained

        try:
            family, cfg, state, _ = load_pretrained(p)
        except ConversionError as e:
            raise UsageError(f"{p}: {e}") from None
        has_tok = (p / "tokenizer.json").is_file()
        info = {"model_family": family, "model": asdict(cfg), "tokenizer_path": str(p) if has_tok else None,
                "tokenizer_hash": tokenizer_hash(p) if has_tok else None, "source": str(p)}
        return p, info, state
    src = resolve(p)
    meta = read_meta(src)
    return src, meta, merge_adapters(ds.consolidated_state_dict(src), meta, src)


def merge_adapters(state: dict[str, torch.Tensor], meta: dict, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict: LoRA adapters of an `llmstack sft` checkpoint merged in.

    ZeRO 1-2 consolidation rebuilds only the optimizer's (trainable) parameters; the frozen base
    weights come from the module state DeepSpeed saves whole for those stages (LoRA under ZeRO-3
    is refused, so they are never partitioned).
    """
    if not meta.get("lora"):
        return state
    from llmstack.models.lora import merge_lora_state

    module_file = ckpt_dir / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
        state = {**{k: v.float() for k, v in module.items()}, **state}
    return merge_lora_state(state, meta["lora"]["scaling"])


def load_for_inference(path: str | Path, tokenizer_path: str | None = None):
    """(model in eval mode, tokenizer, info) from anything `read_weights` reads, of any family.

    The tokenizer is the one recorded with the weights unless `tokenizer_path` is given; its
    hash must match the recorded one either way.
    """
    from llmstack import models

    _, info, state = read_weights(path)
    family = info.get("model_family", "gpt")
    tokenizer = recorded_tokenizer(info, path, tokenizer_path)
    try:
        arch = models.config_from_dict(family, dict(info["model"], activation_checkpointing=False))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: bad recorded architecture: {e}") from None
    model = models.build_model(family, arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and arch.tie_embeddings)]:
        raise UsageError(f"{path}: weights do not fit the recorded architecture ({missing[:3]}, {unexpected[:3]})")
    return model.eval(), tokenizer, info


def recorded_tokenizer(info: dict, where, tokenizer_path: str | None = None):
    """The tokenizer recorded with a checkpoint (or `tokenizer_path`), checked against its hash."""
    from data_pipeline.tokenizer import load_tokenizer

    tok_path = tokenizer_path or info.get("tokenizer_path")
    if not tok_path or not (Path(tok_path) / "tokenizer.json").is_file():
        raise UsageError(f"tokenizer of {where} not found at {tok_path!r}; pass its directory with --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if info.get("tokenizer_hash") and info["tokenizer_hash"] != tokenizer.hash:
        raise UsageError(f"tokenizer mismatch: {where} was trained with tokenizer {info['tokenizer_hash']}, "
                         f"{tok_path} is {tokenizer.hash}")
    return tokenizer

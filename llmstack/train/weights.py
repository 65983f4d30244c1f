"""The weights a stage (`model.init`), export, generate or eval starts from, as one fp32 state dict.

Three sources, read by `read_weights` into (source, CheckpointMeta, state dict):
- a model directory: `model.safetensors` + `llmstack_model.json`, written by `consolidate` (a
  checkpoint as one file) or `llmstack import` (a Hugging Face model converted once);
- a Hugging Face model directory (config.json), converted in memory on every read;
- a training checkpoint of any ZeRO stage and world size (step_N/, a `latest` file, a run dir),
  verified against its manifest and gathered into full tensors (checkpoint.py is its format).
LoRA adapters of an `sft` checkpoint are merged into the base weights on read, so every reader
sees a plain model of its family; a consolidated directory holds the merged weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from llmstack.distributed import deepspeed as ds
from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt
from llmstack.train.meta import CheckpointMeta

MODEL_FILE = "model.safetensors"
INFO = "llmstack_model.json"
# What llmstack_model.json records: the facts about the weights, not the ZeRO layout, data cursor
# or optimizer of the run that trained them (no `lora` either: the adapters are merged).
CONSOLIDATED_KEYS = ("model_family", "model", "config", "tokenizer_hash", "tokenizer_path", "step", "tokens", "source")
IMPORTED_KEYS = ("model_family", "model", "tokenizer_hash", "tokenizer_path", "source", "hf_model_type", "special_ids")


def read_info(model_dir: str | Path) -> CheckpointMeta:
    """The llmstack_model.json of a consolidated or imported directory (a UsageError naming the
    file when it is missing or unreadable)."""
    f = Path(model_dir) / INFO
    if not f.is_file():
        raise UsageError(f"{model_dir} is not a model directory (no {INFO})")
    try:
        return CheckpointMeta.read(f)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{f} is unreadable: {e}") from None


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write one checkpoint (any ZeRO stage, any world size) as a single fp32 model file.

    out_dir gets `model.safetensors` (a tied output embedding is stored once, as safetensors
    requires), and `llmstack_model.json` with the architecture, tokenizer hash and source step.
    It must not exist or be empty: nothing is ever replaced here (`llmstack checkpoint
    consolidate --overwrite` replaces a previous output, see stages/export.py). The files are
    written into a temp directory beside it, renamed into place when complete.
    """
    from safetensors.torch import save_file

    src = ckpt.resolve(checkpoint)
    meta = ckpt.read_meta(src)
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UsageError(f"{out} exists and is not an empty directory: consolidate writes a new one")
    ckpt.check(src, rng=False)
    state = merge_adapters(ds.consolidated_state_dict(src), meta, src)
    if meta.tied_embeddings:
        state.pop("lm_head.weight", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        new = stage / "new"  # made with the usual permissions (mkdtemp's own are owner-only)
        new.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(new / MODEL_FILE))
        (new / INFO).write_text(meta.replace(source=str(src)).to_json(only=CONSOLIDATED_KEYS))
        os.replace(new, out)  # onto a missing or empty directory only (a non-empty one fails, untouched)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def load_consolidated(model_dir: str | Path) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    """(record, state dict) of a directory written by `consolidate` or `llmstack import`."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / MODEL_FILE).is_file():
        raise UsageError(f"{d} has no {MODEL_FILE} (make one with `llmstack checkpoint consolidate`)")
    return read_info(d), load_file(str(d / MODEL_FILE))


def read_weights(path: str | Path, backend: str = "native") -> tuple[Path, CheckpointMeta, dict[str, torch.Tensor]]:
    """(source, record, fp32 state dict) of any weights a stage can start from (module docstring).

    The record has at least model_family, model (the architecture) and tokenizer_hash (None when
    unknown); for a Hugging Face directory it is built from its config.json and tokenizer, which
    `backend`=hf reads through the model's own transformers class, unconverted (family "hf").
    """
    p = Path(path)
    if (p / INFO).is_file():
        info, state = load_consolidated(p)
        if (p / "tokenizer.json").is_file():  # an imported directory carries its tokenizer, wherever it moved
            info = info.replace(tokenizer_path=str(p))
        return p, info, state
    if (p / "config.json").is_file() and not (p / ckpt.META).is_file():
        from data_pipeline.tokenizer import tokenizer_hash
        from llmstack.models.hf import ConversionError, load_pretrained

        has_tok = (p / "tokenizer.json").is_file()
        tok = dict(tokenizer_path=str(p) if has_tok else None, tokenizer_hash=tokenizer_hash(p) if has_tok else None)
        if backend == "hf":
            from llmstack.models import hf_backend

            try:
                arch = hf_backend.read_arch(p)
            except ValueError as e:
                raise UsageError(f"{p}: {e}") from None
            return p, CheckpointMeta(model_family="hf", model=asdict(arch), source=str(p), **tok), \
                hf_backend.read_state(p)
        try:
            family, cfg, state, hf_config = load_pretrained(p)
        except ConversionError as e:
            raise UsageError(f"{p}: {e}") from None
        return p, CheckpointMeta.from_hf(family, asdict(cfg), hf_config, source=str(p), **tok), state
    src = ckpt.resolve(p)
    meta = ckpt.read_meta(src)
    ckpt.check(src, rng=False)  # every process reads the whole checkpoint here, so each checks all of it
    return src, meta, merge_adapters(ds.consolidated_state_dict(src), meta, src)


# State-dict entries with one row per token (under "backbone." in a reward model or critic;
# embed_tokens: a transformers model's own names)
VOCAB_ROWS = ("wte.weight", "lm_head.weight", "embed_tokens.weight",
              "embed_in.weight", "embed_out.weight")  # (the last two: a GPT-NeoX under model.backend=hf)


def grow_vocab(state: dict[str, torch.Tensor], old: int, new: int) -> dict[str, torch.Tensor]:
    """`state` with its token embedding and LM head (tied or not) grown from `old` to `new` rows,
    for tokens added to its tokenizer. Each new row is the mean of the existing rows, so an added
    token starts as an average token (its logit is about the mean logit, not a random spike that a
    random row can give); the existing rows are unchanged."""
    out = dict(state)
    for k, v in state.items():
        if any(k == n or k.endswith("." + n) for n in VOCAB_ROWS) and v.dim() == 2 and v.shape[0] == old < new:
            mean = v.float().mean(0, keepdim=True).to(v.dtype)
            out[k] = torch.cat([v, mean.expand(new - old, -1)])
    return out


def merge_adapters(state: dict[str, torch.Tensor], meta: CheckpointMeta, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict: LoRA adapters of an `llmstack sft` checkpoint merged in.

    ZeRO 1-2 consolidation rebuilds only the optimizer's (trainable) parameters; the frozen base
    weights come from the module state DeepSpeed saves whole for those stages (LoRA under ZeRO-3
    is refused, so they are never partitioned).
    """
    if not meta.lora:
        return state
    if meta.lora_scaling is None:
        raise UsageError(f"{ckpt_dir / ckpt.META} records LoRA adapters without their scaling")
    from llmstack.models.lora import merge_lora_state

    module_file = Path(ckpt_dir) / "mp_rank_00_model_states.pt"
    if module_file.is_file():
        module = ds.safe_load(module_file)["module"]
        state = {**{k: v.float() for k, v in module.items()}, **state}
    return merge_lora_state(state, meta.lora_scaling)


def architecture(meta: CheckpointMeta, where) -> tuple[str, object]:
    """(family, config dataclass) of the recorded architecture, for inference (no activation
    checkpointing); a UsageError naming `where` when it is missing or not one of the family's."""
    from llmstack import models

    if not isinstance(meta.model, dict):
        raise UsageError(f"{where}: no recorded architecture (its metadata has no model)")
    try:
        return meta.model_family, models.config_from_dict(meta.model_family,
                                                          dict(meta.model, activation_checkpointing=False))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: bad recorded architecture: {e}") from None


def load_for_inference(path: str | Path, tokenizer_path: str | None = None):
    """(model in eval mode, tokenizer, record) from anything `read_weights` reads, of any family.

    The tokenizer is the one recorded with the weights unless `tokenizer_path` is given; its
    hash must match the recorded one either way.
    """
    from llmstack import models

    _, info, state = read_weights(path)
    tokenizer = recorded_tokenizer(info, path, tokenizer_path)
    family, arch = architecture(info, path)
    model = models.build_model(family, arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and arch.tie_embeddings)]:
        raise UsageError(f"{path}: weights do not fit the recorded architecture ({missing[:3]}, {unexpected[:3]})")
    return model.eval(), tokenizer, info


def recorded_tokenizer(info: CheckpointMeta, where, tokenizer_path: str | None = None):
    """The tokenizer recorded with the weights (or `tokenizer_path`), checked against its hash."""
    from data_pipeline.tokenizer import load_tokenizer

    tok_path = tokenizer_path or info.tokenizer_path
    if not tok_path or not (Path(tok_path) / "tokenizer.json").is_file():
        raise UsageError(f"tokenizer of {where} not found at {tok_path!r}; pass its directory with --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if info.tokenizer_hash and info.tokenizer_hash != tokenizer.hash:
        raise UsageError(f"tokenizer mismatch: {where} was trained with tokenizer {info.tokenizer_hash}, "
                         f"{tok_path} is {tokenizer.hash}")
    return tokenizer

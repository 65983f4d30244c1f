"""`llmstack export` and `llmstack import`: native checkpoints <-> Hugging Face directories.

export: a checkpoint (any ZeRO stage), a consolidated or imported directory -> config.json,
model.safetensors (sharded beyond --max-shard-size) and the tokenizer files, which
`AutoModelFor*.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load as they are.

import: a Hugging Face directory of GPT-2, LLaMA, BERT (masked LM) or T5 -> a native model
directory (model.safetensors + llmstack_model.json + the tokenizer files) that
`model.init`, `llmstack generate`, `llmstack-eval` and `llmstack export` all accept.

A checkpoint of `llmstack sft` with LoRA adapters is exported merged (W + alpha/r B A; see
models/lora.py and checkpoint.merge_adapters).

Both write into a temp directory and rename it into place, so an interrupted run leaves no
half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from llmstack import models
from llmstack.errors import UsageError
from llmstack.models import hf
from llmstack.train import checkpoint as ckpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# tokenizer files copied along (whatever of them the tokenizer directory has)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "llmstack_tokenizer.json",
                   "chat_template.jinja",
                   "sentencepiece.model", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")


def _peek_info(path: str | Path) -> dict | None:
    """The recorded architecture without loading weights (None for an HF directory)."""
    p = Path(path)
    if (p / "llmstack_model.json").is_file():
        return json.loads((p / "llmstack_model.json").read_text())
    if (p / "config.json").is_file() and not (p / ckpt.META).is_file():
        return None
    return ckpt.read_meta(ckpt.resolve(p))


def _arch(info: dict):
    family = info.get("model_family", "gpt")
    try:
        return family, models.config_from_dict(family, dict(info["model"], activation_checkpointing=False))
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"bad recorded architecture: {e}") from None


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied = True
    return copied


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export(checkpoint: str, out: str, *, tokenizer_path: str | None = None, dtype: str = "fp32",
           max_shard_size: str = "5GB") -> Path:
    """Write a Hugging Face model directory (config, safetensors, tokenizer) for `checkpoint`."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: allowed {', '.join(DTYPES)}")
    info = _peek_info(checkpoint)
    if info is not None:  # refuse an architecture without HF counterpart before loading any weight
        family, cfg = _arch(info)
        try:
            hf.target(family, cfg)
        except hf.ConversionError as e:
            raise UsageError(f"cannot export {checkpoint}: {e}") from None
    src, info, state = ckpt.read_weights(checkpoint)
    family, cfg = _arch(info)
    tok = ckpt.recorded_tokenizer(info, checkpoint, tokenizer_path)
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(family, cfg, state, tmp, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                           max_shard_bytes=hf.parse_size(max_shard_size), dtype=None if dtype == "fp32" else DTYPES[dtype])
    except hf.ConversionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot export {checkpoint}: {e}") from None
    except ValueError as e:  # a bad --max-shard-size
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"export: {e}") from None
    _copy_tokenizer(Path(tok.path), tmp)
    _add_chat_template(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def _add_chat_template(out: Path) -> None:
    """Give an exported llmstack tokenizer the chat template if its files predate it (role tokens
    present): `apply_chat_template` then works on the export. Others are left as they are."""
    from data_pipeline.tokenizer import write_chat_template

    if not (out / "llmstack_tokenizer.json").is_file():
        return
    try:
        write_chat_template(out)
    except ValueError:  # no role tokens: nothing to template
        pass


def import_hf(hf_dir: str, out: str) -> Path:
    """Convert a Hugging Face directory into a native model directory (see module docstring)."""
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import tokenizer_hash

    src = Path(hf_dir)
    if not src.is_dir():
        raise UsageError(f"not a directory: {src}")
    try:
        family, cfg, state, hf_config = hf.load_pretrained(src)
    except hf.ConversionError as e:
        raise UsageError(f"cannot import {src}: {e}") from None
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    has_tok = _copy_tokenizer(src, tmp) and (tmp / "tokenizer.json").is_file()
    info = {"model_family": family, "model": asdict(cfg), "tokenizer_hash": tokenizer_hash(tmp) if has_tok else None,
            "tokenizer_path": str(out_dir) if has_tok else None, "source": str(src),
            "hf_model_type": hf_config.get("model_type"),
            "special_ids": {k: hf_config.get(f"{k}_token_id") for k in ("pad", "bos", "eos")}}
    (tmp / "llmstack_model.json").write_text(json.dumps(info, indent=2) + "\n")
    _replace_dir(tmp, out_dir)
    return out_dir

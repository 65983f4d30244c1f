"""`llmstack export` and `llmstack import`: native checkpoints <-> Hugging Face directories.

export: a checkpoint (any ZeRO stage), a consolidated or imported directory -> config.json,
model.safetensors (sharded beyond --max-shard-size) and the tokenizer files, which
`AutoModelFor*.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load as they are.

import: a Hugging Face directory of GPT-2, LLaMA, BERT (masked LM) or T5 -> a native model
directory (model.safetensors + llmstack_model.json + the tokenizer files) that
`model.init`, `llmstack generate`, `llmstack-eval` and `llmstack export` all accept.

A checkpoint of `llmstack sft` with LoRA adapters is exported merged (W + alpha/r B A; see
models/lora.py and checkpoint.merge_adapters).

`--out` rules (shared with `llmstack checkpoint consolidate`, see `staged_output`): a missing or
empty directory is written; an existing non-empty one is refused (exit 2) unless `--overwrite`,
and even then only when it is a previous output of the same command: nothing in it but the
files that command writes (a run directory, checkpoints, a sub-directory or any other file make
it refused) and its signature file (`config.json` for export, `llmstack_model.json` of the same
kind for consolidate / import). The output is written into a fresh temp directory beside --out
and swapped in only when complete; the old directory is deleted only after the new one is in
place, so an interrupted or failed run leaves the previous output as it was. --out may not be
(or contain) the command's input.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
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


# What each command writes into --out: (file names, pattern of further names, signature file).
# A directory is a previous output of the command only if it holds these and nothing else.
_OUTPUTS = {
    "export": ({"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                *TOKENIZER_FILES}, re.compile(r"model-\d{5}-of-\d{5}\.safetensors"), "config.json"),
    "checkpoint consolidate": ({"model.safetensors", "llmstack_model.json"}, None, "llmstack_model.json"),
    "import": ({"model.safetensors", "llmstack_model.json", *TOKENIZER_FILES}, None, "llmstack_model.json"),
}


def not_previous_output(out: Path, command: str) -> str | None:
    """Why the existing directory `out` is not a previous output of `llmstack <command>` (None if it is)."""
    names, pattern, signature = _OUTPUTS[command]
    for entry in sorted(out.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}{'/' if entry.is_dir() else ''}, which is not a plain file"
        if entry.name not in names and not (pattern and pattern.fullmatch(entry.name)):
            return f"it holds {entry.name}, which `llmstack {command}` does not write"
    if not (out / signature).is_file():
        return f"it has no {signature}"
    if signature == "llmstack_model.json":  # consolidate and import write the same names
        try:
            imported = "hf_model_type" in json.loads((out / signature).read_text())
        except (OSError, ValueError):
            return f"its {signature} is not readable JSON"
        if imported != (command == "import"):
            return f"it was written by `llmstack {'import' if imported else 'checkpoint consolidate'}`"
    return None


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out: str | Path, command: str, *, overwrite: bool = False, inputs=()) -> None:
    """UsageError unless `llmstack <command>` may write --out `out` (rules: module docstring)."""
    out = Path(out)
    where = out.resolve()
    for src in inputs:
        # (--out inside the input is fine: `export runs/x --out runs/x/hf` replaces nothing of it)
        if src is not None and _within(Path(src).resolve(), where):
            raise UsageError(f"--out {out} is or contains the input {src}: choose another output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace a previous output "
                         f"of `llmstack {command}`, or choose another directory")
    if why := not_previous_output(out, command):
        raise UsageError(f"--out {out}: refusing to overwrite it: {why}; --overwrite only replaces a directory "
                         f"written by `llmstack {command}`")


@contextlib.contextmanager
def staged_output(out: str | Path, command: str, *, overwrite: bool = False, inputs=()):
    """Yield a fresh path to write `command`'s output to; swap it in as `out` when the block succeeds.

    The path is inside a new temp directory beside `out` (same filesystem, so the swap is a
    rename). A previous `out` (see `check_output_dir`, checked again before the swap) is moved
    into that temp directory, the new output renamed into its place, and only then the old one
    deleted; if the block fails, `out` is left untouched.
    """
    out = Path(out)
    check_output_dir(out, command, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        new = stage / "new"
        yield new
        check_output_dir(out, command, overwrite=overwrite, inputs=inputs)  # it may have changed meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            os.replace(out, stage / "old")
            try:
                os.replace(new, out)
            except BaseException:
                os.replace(stage / "old", out)
                raise
        else:
            os.replace(new, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def consolidate(checkpoint: str, out: str, *, overwrite: bool = False) -> Path:
    """`llmstack checkpoint consolidate`: `checkpoint.consolidate` under the --out rules above."""
    with staged_output(out, "checkpoint consolidate", overwrite=overwrite, inputs=[checkpoint]) as new:
        ckpt.consolidate(checkpoint, new)
    return Path(out)


def export(checkpoint: str, out: str, *, tokenizer_path: str | None = None, dtype: str = "fp32",
           max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory (config, safetensors, tokenizer) for `checkpoint`
    (--out rules: module docstring)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: allowed {', '.join(DTYPES)}")
    check_output_dir(out, "export", overwrite=overwrite, inputs=[checkpoint, tokenizer_path])  # before any work
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
    with staged_output(out, "export", overwrite=overwrite, inputs=[checkpoint, tok.path]) as tmp:
        try:
            hf.save_pretrained(family, cfg, state, tmp, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                               max_shard_bytes=hf.parse_size(max_shard_size),
                               dtype=None if dtype == "fp32" else DTYPES[dtype])
        except hf.ConversionError as e:
            raise UsageError(f"cannot export {checkpoint}: {e}") from None
        except ValueError as e:  # a bad --max-shard-size
            raise UsageError(f"export: {e}") from None
        _copy_tokenizer(Path(tok.path), tmp)
        _add_chat_template(tmp)
    return Path(out)


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


def import_hf(hf_dir: str, out: str, *, overwrite: bool = False) -> Path:
    """Convert a Hugging Face directory into a native model directory (see module docstring)."""
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import tokenizer_hash

    src = Path(hf_dir)
    if not src.is_dir():
        raise UsageError(f"not a directory: {src}")
    check_output_dir(out, "import", overwrite=overwrite, inputs=[src])  # before any work
    try:
        family, cfg, state, hf_config = hf.load_pretrained(src)
    except hf.ConversionError as e:
        raise UsageError(f"cannot import {src}: {e}") from None
    out_dir = Path(out)
    with staged_output(out_dir, "import", overwrite=overwrite, inputs=[src]) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        has_tok = _copy_tokenizer(src, tmp) and (tmp / "tokenizer.json").is_file()
        info = {"model_family": family, "model": asdict(cfg),
                "tokenizer_hash": tokenizer_hash(tmp) if has_tok else None,
                "tokenizer_path": str(out_dir) if has_tok else None, "source": str(src),
                "hf_model_type": hf_config.get("model_type"),
                "special_ids": {k: hf_config.get(f"{k}_token_id") for k in ("pad", "bos", "eos")}}
        (tmp / "llmstack_model.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir

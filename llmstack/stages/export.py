"""`llmstack export` and `llmstack import`: native checkpoints <-> Hugging Face directories.

export: a checkpoint (any ZeRO stage), a consolidated or imported directory -> config.json,
model.safetensors (sharded beyond --max-shard-size) and the tokenizer files (with its chat
template), which `AutoModelFor*.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load
as they are. config.json and, for decoders, generation_config.json carry the model's BOS / EOS /
PAD ids (`special_ids`: EOS may be a list), so transformers' `generate` stops where
`llmstack generate` does.

import: a Hugging Face directory of GPT-2, Llama 2/3.x, Qwen2/2.5/3, Mistral, Phi-3, GPT-NeoX
(Pythia), Gemma 2/3, BERT (masked LM) or T5 -> a native model
directory (model.safetensors + llmstack_model.json, which records the pad / bos / eos ids of its
config.json and generation_config.json, + the tokenizer files) that
`model.init`, `llmstack generate`, `llmstack-eval` and `llmstack export` all accept.

A checkpoint of `llmstack sft` with LoRA adapters is exported merged (W + alpha/r B A; see
models/lora.py and weights.merge_adapters).

`--out` rules: llmstack/train/outputs.py.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from llmstack.errors import UsageError
from llmstack.models import hf
from llmstack.train import checkpoint as ckpt
from llmstack.train import weights
from llmstack.train.meta import CheckpointMeta
from llmstack.train.outputs import TOKENIZER_FILES, check_output_dir, staged_output

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# tokenizer files copied along (whatever of them the tokenizer directory has)

def _peek_info(path: str | Path) -> CheckpointMeta | None:
    """The recorded architecture without loading weights (None for an HF directory)."""
    p = Path(path)
    if (p / weights.INFO).is_file():
        return weights.read_info(p)
    if (p / "config.json").is_file() and not (p / ckpt.META).is_file():
        return None
    return ckpt.read_meta(ckpt.resolve(p))


def _copy_tokenizer(src: Path, dst: Path) -> bool:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied = True
    return copied


def consolidate(checkpoint: str, out: str, *, overwrite: bool = False) -> Path:
    """`llmstack checkpoint consolidate`: `weights.consolidate` under the --out rules above."""
    with staged_output(out, "checkpoint consolidate", overwrite=overwrite, inputs=[checkpoint]) as new:
        weights.consolidate(checkpoint, new)
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
        family, cfg = weights.architecture(info, checkpoint)
        if info.head == "scalar":
            raise UsageError(f"cannot export {checkpoint}: it is a reward model / critic (a scalar head), "
                             "not a causal language model")
        try:
            if family != "hf":  # (model.backend=hf: written back through its own class)
                hf.target(family, cfg)
        except hf.ConversionError as e:
            raise UsageError(f"cannot export {checkpoint}: {e}") from None
    src, info, state = weights.read_weights(checkpoint)
    family, cfg = weights.architecture(info, checkpoint)
    tok = weights.recorded_tokenizer(info, checkpoint, tokenizer_path)
    with staged_output(out, "export", overwrite=overwrite, inputs=[checkpoint, tok.path]) as tmp:
        try:
            ids = special_ids(tok, info)
            eos = ids["eos"][0] if len(ids["eos"]) == 1 else (ids["eos"] or None)
            if family == "hf":
                _save_hf_backend(cfg, state, tmp, DTYPES[dtype], hf.parse_size(max_shard_size), ids["pad"])
            else:
                hf.save_pretrained(family, cfg, state, tmp, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=eos,
                                   max_shard_bytes=hf.parse_size(max_shard_size),
                                   dtype=None if dtype == "fp32" else DTYPES[dtype])
        except hf.ConversionError as e:
            raise UsageError(f"cannot export {checkpoint}: {e}") from None
        except ValueError as e:  # a bad --max-shard-size
            raise UsageError(f"export: {e}") from None
        _copy_tokenizer(Path(tok.path), tmp)
        _add_chat_template(tmp)
    return Path(out)


def _save_hf_backend(cfg, state: dict, out: Path, dtype: torch.dtype, max_shard_bytes: int, pad_id) -> None:
    """A model.backend=hf causal LM written back through its transformers class: its config.json
    (special ids included) as it came, a pad the run added (tokenizer.add_pad) named in it, and the
    generation_config.json of the directory it was trained from (an EOS list, sampling defaults)
    when that has one."""
    import json

    from llmstack.models import hf_backend

    hf_backend.save_pretrained(cfg, state, out, dtype=dtype, max_shard_bytes=max_shard_bytes, pad_id=pad_id)
    src = Path(cfg.source) / "generation_config.json" if cfg.source else None
    if src is not None and src.is_file():
        gen = json.loads(src.read_text(encoding="utf-8"))
        if pad_id is not None and gen.get("pad_token_id") is None:
            gen["pad_token_id"] = pad_id
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def special_ids(tok, info: CheckpointMeta) -> dict:
    """{"pad": id | None, "bos": id | None, "eos": [ids]} of a model: the tokenizer's own, and the
    ids an imported model's config.json / generation_config.json name (recorded at import, also
    in the imported directory a fine-tuned checkpoint's tokenizer comes from). EOS may be several
    (Llama 3 Instruct stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>); the recorded list
    keeps its order, the tokenizer's EOS is added if it is not in it. A fine-tuning run's
    tokenizer with added tokens (tokenizer.add_pad, add_tokens) names its new pad; the ids of its
    base are recorded with it."""
    recorded = info.special_ids
    if not recorded and tok.path and (Path(tok.path) / weights.INFO).is_file():
        try:
            recorded = weights.read_info(tok.path).special_ids
        except UsageError:
            recorded = None
    # a run's extended copy (tokenizer.add_pad, add_tokens) keeps the ids its base recorded
    recorded = recorded or getattr(tok, "added", {}).get("special_ids") or {}

    def one(name: str, own: int | None) -> int | None:
        v = recorded.get(name)
        return own if own is not None else (v if isinstance(v, int) else None)

    eos = recorded.get("eos")
    eos = [eos] if isinstance(eos, int) else [int(i) for i in eos or [] if isinstance(i, int)]
    if tok.eos_id is not None and tok.eos_id not in eos:
        eos.append(tok.eos_id)
    return {"pad": one("pad", tok.pad_id), "bos": one("bos", tok.bos_id), "eos": eos}


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
        hf_config = {**hf_config, "eos_token_id": _eos_with_generation_config(src, hf_config.get("eos_token_id"))}
        info = CheckpointMeta.from_hf(family, asdict(cfg), hf_config, source=str(src),
                                      tokenizer_path=str(out_dir) if has_tok else None,
                                      tokenizer_hash=tokenizer_hash(tmp) if has_tok else None)
        (tmp / weights.INFO).write_text(info.to_json(only=weights.IMPORTED_KEYS) + "\n")
    return out_dir


def _eos_with_generation_config(src: Path, eos):
    """config.json's eos_token_id (an int, a list or None) with generation_config.json's EOS ids
    added: some models name one EOS in the config and the stops of a chat turn in the generation
    config only (Llama 3 Instruct). An int when there is one id, a list when several."""
    import json

    ids = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    gen = src / "generation_config.json"
    try:
        more = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    except (OSError, ValueError, AttributeError):
        more = None
    for i in [more] if isinstance(more, int) else (more if isinstance(more, list) else []):
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids[0] if len(ids) == 1 else (ids or None)

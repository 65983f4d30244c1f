"""Build steps every training stage shares: tokenizer, run directory, model, engine, resume.

Each function takes plain arguments (or one config section), so a stage recipe reads as a list of
calls: tokenizer -> model (under ZeRO-3 init) -> engine -> data -> loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_pipeline import sources as data_sources
from data_pipeline import tokenizer as tokenization
from llmstack.config import SourceConfig, TokenizerConfig, to_yaml
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import RankError, UsageError
from llmstack import models
from llmstack.train import checkpoint as ckpt


def source_texts(sources: list[SourceConfig]):
    """Texts of every source, in order (one pass, streamed)."""
    for src in sources:
        try:
            yield from data_sources.iter_texts(src.path, text_field=src.text_field)
        except FileNotFoundError as e:
            raise UsageError(f"data source not found: {e}") from None
        except ValueError as e:
            raise UsageError(f"bad data source {src.path}: {e}") from None


def train_tokenizer(tok: TokenizerConfig, default_sources: list[SourceConfig]):
    """Train and save a tokenizer as the config says; returns the loaded tokenizer."""
    srcs = tok.train_sources or default_sources
    t0 = time.perf_counter()
    env.print0(f"training {tok.kind} tokenizer (vocab {tok.vocab_size}) on {', '.join(s.path for s in srcs)} -> {tok.path}")
    try:
        out = tokenization.train_tokenizer(
            source_texts(srcs), tok.path, kind=tok.kind, vocab_size=tok.vocab_size,
            min_frequency=tok.min_frequency, num_sentinels=tok.num_sentinels, max_chars=tok.max_chars,
        )
    except ValueError as e:
        raise UsageError(f"tokenizer: {e}") from None
    env.print0(f"tokenizer: {out.vocab_size} tokens, hash {out.hash}, {time.perf_counter() - t0:.1f}s")
    return out


# How long a rank looks for the tokenizer rank 0 has just trained or found: a network filesystem
# may show another host's new file only once its attribute cache expires.
TOKENIZER_VISIBLE_WAIT_S = 30.0


def ensure_tokenizer(tok: TokenizerConfig, default_sources: list[SourceConfig]):
    """Load tokenizer.path; if it does not exist yet, rank 0 trains it first and the others wait
    for it however long that takes (env.rank0_first: a wait on the store, not a collective that
    dist.timeout_s would end), then load it from tokenizer.path, which must be on a filesystem
    every node shares (or trained beforehand on each with `llmstack tokenizer train`)."""
    file = Path(tok.path) / "tokenizer.json"
    with env.rank0_first(f"training the tokenizer {tok.path}"):
        if env.is_main() and not file.is_file():
            train_tokenizer(tok, default_sources)
    if not env.is_main():
        deadline = time.monotonic() + TOKENIZER_VISIBLE_WAIT_S
        while not file.is_file():
            if time.monotonic() > deadline:
                raise RankError(
                    f"tokenizer.path={tok.path}: rank 0 trained or found it, but rank {env.rank()} on host "
                    f"{env.hostname()} does not see {file}. Put tokenizer.path on a filesystem every node shares, "
                    "or train it beforehand on every node with `llmstack tokenizer train CONFIG`")
            time.sleep(1.0)
    return tokenization.load_tokenizer(tok.path)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(run_dir: Path, cfg, tokenizer_hash: str, extra: dict | None = None) -> None:
    """Rank 0 records the resolved config, code revision and tokenizer hash in the run directory."""
    if not env.is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    info = {"git_revision": git_revision(), "tokenizer_hash": tokenizer_hash, "argv": sys.argv,
            "world_size": env.world_size(), "torch": torch.__version__, **(extra or {})}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))


def model_config(model_cfg, vocab_size: int, seq_len: int, activation_checkpointing: bool, pad_id: int | None = None):
    """The architecture (the family's config dataclass) from the config's model section; errors
    name the config keys. `pad_id` (BERT's padding row, T5's decoder start) comes from the tokenizer."""
    fields = dict(model_cfg.arch_fields(), activation_checkpointing=activation_checkpointing)
    if model_cfg.family != "gpt" and pad_id is not None:
        fields["pad_id"] = pad_id
    try:
        arch = models.build_config(model_cfg.family, model_cfg.preset, vocab_size, **fields)
    except (ValueError, TypeError) as e:
        raise UsageError(f"model: {e}") from None
    if arch.max_seq_len < seq_len:
        raise UsageError(f"data.seq_len={seq_len} exceeds model.max_seq_len={arch.max_seq_len}")
    return arch


def build_model(arch, ds_config: dict, zero_stage: int, seed: int):
    """Construct (partitioned under ZeRO-3) and initialise; identical weights for every stage/world."""
    torch.manual_seed(seed)
    with ds.model_init_context(ds_config, zero_stage):
        model = models.build_model(models.family_of_config(arch), arch)
    torch.manual_seed(seed)
    ds.init_weights(model, model.init_module_, zero_stage)
    return model


def load_init_weights(model, init_path: str, zero_stage: int, tokenizer_hash: str) -> Path:
    """Start from other weights (model.init): a checkpoint, a consolidated or imported directory
    (`llmstack import`), or a Hugging Face directory; same tokenizer and family required."""
    src, info, state = ckpt.read_weights(init_path)
    family = models.family_of_model(model)
    if info.get("model_family", "gpt") != family:
        raise UsageError(f"model.init={init_path} holds a {info.get('model_family')} model; this run trains a {family}")
    check_tokenizer(info.get("tokenizer_hash"), tokenizer_hash, src)
    # a directory that records no tokenizer (a Hugging Face one) passes the hash check with any
    saved_vocab, vocab = (info.get("model") or {}).get("vocab_size"), model.config.vocab_size
    if isinstance(saved_vocab, int) and saved_vocab != vocab:
        raise UsageError(f"model.init={init_path} embeds {saved_vocab} tokens, this run's tokenizer has {vocab}: "
                         "set tokenizer.path to the tokenizer of those weights")
    ds.load_state_dict_into(model, state, zero_stage)
    return src


def check_tokenizer(saved: str | None, current: str, where) -> None:
    if saved and saved != current:
        raise UsageError(
            f"tokenizer mismatch: {where} was made with tokenizer {saved}, the config's tokenizer is {current}; "
            "set tokenizer.path to the tokenizer of that checkpoint"
        )


def find_resume_checkpoint(resume: str, ckpt_root: Path, run_dir: Path | None = None) -> Path | None:
    """Start a run (every rank calls this once, first thing after env.init): rank 0 locks the run
    dir (default: the one holding ckpt_root) against a second run, then `auto`: the newest
    checkpoint that verifies; `none`: start fresh; else the given path, which must verify.
    Checkpoints the run will not continue are moved aside, never deleted (ckpt.start_run)."""
    return ckpt.start_run(resume, ckpt_root, run_dir or ckpt.run_dir_of(ckpt_root))


# Fields of a recorded architecture that may change on resume: how activations are stored and
# how much dropout the remaining steps use, not what the saved weights compute.
RESUMABLE_CHANGES = ("activation_checkpointing", "dropout", "attn_dropout")


def check_resume_architecture(saved_meta: dict, family: str, arch, where) -> None:
    """Refuse to resume `where` into another model than the one it saved: the checkpoint's
    recorded family and architecture (meta "model_family", "model") against this run's.

    Another size failed late with a shape error; a change that keeps every shape (n_head at the
    same d_model, rope_theta, the norm, the activation, the positions) loaded without complaint
    and went on training a different function of the saved weights. Fields the checkpoint does
    not record (written by an older version) are not compared.
    """
    diff = []
    if saved_meta.get("model_family", family) != family:
        diff.append(f"model.family: {saved_meta['model_family']!r} -> {family!r}")
    saved = saved_meta.get("model") or {}
    now = arch if isinstance(arch, dict) else dict(vars(arch))
    now = json.loads(json.dumps(now, default=str))  # as meta.json holds it (tuples as lists)
    diff += [f"model.{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(saved)
             if k in now and k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if diff:
        raise UsageError(f"cannot resume from {where}: this run's model differs from the checkpoint's ("
                         + "; ".join(diff) + "); resume with the checkpoint's architecture, or start a new run "
                         "(another run.dir, or train.resume=none)")


def recorded_architecture(path: str) -> tuple[str, dict] | None:
    """(family, architecture) recorded with starting weights (model.init), read without loading
    them: a consolidated or imported directory, or a checkpoint. None for a Hugging Face
    directory (only converting it tells) or a path that no longer holds a model."""
    p = Path(path)
    try:
        if (p / "llmstack_model.json").is_file():
            info = json.loads((p / "llmstack_model.json").read_text())
        elif (p / "config.json").is_file() and not (p / ckpt.META).is_file():
            return None
        else:
            info = ckpt.read_meta(ckpt.resolve(p))
    except (UsageError, OSError, ValueError):
        return None
    return (info.get("model_family", "gpt"), info["model"]) if isinstance(info.get("model"), dict) else None


def peak_flops(precision: str) -> float:
    """FLOP/s that MFU divides by: vendor peak on known GPUs, else a matmul peak measured now."""
    from llmstack.train.metrics import measure_matmul_peak, vendor_peak

    dev = env.device()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return vendor_peak(dev, precision) or measure_matmul_peak(dev, dtype, seconds=0.3)


# --- RLHF stages (rm, dpo, ppo): starting weights, tokenizer, policy / scalar-head models ---


def read_init(init_path: str | None) -> tuple[Path, dict, dict] | None:
    """(source, info, fp32 state) of model.init, or None when training from scratch."""
    return ckpt.read_weights(init_path) if init_path else None


def finetune_tokenizer(tok, init) -> object:
    """The tokenizer of a fine-tuning stage: tokenizer.path when set explicitly (not empty), else
    the one recorded with the starting weights (model.init), else tokenizer.path (trained if missing)."""
    if init is not None and (not tok.path or "path" not in tok.model_fields_set):
        src, info, _ = init
        return ckpt.recorded_tokenizer(info, src)
    return ensure_tokenizer(tok, [SourceConfig(path="builtin:train")])


def rlhf_arch(model_cfg, init, vocab_size: int, seq_len: int, activation_checkpointing: bool):
    """The GPT architecture: recorded with the starting weights, or from the config's model fields."""
    if init is None:
        arch = model_config(model_cfg, vocab_size, seq_len, activation_checkpointing)
    else:
        src, info, _ = init
        if info.get("model_family", "gpt") != "gpt":
            raise UsageError(f"{src} holds a {info.get('model_family')} model; RLHF stages train GPT models")
        try:
            arch = models.config_from_dict("gpt", dict(info["model"], activation_checkpointing=activation_checkpointing))
        except (KeyError, ValueError, TypeError) as e:
            raise UsageError(f"{src}: bad recorded architecture: {e}") from None
        if arch.vocab_size < vocab_size:
            raise UsageError(f"{src} has a vocabulary of {arch.vocab_size}, the tokenizer {vocab_size}")
    if arch.max_seq_len < seq_len:
        raise UsageError(f"sequences of {seq_len} tokens exceed the model's max_seq_len={arch.max_seq_len}")
    return arch


def build_rlhf_model(cls, arch, ds_config: dict, zero_stage: int, seed: int, init, tokenizer_hash: str, what: str):
    """A PolicyLM or ScalarHeadModel (partitioned under ZeRO-3), initialised, then loaded from
    `init` when given: a causal LM's weights give a scalar model its backbone (fresh head); a
    reward model / critic checkpoint gives it everything. `what` names the model in errors."""
    from llmstack.models.heads import ScalarHeadModel, backbone_state, is_scalar_state

    torch.manual_seed(seed)
    with ds.model_init_context(ds_config, zero_stage):
        model = cls(arch)
    torch.manual_seed(seed)
    ds.init_weights(model, model.init_module_, zero_stage)
    if init is None:
        return model
    src, info, state = init
    if info.get("tokenizer_hash") and info["tokenizer_hash"] != tokenizer_hash:
        raise UsageError(f"tokenizer mismatch: {what} {src} was made with tokenizer {info['tokenizer_hash']}, this "
                         f"run's tokenizer is {tokenizer_hash}; the actor, critic and reward model must share one")
    scalar = is_scalar_state(state)
    if isinstance(model, ScalarHeadModel):
        if scalar:
            ds.load_state_dict_into(model, state, zero_stage)
        else:
            ds.load_state_dict_into(model.backbone, backbone_state(state), zero_stage)
    elif scalar:
        raise UsageError(f"{what} {src} is a reward model / critic (a scalar head), not a language model")
    else:
        ds.load_state_dict_into(model, state, zero_stage)
    return model


def rlhf_meta(step: int, world: int, zero_stage: int, precision: str, tokenizer, arch, cfg, head: str | None,
              **extra) -> dict:
    """meta.json of an RLHF checkpoint; `head` is "scalar" for reward models and critics."""
    return {"step": step, "world_size": world, "zero_stage": zero_stage, "precision": precision,
            "tokenizer_hash": tokenizer.hash, "tokenizer_path": tokenizer.path, "model_family": "gpt",
            "head": head, "model": arch.__dict__, "config": cfg.model_dump(mode="json"), "time": time.time(), **extra}


def finetune_setup(cfg, cls, ds_config: dict, ckpt_root: Path):
    """The shared start of the single-model fine-tuning stages (reward model, DPO): the starting
    checkpoint (model.init), its tokenizer and architecture, the checkpoint to resume from (its
    tokenizer checked), and a `cls` model loaded from model.init unless resuming.
    Returns (init, tokenizer, arch, resume_from, model)."""
    t = cfg.train
    ds.check_precision(cfg.precision)  # before the starting weights are read
    init = read_init(cfg.model.init)
    tokenizer = finetune_tokenizer(cfg.tokenizer, init)
    arch = rlhf_arch(cfg.model, init, tokenizer.vocab_size, cfg.data.seq_len, t.activation_checkpointing)
    resume_from = find_resume_checkpoint(t.resume, ckpt_root)
    if resume_from is not None:
        check_tokenizer(ckpt.read_meta(resume_from).get("tokenizer_hash"), tokenizer.hash, resume_from)
    model = build_rlhf_model(cls, arch, ds_config, cfg.zero.stage, cfg.seed,
                             init if resume_from is None else None, tokenizer.hash, "model.init")
    return init, tokenizer, arch, resume_from, model


def train_engine(model, train_cfg, ds_config: dict, lr: float | None = None):
    """A training engine with the config's optimizer over the usual decay / no-decay groups;
    with train.compile, compiled through the engine after it is built (ds.compile_engine), the
    one place every stage that trains with train.compile compiles."""
    from llmstack.train.optim import param_groups

    t = train_cfg
    engine = ds.create_engine(model, param_groups(model, t.weight_decay), ds_config, lr=lr or t.lr, betas=t.betas,
                              eps=t.eps, optimizer=t.optimizer, momentum=t.momentum)
    if t.compile:
        ds.compile_engine(engine)
    return engine

"""The components every training stage builds the same way: tokenizer, architecture, model
(one builder for every stage and model kind), starting weights, engine.

Each function takes plain arguments (or one config section), so a stage recipe reads as a list of
calls: start the run (train/run.py) -> tokenizer -> model (under ZeRO-3 init) -> engine -> data
-> the Trainer (train/trainer.py).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from data_pipeline import sources as data_sources
from data_pipeline import tokenizer as tokenization
from llmstack.config import SourceConfig, TokenizerConfig
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import RankError, UsageError
from llmstack import models
from llmstack.train import checkpoint as ckpt
from llmstack.train import weights
from llmstack.train.meta import CheckpointMeta
from llmstack.train.run import check_architecture, check_tokenizer

# Starting weights as weights.read_weights gives them: (source, record, fp32 state dict)
Init = tuple[Path, CheckpointMeta, dict]
# Rows of an embedding grown for added tokens: a multiple of this (GPU-friendly matmul shapes)
VOCAB_MULTIPLE = 64


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
        with warnings.catch_warnings():  # said once, below, as one line naming the config keys
            warnings.simplefilter("ignore", tokenization.VocabShortfallWarning)
            out = tokenization.train_tokenizer(
                source_texts(srcs), tok.path, kind=tok.kind, vocab_size=tok.vocab_size,
                min_frequency=tok.min_frequency, num_sentinels=tok.num_sentinels, max_chars=tok.max_chars,
            )
    except ValueError as e:
        raise UsageError(f"tokenizer: {e}") from None
    env.print0(f"tokenizer: {out.vocab_size} tokens, hash {out.hash}, {time.perf_counter() - t0:.1f}s")
    if tokenization.vocab_shortfall(out.meta):  # e.g. a 50k vocabulary asked of a small corpus
        print(f"warning: {tokenization.vocab_shortfall(out.meta, 'tokenizer.')}", file=sys.stderr, flush=True)
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


def peak_flops(precision: str):
    """The Peak (train/metrics.py) that MFU divides by on this rank: the rated dense peak of a
    known GPU for the run's precision, else (CPU, unknown accelerator) a matmul peak measured now
    at the run's dtype with this rank's threads; its source is recorded with it."""
    from llmstack.train.metrics import device_peak

    return device_peak(env.device(), precision)


def model_flops(arch, cls=None):
    """The PaLM count (train/metrics.ModelFlops) of `cls(arch)` (default: the family's model),
    counted on a meta-device copy (ZeRO-3 has partitioned the real one): a reward model or
    critic has its scalar head instead of the LM head."""
    from llmstack.train.metrics import ModelFlops, matmul_params

    with torch.device("meta"):
        model = model_class(arch, cls)(arch)
    head = getattr(model, "lm_head", None)  # a GPT's LM head; a ScalarHeadModel's scalar head
    head = getattr(model, "head", None) if head is None else head
    return ModelFlops(matmul_params(model), arch.n_layer, arch.n_head * arch.head_dim,
                      head=head.weight.numel() if head is not None else 0)




def model_stats(arch, seq_len: int) -> tuple[int, float]:
    """(parameters, training FLOPs/token), counted on a meta-device copy: ZeRO-3 has already
    partitioned the real model's parameters, so it cannot be counted directly."""
    with torch.device("meta"):
        model = models.build_model(models.family_of_config(arch), arch)
    return model.num_params(), model.flops_per_token(seq_len)


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


def build_model(arch, ds_config: dict, zero_stage: int, seed: int, *, cls=None, init: Init | None = None,
                tokenizer_hash: str | None = None, what: str = "model.init"):
    """The one model builder of every stage: `cls(arch)` (default: the architecture's family
    model; PolicyLM, ScalarHeadModel for RLHF) constructed partitioned under ZeRO-3, initialised
    from `seed` (identical weights for any world size), then loaded from `init` when given."""
    cls = model_class(arch, cls)
    if is_hf_arch(arch):
        from llmstack.models.hf_backend import import_model_code

        import_model_code(arch)
    torch.manual_seed(seed)
    with ds.model_init_context(ds_config, zero_stage):
        model = cls(arch)
    torch.manual_seed(seed)
    ds.init_weights(model, model.init_module_, zero_stage)
    if init is not None:
        load_weights(model, init, zero_stage, tokenizer_hash, what)
        env.print0(f"initialised weights from {init[0]}")
    return model


def load_weights(model, init: Init, zero_stage: int, tokenizer_hash: str | None, what: str = "model.init") -> None:
    """Load starting weights into `model`, refusing another family, tokenizer or vocabulary.

    A scalar-head model (reward model, critic) takes everything from a reward model / critic
    checkpoint, or its backbone from a language model's weights (fresh head); a language model
    refuses a scalar-head checkpoint. `what` names the config key in errors."""
    from llmstack.models.heads import ScalarHeadModel, backbone_state, is_scalar_state

    src, info, state = init
    scalar_model = isinstance(model, ScalarHeadModel)
    family = models.family_of_config(model.config) if scalar_model else models.family_of_model(model)
    if info.model_family != family:
        raise UsageError(f"{what}={src} holds a {info.model_family} model; this run trains a {family}")
    vocab = (model.backbone if scalar_model else model).config.vocab_size
    if tokenizer_hash is not None:
        src, info, state = fit_vocab(init, vocab, tokenizer_hash)
        check_tokenizer(info.tokenizer_hash, tokenizer_hash, f"{what} {src}")
    # a directory that records no tokenizer (a Hugging Face one) passes the hash check with any
    if info.vocab_size is not None and info.vocab_size != vocab:
        raise UsageError(f"{what}={src} embeds {info.vocab_size} tokens, this run's tokenizer has {vocab}: "
                         "set tokenizer.path to the tokenizer of those weights")
    scalar_state = is_scalar_state(state)
    if scalar_model and not scalar_state:
        if is_hf_arch(model.config):
            from llmstack.models import hf_backend

            state = hf_backend.backbone_state(state, model.config)
        else:
            state = backbone_state(state)
        ds.load_state_dict_into(model.backbone, state, zero_stage)
    elif scalar_state and not scalar_model:
        raise UsageError(f"{what} {src} is a reward model / critic (a scalar head), not a language model")
    else:
        ds.load_state_dict_into(model, state, zero_stage)


def fit_vocab(init: Init, vocab_size: int, tokenizer_hash: str) -> Init:
    """Starting weights made for the tokenizer that `tokenizer_hash` extends (tokens added to it,
    see added_tokens), as weights of that extension: their embedding and LM head grown to
    `vocab_size` rows (weights.grow_vocab: new rows are the mean of the old ones) when they have
    fewer, and the extension's hash recorded. Any other weights are returned unchanged."""
    src, info, state = init
    if not tokenization.extends(tokenizer_hash, info.tokenizer_hash):
        return init
    if info.vocab_size is not None and info.vocab_size < vocab_size:
        state = weights.grow_vocab(state, info.vocab_size, vocab_size)
        info = info.replace(model=grown_arch(info.model, vocab_size))
    return src, info.replace(tokenizer_hash=tokenizer_hash), state


def grown_arch(model: dict, vocab_size: int) -> dict:
    """A recorded architecture with `vocab_size` tokens (a transformers config it holds too)."""
    hf_config = model.get("hf_config")
    return {**model, "vocab_size": vocab_size,
            **({"hf_config": {**hf_config, "vocab_size": vocab_size}} if isinstance(hf_config, dict) else {})}


def load_init_weights(model, init_path: str, zero_stage: int, tokenizer_hash: str) -> Path:
    """Start from other weights (model.init): a checkpoint, a consolidated or imported directory
    (`llmstack import`), or a Hugging Face directory; same tokenizer and family required."""
    init = weights.read_weights(init_path)
    load_weights(model, init, zero_stage, tokenizer_hash)
    return init[0]


def model_class(arch, cls=None) -> type:
    """The class a stage builds for `arch`: `cls` (PolicyLM, ScalarHeadModel; None: the family's
    model), or under model.backend=hf the transformers-backed class standing for it."""
    if is_hf_arch(arch):
        from llmstack.models import hf_backend

        return hf_backend.model_class(cls)
    return cls if cls is not None else models.get_family(models.family_of_config(arch)).model_cls


def is_hf_arch(arch) -> bool:
    """An architecture of the generic backend (model.backend=hf)."""
    from llmstack.models.configs import HFConfig

    return isinstance(arch, HFConfig)


def read_init(init_path: str | None, backend: str = "native") -> Init | None:
    """(source, record, fp32 state) of starting weights, or None when training from scratch.
    With backend=hf a transformers directory is read through its own class, unconverted; a
    checkpoint is read as it was written (its recorded family says which backend trained it)."""
    if not init_path:
        return None
    init = weights.read_weights(init_path, backend)
    if backend == "hf" and init[1].model_family != "hf":
        raise UsageError(f"model.init={init_path} holds a {init[1].model_family} model of our own code: "
                         "train it with model.backend=native")
    return init


def recorded_architecture(path: str) -> tuple[str, dict] | None:
    """(family, architecture) recorded with starting weights (model.init), read without loading
    them: a consolidated or imported directory, or a checkpoint. None for a Hugging Face
    directory (only converting it tells) or a path that no longer holds a model."""
    p = Path(path)
    try:
        if (p / "llmstack_model.json").is_file():
            info = CheckpointMeta.read(p / "llmstack_model.json")
        elif (p / "config.json").is_file() and not (p / ckpt.META).is_file():
            return None
        else:
            info = ckpt.read_meta(ckpt.resolve(p))
    except (UsageError, OSError, ValueError):
        return None
    return (info.model_family, info.model) if isinstance(info.model, dict) else None


# --- fine-tuning stages (sft, rm, dpo, ppo): a GPT from model.init, its tokenizer ---


def finetune_tokenizer(tok: TokenizerConfig, recorded: Init | None, run_dir: Path | None = None):
    """The tokenizer of a fine-tuning stage: tokenizer.path when set explicitly (not empty), else
    the one recorded with the starting weights or the checkpoint resumed, else tokenizer.path
    (trained if missing); always checked against the recorded hash. Given `run_dir`, one without
    a pad token (tokenizer.add_pad) or lacking tokenizer.add_tokens is replaced by its extended
    copy in run_dir/tokenizer (`added_tokens`), which a resumed run finds recorded in its checkpoint."""
    if recorded is not None and (not tok.path or "path" not in tok.model_fields_set):
        return added_tokens(weights.recorded_tokenizer(recorded[1], recorded[0]), tok, run_dir, recorded)
    base = ensure_tokenizer(tok, [SourceConfig(path="builtin:train")])
    tokenizer = added_tokens(base, tok, run_dir, recorded)
    if recorded is not None:  # starting weights of the base tokenizer, or a checkpoint of this extension
        saved = recorded[1].tokenizer_hash
        check_tokenizer(saved, tokenizer.hash if saved == tokenizer.hash else base.hash, recorded[0])
    return tokenizer


def added_tokens(base, tok: TokenizerConfig, run_dir: Path | None, recorded: Init | None):
    """`base`, or its copy in run_dir/tokenizer with a pad token (tokenizer.add_pad, when it has
    none) and tokenizer.add_tokens added (data_pipeline/tokenizer.py extend_tokenizer), written by
    rank 0. The pad is never one of the EOS ids the starting weights record. The model's
    vocabulary grows to fit (finetune_arch, fit_vocab)."""
    pad, new = tokenization.tokens_to_add(base, add_pad=tok.add_pad, add_tokens=tok.add_tokens)
    if run_dir is None or (pad is None and not new):
        return base
    out = Path(run_dir) / "tokenizer"
    # the ids an imported model's config names (EOS may be a list), kept with the copy for the export
    special = recorded[1].special_ids if recorded is not None else None
    if not special and (Path(base.path) / weights.INFO).is_file():
        special = weights.read_info(base.path).special_ids
    special = special or base.added.get("special_ids")
    eos = (special or {}).get("eos")
    avoid = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    with env.rank0_first(f"writing the tokenizer {out}"):
        if env.is_main():
            try:
                tokenization.extend_tokenizer(base, out, add_pad=tok.add_pad, add_tokens=tok.add_tokens,
                                              avoid_ids=avoid, note={"special_ids": special} if special else None)
            except ValueError as e:
                raise UsageError(f"tokenizer.add_pad: {e}; set tokenizer.add_pad=false") from None
    deadline = time.monotonic() + TOKENIZER_VISIBLE_WAIT_S
    while not (out / tokenization.ADDED_FILE).is_file():  # another host's new file (a network filesystem)
        if time.monotonic() > deadline:
            raise RankError(f"rank {env.rank()} on host {env.hostname()} does not see {out}, which rank 0 wrote: "
                            "run.dir must be on a filesystem every node shares")
        time.sleep(1.0)
    tokenizer = tokenization.load_tokenizer(out)
    names = [f"{t} (id {i}{', the pad' if t == pad else ''})" for t, i in tokenizer.added["tokens"].items()]
    if pad is not None and pad not in tokenizer.added["tokens"]:
        names.append(f"{pad} (id {tokenizer.pad_id}) named the pad")
    env.print0(f"tokenizer: added {', '.join(names)} to {base.path} -> {out} ({tokenizer.vocab_size} tokens, "
               f"hash {tokenizer.hash})")
    return tokenizer


def finetune_arch(model_cfg, recorded: Init | None, vocab_size: int, seq_len: int, activation_checkpointing: bool,
                  families: tuple[str, ...] = ("gpt",), tokenizer_hash: str | None = None):
    """The decoder's architecture: recorded with the starting weights (or the checkpoint resumed),
    of one of `families` (SFT also trains an imported Gemma; the other stages GPTs only), or from
    the config's model fields (a GPT). A recorded vocabulary smaller than the tokenizer's (tokens
    added to it: tokenizer.add_pad, add_tokens) grows to the tokenizer's size rounded up to a
    multiple of VOCAB_MULTIPLE; spare rows are used as they are. Given `tokenizer_hash`, only a
    tokenizer extending the recorded one may be larger (else load_weights refuses the weights)."""
    if recorded is None:
        arch = model_config(model_cfg, vocab_size, seq_len, activation_checkpointing)
    else:
        src, info = recorded[0], recorded[1]
        family = info.model_family
        if family not in families and family != "hf":  # (hf: any transformers causal LM, model.backend=hf)
            also = " (`llmstack sft` also fine-tunes gemma models)" if family == "gemma" else ""
            raise UsageError(f"{src} holds a {family} model; this stage trains {' or '.join(families)} models{also}")
        try:
            arch = models.config_from_dict(family, dict(info.model, activation_checkpointing=activation_checkpointing))
        except (KeyError, ValueError, TypeError) as e:
            raise UsageError(f"{src}: bad recorded architecture: {e}") from None
        if arch.vocab_size < vocab_size:  # more rows for tokens added to the weights' tokenizer (fit_vocab)
            if tokenizer_hash is not None and not tokenization.extends(tokenizer_hash, info.tokenizer_hash):
                raise UsageError(f"{src} has a vocabulary of {arch.vocab_size}, the tokenizer {vocab_size}")
            grown = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
            arch = models.config_from_dict(family, dict(grown_arch(info.model, grown),
                                                        activation_checkpointing=activation_checkpointing))
    if arch.max_seq_len < seq_len:
        raise UsageError(f"sequences of {seq_len} tokens exceed the model's max_seq_len={arch.max_seq_len}")
    return arch


def check_resume_model(model_cfg, saved: CheckpointMeta, arch_now, where) -> None:
    """Refuse to resume a fine-tuning checkpoint of another model than the config names:
    model.init's recorded architecture (or `arch_now`, the model fields' one, without
    model.init) against the checkpoint's. A Hugging Face model.init is not converted for this:
    its path must be the one the run started from."""
    if model_cfg.init is None:
        check_architecture(saved, "gpt", arch_now, where)
        return
    recorded = recorded_architecture(model_cfg.init)
    if recorded is not None:
        family, arch = recorded
        if tokenization.extends(saved.tokenizer_hash, None) and (saved.vocab_size or 0) > arch.get("vocab_size", 0):
            arch = {**arch, "vocab_size": saved.vocab_size}  # grown for the tokens the run added (finetune_arch)
        check_architecture(saved, family, arch, where)
        return
    was = saved.config_value("model", "init")
    if was is not None and was != model_cfg.init:
        raise UsageError(f"cannot resume from {where}: it was trained from model.init={was}, the config names "
                         f"model.init={model_cfg.init}; resume with the original model.init, or start a new run "
                         "(another run.dir, or train.resume=none)")


def finetune_start(run, cfg, *, seq_len: int, model_cfg=None,
                   families: tuple[str, ...] = ("gpt",)) -> tuple[object, object, Init | None]:
    """(tokenizer, architecture, starting weights) of a fine-tuning stage's model. A fresh run
    takes them from model.init (or the config's fields and tokenizer); a resumed one from the
    checkpoint, after checking that model.init still names the model it trained. The weights
    are read only for a fresh run."""
    model_cfg = model_cfg or cfg.model
    resuming = run.saved is not None
    init = read_init(model_cfg.init, getattr(model_cfg, "backend", "native")) if not resuming else None
    recorded = (run.resume_from, run.saved, None) if resuming else init
    tokenizer = finetune_tokenizer(cfg.tokenizer, recorded, run.dir)  # checked against the resumed checkpoint's hash
    arch = finetune_arch(model_cfg, recorded, tokenizer.vocab_size, seq_len, cfg.train.activation_checkpointing,
                         families, tokenizer.hash)
    init = fit_vocab(init, arch.vocab_size, tokenizer.hash) if init is not None else None
    if resuming:
        planned = model_config(model_cfg, tokenizer.vocab_size, seq_len, cfg.train.activation_checkpointing) \
            if model_cfg.init is None else None
        check_resume_model(model_cfg, run.saved, planned, run.resume_from)
    return tokenizer, arch, init


def train_engine(model, train_cfg, ds_config: dict, lr: float | None = None):
    """A training engine with the config's optimizer over the usual decay / no-decay groups;
    with train.compile, compiled through the engine after it is built (ds.compile_engine), the
    one place every stage that trains with train.compile compiles."""
    from llmstack.train.optim import param_groups

    t = train_cfg
    engine = ds.create_engine(model, param_groups(model, t.weight_decay), ds_config, lr=lr or t.lr, betas=t.betas,
                              eps=t.eps, optimizer=t.optimizer, momentum=t.momentum)
    if getattr(t, "compile", False):
        ds.compile_engine(engine)
    return engine


def report_skipped(errors, what: str) -> None:
    if errors.total:
        env.print0(f"{what}: skipped {errors.total} records")
        for line in errors.report():
            env.print0("  " + line)


def preference_data(run, data, tokenizer, params: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, validation pairs) of a preference-data config section (reward model, DPO),
    what was skipped reported and recorded in the run directory with the model's size."""
    from data_pipeline.pairs import load_pairs

    train_pairs, train_err = load_pairs(data.sources, tokenizer, data.seq_len, data.on_error)
    val_pairs, val_err = load_pairs(data.val_sources, tokenizer, data.seq_len, data.on_error, limit=data.val_pairs)
    report_skipped(train_err, "training pairs")
    report_skipped(val_err, "validation pairs")
    if not val_pairs:
        raise UsageError("no usable validation pairs in data.val_sources")
    env.print0(f"preference pairs: {len(train_pairs)} training, {len(val_pairs)} validation "
               f"(skipped {train_err.total} + {val_err.total})")
    run.record(tokenizer.hash, params=params, pairs={"train": len(train_pairs), "val": len(val_pairs),
                                                     "train_skipped": train_err.counts(),
                                                     "val_skipped": val_err.counts()})
    return train_pairs, val_pairs


def pair_trainer(run, cfg, engine, meta, train_pairs: list[dict], val_pairs: list[dict], pad_id: int, loss_fn,
                 pair_stats, window, flops_per_token: float = 0.0):
    """The Trainer of a stage that trains one engine on preference pairs (reward model, DPO):
    its checkpoints (`meta(step, tokens)`), restored when resuming, the pairs from the resumed
    step on, validation as the means of `pair_stats` over the held-out pairs (logged val_*);
    MFU from `flops_per_token` (the model FLOPs of a training step per pair token)."""
    from data_pipeline.pairs import mean_tokens, pair_batches
    from llmstack.train.evaluate import evaluate_pairs
    from llmstack.train.trainer import Checkpointer, CheckpointPart, MicroBatches, Trainer

    t = cfg.train
    checkpointer = Checkpointer([CheckpointPart(engine, run.ckpt_root, meta)], t.keep_last)
    start = checkpointer.restore(run.resume_from).step if run.resume_from else 0
    batches = pair_batches(train_pairs, micro=t.micro_batch, world=run.world, rank=run.rank, seed=cfg.seed,
                           pad_id=pad_id, start=start * run.accum)

    def evaluate() -> dict:
        val = evaluate_pairs(engine, val_pairs, t.micro_batch, pad_id, pair_stats)
        return {f"val_{k}": v for k, v in val.items()}

    return Trainer(t, [(engine, t.lr)], MicroBatches(engine, batches, loss_fn, run.accum), run_dir=run.dir,
                   start_step=start, tokens_per_step=int(run.global_batch * mean_tokens(train_pairs)),
                   flops_per_token=flops_per_token, peak_flops=peak_flops(cfg.precision),
                   evaluate=evaluate, checkpointer=checkpointer, callbacks=[window])


def pair_attention_len(pairs: list[dict]) -> float:
    """The T of the attention FLOPs of preference pairs: the token-weighted mean length of their
    chosen and rejected sequences (train/metrics.attention_len)."""
    from llmstack.train.metrics import attention_len

    return attention_len([len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")])

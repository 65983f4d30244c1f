"""The typed config schema of every stage, and how it is resolved.

Precedence is fixed: schema defaults < YAML file < `key.sub=value` command-line overrides. The
merged dict is validated once by pydantic; unknown keys and wrong types become a `ConfigError`
naming the dotted key and what is allowed. Leaf functions never see these objects: stages unpack
the fields they need (DESIGN.md principle 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the loading API, re-exported: llmstack.config is what stages and tests import it from
from llmstack.config_loading import format_errors, load_config, parse_override, read_yaml, set_dotted  # noqa: F401,E501
from llmstack.models import FAMILIES, all_presets, family_of_preset


class Strict(BaseModel):
    """Base: unknown keys are errors, assignments are validated, numbers are finite (a learning
    rate of .inf or .nan would only show up later as a diverged run)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RunConfig(Strict):
    name: str = "run"
    dir: str | None = Field(None, description="run directory; default runs/<name>")

    @property
    def path(self) -> Path:
        return Path(self.dir) if self.dir else Path("runs") / self.name


class ZeroConfig(Strict):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    comm_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of gradient all-reduce / reduce-scatter; auto: fp32 (bf16 halves the traffic)")

    @model_validator(mode="after")
    def _offload_needs_stage(self):
        if self.offload_params and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage=3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage 1, 2 or 3")
        return self


class SourceConfig(Strict):
    path: str = Field(description="'builtin[:train|:validation]'; a .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet file "
                      "or glob; a shards dir from `data prepare`; 'hf:NAME[:CONFIG]:SPLIT'; a save_to_disk dir")
    weight: float = Field(1.0, gt=0, description="mixing weight: share of training tokens (normalized)")
    text_field: str = "text"


class ChatSourceConfig(Strict):
    """A source of whole records (conversations, preference pairs, prompts), read in full: no mixing
    weight, and the record format, not a text field, says what is read."""

    path: str = Field(description="'builtin-sft:train|validation', 'builtin-prefs:train|validation'; a .jsonl/"
                      ".jsonl.gz/.jsonl.zst file or glob; 'hf:NAME[:CONFIG]:SPLIT'; a save_to_disk dir")


class DataConfig(Strict):
    """Pretraining data: weighted sources tokenized, packed and streamed (or `data prepare` shards)."""

    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin:train")])
    val_sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin:validation")])
    seq_len: int = Field(256, ge=8)
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes per rank; auto: the rank's spare cores (cores / local ranks "
        "minus its compute threads), at most 4, dividing streams / world; 0 when none spare (data prepare: "
        "processes; auto: every available core)")
    on_error: Literal["skip", "fail"] = "skip"
    streams: int = Field(64, ge=1, description="fixed parallel streams of the global order; a multiple of "
                         "world size x max(num_workers, 1); changing it changes the order")
    bos: bool = Field(False, description="start every document with BOS (EOS always ends it)")
    doc_mask: bool = Field(False, description="packed documents do not attend to each other (position_ids + segment_ids; no dense mask)")
    shuffle: bool = Field(True, description="a new seeded file order every epoch")
    shuffle_windows: int = Field(64, ge=1, description="each stream emits its sequences in seeded random order within "
                                 "blocks of this many (1: in document order)")
    max_record_bytes: int = Field(64 << 20, ge=1, description="pretraining and `data prepare`: a JSONL line longer "
                                  "than this is a bad record (skipped and counted as too_long, or exit 2 with "
                                  "on_error=fail) instead of being held in memory whole")

    @field_validator("num_workers", mode="plain")
    @classmethod
    def _workers(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("must be 'auto' or a whole number >= 0 (0: no worker processes)")


class PrepareDataConfig(DataConfig):
    """`data prepare` (and `tokenizer train`, so one file serves both): the pretraining keys plus
    where the shards go."""

    out: str | None = Field(None, description="where `data prepare` writes shards")
    docs_per_shard: int = Field(65536, ge=1, description="`data prepare`: documents per shard file")


class ChatDataConfig(Strict):
    """SFT conversations: every source read once per epoch, encoded whole (no streaming, no mixing)."""

    sources: list[ChatSourceConfig] = Field(default_factory=lambda: [ChatSourceConfig(path="builtin-sft:train")])
    val_sources: list[ChatSourceConfig] = Field(
        default_factory=lambda: [ChatSourceConfig(path="builtin-sft:validation")])
    seq_len: int = Field(256, ge=8)
    on_error: Literal["skip", "fail"] = "skip"
    shuffle: bool = Field(True, description="a new seeded conversation order every epoch")


class TokenizerConfig(Strict):
    path: str = "runs/tokenizers/bpe-8k"
    kind: Literal["bpe", "sp_bpe", "sp_unigram"] = "bpe"
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    num_sentinels: int = Field(100, ge=0)
    train_sources: list[SourceConfig] | None = Field(None, description="default: data.sources")
    max_chars: int | None = Field(None, ge=1, description="cap on characters read for training")
    add_pad: bool = Field(True, description="fine-tuning stages: when the tokenizer has no pad token, add one "
                          "(<|pad|>, never an EOS) in a copy under run.dir/tokenizer and grow the embeddings")
    add_tokens: list[str] = Field(default_factory=list, description="fine-tuning stages: special tokens to add "
                                  "(those the vocabulary lacks), as add_pad does")

    @field_validator("add_tokens")
    @classmethod
    def _tokens_not_blank(cls, v):
        if any(not t.strip() for t in v):
            raise ValueError("an added token must not be empty or only whitespace")
        return v


class TrainConfig(Strict):
    """The optimizer, schedule and run cadence every stage has; the stages that run the shared
    loop add theirs (LoopTrainConfig, PretrainTrainConfig)."""

    max_steps: int = Field(100, ge=1)
    micro_batch: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "inverse_sqrt", "constant"] = "cosine"
    optimizer: Literal["adamw", "adam", "sgd", "adafactor", "lamb"] = "adamw"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer=sgd: momentum")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    log_every: int = Field(10, ge=1)
    save_every: int = Field(100, ge=0, description="0: save only at the end")
    keep_last: int = Field(3, ge=1)
    resume: str = Field("auto", description="auto | none | a checkpoint path")
    stop_at: int | None = Field(None, ge=1, description="save and exit after this step (schedule still spans max_steps)")
    max_skipped_steps: int = Field(3, ge=0, description="consecutive steps with a non-finite loss or gradient norm "
                                   "that are skipped (no update) before the run stops with exit status 3")
    activation_checkpointing: bool = False
    progress: bool = True

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        # Adam's moment decay rates: 1 or more never forgets (and the bias correction divides by
        # zero), a negative one flips signs
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each of the two betas must be in [0, 1)")
        return v


class LoopTrainConfig(TrainConfig):
    """The stages that train one model with the shared loop (SFT, reward model, DPO): a global
    batch, periodic validation, and compilation through the engine."""

    global_batch: int | None = Field(None, ge=1, description="if set, must equal micro_batch x grad_accum x world")
    eval_every: int = Field(100, ge=0, description="0 disables periodic validation")
    compile: bool = False


class TaskEvalTrainConfig(LoopTrainConfig):
    """The loop's keys plus evaluation on eval tasks at the validation cadence (the decoder
    stages that train a causal LM: pretrain with model.family=gpt, and sft)."""

    eval_tasks: list[str] = Field(default_factory=list, description="eval tasks scored on the training model at "
                                  "every eval_every step and the last (pretrain with a gpt model, sft), as "
                                  "llmstack-eval --tasks names them: builtin task names, task .yaml files, "
                                  "ppl:SOURCE; logged as eval/<task>/<metric>")
    eval_tasks_limit: int | None = Field(None, ge=1, description="eval_tasks: the first N samples of each task "
                                         "(default: all)")
    eval_tasks_fewshot: int | None = Field(None, ge=0, description="eval_tasks: few-shot examples per prompt "
                                           "(default: each task's own; seed 1234 as llmstack-eval)")

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        return v.split(",") if isinstance(v, str) else v  # as llmstack-eval --tasks takes them

    @field_validator("eval_tasks")
    @classmethod
    def _task_names(cls, v):
        # names only here (the schema does not import the eval suite); the specs themselves are
        # loaded and checked when the stage starts, before any tokenizer, model or data is built
        for name in v:
            if not name.strip() or name.strip() == "ppl:":
                raise ValueError(f"empty task name {name!r} (a builtin task name, a .yaml file or ppl:SOURCE)")
        return [name.strip() for name in v]


class PretrainTrainConfig(TaskEvalTrainConfig):
    """Pretraining: the loop's keys, plus the loss variants and a validation budget of its own."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="training loss only; validation loss stays plain")
    z_loss: float = Field(0.0, ge=0, description="coefficient of mean(logsumexp(logits)^2) (PaLM: 1e-4)")
    eval_batches: int = Field(4, ge=1)


class ModelConfig(Strict):
    """A model architecture: a family, a preset of it, then any field set explicitly overrides it.

    `family` defaults to the preset's family (gpt when neither is set), and `preset` to the
    family's tiny preset. A field the family does not have (e.g. `model.ffn` for a GPT) is an error.
    """

    family: Literal["gpt", "bert", "t5"] = "gpt"
    preset: str | None = "gpt2-tiny"
    init: str | None = Field(None, description="checkpoint or imported model directory to start from")
    backend: Literal["native", "hf"] = Field(
        "native", description="native: our model code (a transformers directory in init is converted, for the "
        "architectures `llmstack import` maps); hf: any transformers AutoModelForCausalLM trained through its own "
        "class (init: its directory, or a checkpoint of such a run; the fine-tuning stages only). It lacks packed "
        "sequences (sft.packing=false), the fused chunked loss, the native decoding step, `llmstack plan` and "
        "llmstack-eval; "
        "LoRA targets are its module names (q_proj, ...)")
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=8)
    d_ff: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    pos: Literal["learned", "sinusoidal", "rotary", "alibi", "none"] | None = None
    attn_pattern: Literal["full", "sliding", "strided", "fixed"] | None = None
    attn_window: int | None = Field(None, ge=1, description="attn_pattern=sliding: keys per query, itself included")
    attn_block: int | None = Field(None, ge=1, description="attn_pattern=strided|fixed: block size l")
    attn_summary: int | None = Field(None, ge=1, description="attn_pattern=fixed: summary columns c per block")
    norm: Literal["layernorm", "rmsnorm"] | None = None
    norm_eps: float | None = None
    norm_position: Literal["pre", "post"] | None = None
    final_norm: bool | None = None
    layer_scale: float | None = Field(None, gt=0, description="LayerScale initial value (unset: no LayerScale)")
    mlp: Literal["gelu", "swiglu", "geglu", "reglu"] | None = None
    activation: Literal["gelu", "gelu_tanh", "relu", "silu", "mish"] | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    attn_dropout: float | None = Field(None, ge=0, lt=1)
    init_std: float | None = Field(None, gt=0)
    init_scheme: Literal["normal", "xavier", "kaiming"] | None = None
    embed_init: Literal["normal", "small"] | None = None
    rope_theta: float | None = Field(None, gt=0)
    # BERT
    type_vocab_size: int | None = Field(None, ge=1)
    prenorm: bool | None = Field(None, description="BERT: pre-LN blocks instead of the original post-LN")
    # T5
    n_decoder_layer: int | None = Field(None, ge=1)
    d_kv: int | None = Field(None, ge=1)
    ffn: Literal["gated-gelu", "relu"] | None = None
    rel_buckets: int | None = Field(None, ge=2)
    rel_max_distance: int | None = Field(None, ge=2)
    rescale_output: bool | None = None
    init_factor: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _family_and_preset_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset_family = family_of_preset(data["preset"]) if isinstance(data.get("preset"), str) else None
        if "family" not in data:
            data["family"] = preset_family or "gpt"
        if "preset" not in data and data["family"] in FAMILIES:
            data["preset"] = FAMILIES[data["family"]].default_preset
        return data

    @model_validator(mode="after")
    def _known_preset(self):
        fam = FAMILIES[self.family]
        if self.preset is not None and self.preset not in fam.presets:
            other = family_of_preset(self.preset)
            if other:
                raise ValueError(f"preset {self.preset!r} is a {other} preset, but model.family={self.family} "
                                 f"(allowed: {', '.join(fam.presets)})")
            raise ValueError(f"unknown preset {self.preset!r} (allowed: {', '.join(all_presets())})")
        foreign = sorted(k for k, v in self.arch_fields().items() if v is not None and k not in fam.field_names())
        if foreign:
            raise ValueError(f"model.{foreign[0]} does not apply to model.family={self.family} "
                             f"(its fields: {', '.join(sorted(fam.field_names()))})")
        return self

    @model_validator(mode="after")
    def _hf_backend(self):
        if self.backend == "hf":
            if not self.init:
                raise ValueError("model.backend=hf trains a transformers model from its directory: set model.init")
            fields = sorted(k for k, v in self.arch_fields().items() if v is not None)
            if fields:
                raise ValueError(f"model.{fields[0]} does not apply to model.backend=hf (the architecture is "
                                 f"{self.init}'s config.json)")
        return self

    def arch_fields(self) -> dict[str, Any]:
        """The architecture fields that differ from the preset (None = take the preset's)."""
        skip = {"family", "preset", "init", "backend"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


class DistConfig(Strict):
    timeout_s: int = Field(600, ge=10, description="timeout of distributed init and collectives")
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class StageConfig(Strict):
    """What every training command's config has: run directory, seed, precision, tokenizer,
    process group, and a raw DeepSpeed config merged on top of the generated one(s)."""

    run: RunConfig = Field(default_factory=RunConfig)
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw ds_config merged on top of each engine's")


class PretrainConfig(StageConfig):
    """`llmstack pretrain`: tokenizer -> model -> engine -> data -> loop."""

    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: PretrainTrainConfig = Field(default_factory=PretrainTrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @model_validator(mode="after")
    def _eval_tasks_need_a_decoder(self):
        if self.model.backend != "native":
            raise ValueError("model.backend=hf is for the fine-tuning stages (sft, rm, dpo, ppo, grpo); pretrain "
                             "builds native models")
        if self.train.eval_tasks and self.model.family != "gpt":
            raise ValueError(f"train.eval_tasks scores decoder-only gpt models, not model.family={self.model.family}")
        return self


class TokenizerTrainConfig(Strict):
    """`llmstack tokenizer train`: writes tokenizer.path."""

    seed: int = 1234
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: PrepareDataConfig = Field(default_factory=PrepareDataConfig)


class DataPrepareConfig(Strict):
    """`llmstack data prepare`: data.sources -> token shards + manifest.json in data.out."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: PrepareDataConfig = Field(default_factory=PrepareDataConfig)


class SFTOptions(Strict):
    """How conversations become training rows (`llmstack sft`)."""

    packing: bool = Field(True, description="several conversations per row (reset positions, no cross-attention); "
                          "false: one per row, padded to the longest in the micro-batch")
    train_on: Literal["all", "last"] = Field("all", description="assistant turns that carry loss")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="conversations longer than data.seq_len + 1 "
                                                  "tokens: cut (counted) or dropped (counted)")
    truncation_side: Literal["left", "right"] = Field("right", description="which end an over-long conversation loses")
    eval_max: int | None = Field(None, ge=1, description="validation conversations used (default: all)")


class LoraConfig(Strict):
    """LoRA adapters via peft; only the adapters train and export merges them."""

    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target: list[str] = Field(default_factory=lambda: ["q", "v"], min_length=1,
                              description="module names or suffixes (qkv, attn.proj, mlp.fc) or short names "
                              "q k v o up gate down (q/k/v select the fused qkv projection)")


class FinetuneConfig(StageConfig):
    """What every stage that trains one GPT from `model.init` shares (SFT, reward model, DPO);
    each adds its data schema and its own options section."""

    stage_label: ClassVar[str] = "fine-tuning"  # how the model-family error names the stage
    other_families: ClassVar[str] = ""  # what else the stage trains, taken from model.init's weights

    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    train: LoopTrainConfig = Field(default_factory=LoopTrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

    @model_validator(mode="after")
    def _gpt_only(self):
        if self.model.family != "gpt":
            raise ValueError(f"model.family={self.model.family}: {self.stage_label} trains decoder-only gpt models"
                             f"{self.other_families}")
        return self


class SFTConfig(FinetuneConfig):
    """`llmstack sft`: supervised fine-tuning of a GPT (or an imported Gemma) on chat records (full or LoRA)."""

    stage_label: ClassVar[str] = "SFT"
    other_families: ClassVar[str] = (", or the gemma model a model.init holds (an imported Gemma 2/3: the family "
                                     "comes from its recorded weights, model.family stays gpt)")

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="sft"))
    train: TaskEvalTrainConfig = Field(default_factory=TaskEvalTrainConfig)
    data: ChatDataConfig = Field(default_factory=ChatDataConfig)
    sft: SFTOptions = Field(default_factory=SFTOptions)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _hf_backend_rows(self):
        if self.model.backend == "hf" and self.sft.packing:
            raise ValueError("sft.packing=true needs model.backend=native: a model.backend=hf row holds one "
                             "conversation (set sft.packing=false)")
        return self

    @model_validator(mode="after")
    def _lora_not_under_zero3(self):
        if self.lora.enabled and self.zero.stage == 3:
            raise ValueError("lora.enabled with zero.stage=3 is not supported (peft's injected layers are created "
                             "outside ZeRO-3's partitioned construction); use zero.stage 0, 1 or 2 (LoRA's optimizer "
                             "state is tiny, so stage 3 saves little)")
        return self


SCHEMAS: dict[str, type[Strict]] = {"pretrain": PretrainConfig, "tokenizer": TokenizerTrainConfig,
                                    "data": DataPrepareConfig}


# --- RLHF: reward model, DPO, PPO ---------------------------------------------------------------


class PreferenceDataConfig(Strict):
    """Preference pairs: JSONL / HF records with prompt + chosen + rejected (or message lists)."""

    sources: list[ChatSourceConfig] = Field(default_factory=lambda: [ChatSourceConfig(path="builtin-prefs:train")])
    val_sources: list[ChatSourceConfig] = Field(
        default_factory=lambda: [ChatSourceConfig(path="builtin-prefs:validation")])
    seq_len: int = Field(256, ge=8, description="longest prompt + response (tokens); longer pairs are skipped "
                         "and counted (on_error=fail: an error)")
    val_pairs: int | None = Field(512, ge=1, description="held-out pairs evaluated (None: all)")
    on_error: Literal["skip", "fail"] = "skip"


class RMOptions(Strict):
    margin: float = Field(0.0, description="Bradley-Terry margin: -log sigmoid(r_chosen - r_rejected - margin)")


class RMConfig(FinetuneConfig):
    """`llmstack rm`: a scalar-head reward model trained on preference pairs."""

    stage_label: ClassVar[str] = "RM"

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="rm"))
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    rm: RMOptions = Field(default_factory=RMOptions)


class DPOOptions(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: labels flipped with this probability")
    reference: Literal["precompute", "online"] = Field(
        "precompute", description="reference log-probs computed once before training, or by a frozen copy each step")


class DPOConfig(FinetuneConfig):
    """`llmstack dpo`: direct preference optimisation of a causal LM against a frozen reference."""

    stage_label: ClassVar[str] = "DPO"

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="dpo"))
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    dpo: DPOOptions = Field(default_factory=DPOOptions)


class PPOModelConfig(ModelConfig):
    """The actor or the critic: a model (init + architecture fields) with its own engine settings."""

    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    lr: float | None = Field(None, gt=0, description="default: train.lr")

    def arch_fields(self) -> dict[str, Any]:
        return {k: v for k, v in super().arch_fields().items() if k not in ("zero", "lr")}


class FrozenModelConfig(Strict):
    zero: ZeroConfig = Field(default_factory=ZeroConfig)


class RewardConfig(Strict):
    init: str | None = Field(None, description="a reward model checkpoint (llmstack rm)")
    function: str | None = Field(None, description="'module:function', called as f(prompts, responses, **kwargs) "
                                 "-> one float per response (rule-based reward)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of reward.function")
    zero: ZeroConfig = Field(default_factory=ZeroConfig)

    @model_validator(mode="after")
    def _one_source(self):
        if self.init is not None and self.function is not None:
            raise ValueError("set one of reward.init (a reward model) and reward.function (module:function), not both")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward.function must be 'module:function', got {self.function!r}")
        return self


class PromptDataConfig(Strict):
    sources: list[ChatSourceConfig] = Field(default_factory=lambda: [ChatSourceConfig(path="builtin-sft:train")],
                                            description="prompt / messages / preference records; their answers are "
                                            "ignored")
    max_prompt_len: int = Field(128, ge=1, description="longer prompts are skipped and counted (fail: an error)")
    on_error: Literal["skip", "fail"] = "skip"


class RolloutConfig(Strict):
    batch: int = Field(16, ge=1, description="prompts per process per PPO step")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the log-probs use the same)")


class PPOOptions(Strict):
    epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    clip: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    value_clip: float = Field(0.2, gt=0, description="value clip around the rollout values")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty (initial value if kl_target is set)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL coefficient towards this KL per sequence")
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: Literal["k1", "k3", "abs"] = "k1"
    entropy_coef: float = Field(0.0, ge=0)
    whiten_advantages: bool = True
    reward_norm: bool = Field(False, description="divide scores by their running std (after centring)")
    reward_clip: float | None = Field(None, gt=0)
    missing_stop_penalty: float = Field(0.0, ge=0, description="subtracted from the score of a response that "
                                        "reached rollout.max_new_tokens without a stop token")


class PPOConfig(StageConfig):
    """`llmstack ppo`: actor and critic trained, reference and reward frozen, each its own engine.

    `train` is the base TrainConfig: PPO has its own control flow (rollout, score, several epochs
    of mini-batches), so the shared loop's keys do not apply. There is no train.compile: rollouts
    decode straight from the actor's module with a KV cache whose shapes change at every generated
    token, so a compiled actor would recompile throughout generation.
    """

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="ppo"))
    actor: PPOModelConfig = Field(default_factory=PPOModelConfig)
    critic: PPOModelConfig = Field(default_factory=PPOModelConfig,
                                   description="init default: the actor's init (with a fresh value head)")
    reference: FrozenModelConfig = Field(default_factory=FrozenModelConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig, description="reward.init or reward.function")
    data: PromptDataConfig = Field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    ppo: PPOOptions = Field(default_factory=PPOOptions)
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="max_steps = PPO steps (rollout batches); micro_batch = the PPO "
                               "micro-batch, grad_accum of them make one optimizer step (a mini-batch)")

    @model_validator(mode="after")
    def _gpt_only(self):
        for name in ("actor", "critic"):
            family = getattr(self, name).family
            if family != "gpt":
                raise ValueError(f"{name}.family={family}: PPO trains decoder-only gpt models")
        return self

    @model_validator(mode="after")
    def _whole_minibatches(self):
        # every rollout row is trained on once per epoch, in whole mini-batches of micro x accum rows
        t, batch = self.train, self.rollout.batch
        if batch % (t.micro_batch * t.grad_accum):
            raise ValueError(f"rollout.batch={batch} must be a multiple of train.micro_batch x train.grad_accum = "
                             f"{t.micro_batch} x {t.grad_accum} (the PPO mini-batch)")
        return self


# --- group-relative RL with verifiable rewards: GRPO, Dr. GRPO, RLOO, REINFORCE++ ----------------


class VerifierConfig(Strict):
    function: str = Field("llmstack.rlhf.verifiers:numeric_answer", description="'module:function', called as "
                          "f(prompts, responses, references, **kwargs) -> one float per response; built-in verifiers "
                          "in llmstack.rlhf.verifiers: numeric_answer, regex_format, program_tests")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of reward.function")

    @model_validator(mode="after")
    def _module_function(self):
        if ":" not in self.function:
            raise ValueError(f"reward.function must be 'module:function', got {self.function!r}")
        return self


class TaskDataConfig(Strict):
    sources: list[ChatSourceConfig] = Field(default_factory=lambda: [ChatSourceConfig(path="builtin-arith:train")],
                                            description="prompt / messages records with a reference field")
    reference_field: str = Field("answer", description="the record field handed to the verifier (answer, tests)")
    max_prompt_len: int = Field(64, ge=1, description="longer prompts are skipped and counted (fail: an error)")
    on_error: Literal["skip", "fail"] = "skip"


class GroupRolloutConfig(Strict):
    prompts: int = Field(8, ge=1, description="prompts per process per step")
    group_size: int = Field(4, ge=2, description="completions sampled per prompt (the group)")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the log-probs use the same)")


class GroupOptions(Strict):
    algo: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="advantage estimator: grpo (group mean/std), dr_grpo (group mean), rloo (leave-one-out "
        "mean), reinforce_pp (group mean, batch std)")
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] | None = Field(
        None, description="how token losses become the loss; default: the algorithm's paper's")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    clip_low: float = Field(0.2, gt=0, lt=1, description="ratio clip below: 1 - clip_low")
    clip_high: float = Field(0.2, gt=0, description="ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)")
    kl_coef: float = Field(0.0, ge=0, description="KL to the reference (0: none, and no reference model is built)")
    kl_in: Literal["loss", "reward"] = Field("loss", description="loss: k3 per token in the loss (GRPO); reward: "
                                             "the sequence's k1 KL subtracted from its reward")
    dynamic_sampling: bool = Field(False, description="groups whose rewards are all equal carry no loss (DAPO); "
                                   "counted as equal_groups")
    overlong: Literal["keep", "filter", "penalty"] = Field(
        "keep", description="completions that reach max_new_tokens without a stop token: trained on as they are, "
        "excluded from the loss (DAPO's overlong filtering), or their reward lowered by overlong_penalty")
    overlong_penalty: float = Field(1.0, ge=0)


class GRPOConfig(StageConfig):
    """`llmstack grpo`: critic-free, group-relative policy optimisation on verifiable rewards: n
    completions per prompt, group-normalised advantages, no critic, no reward model. `train` as in
    PPO: micro_batch completions per micro-batch, grad_accum of them per optimizer step."""

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="grpo"))
    actor: PPOModelConfig = Field(default_factory=PPOModelConfig)
    reference: FrozenModelConfig = Field(default_factory=FrozenModelConfig)
    reward: VerifierConfig = Field(default_factory=VerifierConfig)
    data: TaskDataConfig = Field(default_factory=TaskDataConfig)
    rollout: GroupRolloutConfig = Field(default_factory=GroupRolloutConfig)
    grpo: GroupOptions = Field(default_factory=GroupOptions)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _checks(self):
        if self.actor.family != "gpt":
            raise ValueError(f"actor.family={self.actor.family}: GRPO trains decoder-only gpt models")
        t, rows = self.train, self.rollout.prompts * self.rollout.group_size
        if rows % (t.micro_batch * t.grad_accum):
            raise ValueError(f"rollout.prompts x rollout.group_size = {rows} completions must be a multiple of "
                             f"train.micro_batch x train.grad_accum = {t.micro_batch} x {t.grad_accum} (the mini-batch)")
        return self


SCHEMAS.update({"rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig})
SCHEMAS["sft"] = SFTConfig


def to_yaml(cfg: BaseModel) -> str:
    """The config as YAML, its sections in schema order; the sections every stage shares (see
    StageConfig) after the stage's own, as the demo configs write them."""
    data = cfg.model_dump(mode="json")
    for key in ("tokenizer", "dist", "deepspeed"):
        if isinstance(cfg, StageConfig):
            data[key] = data.pop(key)
    return yaml.safe_dump(data, sort_keys=False)

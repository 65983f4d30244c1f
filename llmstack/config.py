"""The typed config schema of every stage, and how it is resolved.

Precedence is fixed: schema defaults < YAML file < `key.sub=value` command-line overrides. The
merged dict is validated once by pydantic; unknown keys and wrong types become a `ConfigError`
naming the dotted key and what is allowed. Leaf functions never see these objects: stages unpack
the fields they need (DESIGN.md principle 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmstack.errors import ConfigError
from llmstack.models import FAMILIES, all_presets, family_of_preset


class Strict(BaseModel):
    """Base: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin:train")])
    val_sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig(path="builtin:validation")])
    seq_len: int = Field(256, ge=8)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (data prepare: processes)")
    out: str | None = Field(None, description="where `data prepare` writes shards")
    on_error: Literal["skip", "fail"] = "skip"
    streams: int = Field(64, ge=1, description="fixed parallel streams of the global order; a multiple of "
                         "world size x max(num_workers, 1); changing it changes the order")
    bos: bool = Field(False, description="start every document with BOS (EOS always ends it)")
    doc_mask: bool = Field(False, description="packed documents do not attend to each other (position_ids + attn_mask)")
    shuffle: bool = Field(True, description="a new seeded file order every epoch")
    shuffle_windows: int = Field(64, ge=1, description="each stream emits its sequences in seeded random order within "
                                 "blocks of this many (1: in document order)")
    docs_per_shard: int = Field(65536, ge=1, description="`data prepare`: documents per shard file")


class TokenizerConfig(Strict):
    path: str = "runs/tokenizers/bpe-8k"
    kind: Literal["bpe", "sp_bpe", "sp_unigram"] = "bpe"
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    num_sentinels: int = Field(100, ge=0)
    train_sources: list[SourceConfig] | None = Field(None, description="default: data.sources")
    max_chars: int | None = Field(None, ge=1, description="cap on characters read for training")


class TrainConfig(Strict):
    max_steps: int = Field(100, ge=1)
    micro_batch: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    global_batch: int | None = Field(None, ge=1, description="if set, must equal micro_batch x grad_accum x world")
    lr: float = Field(6e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=0, description="0 disables periodic validation")
    eval_batches: int = Field(4, ge=1)
    save_every: int = Field(100, ge=0, description="0: save only at the end")
    keep_last: int = Field(3, ge=1)
    resume: str = Field("auto", description="auto | none | a checkpoint path")
    stop_at: int | None = Field(None, ge=1, description="save and exit after this step (schedule still spans max_steps)")
    activation_checkpointing: bool = False
    compile: bool = False
    progress: bool = True


class ModelConfig(Strict):
    """A model architecture: a family, a preset of it, then any field set explicitly overrides it.

    `family` defaults to the preset's family (gpt when neither is set), and `preset` to the
    family's tiny preset. A field the family does not have (e.g. `model.ffn` for a GPT) is an error.
    """

    family: Literal["gpt", "bert", "t5"] = "gpt"
    preset: str | None = "gpt2-tiny"
    init: str | None = Field(None, description="checkpoint or imported model directory to start from")
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=8)
    d_ff: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    pos: Literal["learned", "rotary"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    norm_eps: float | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    attn_dropout: float | None = Field(None, ge=0, lt=1)
    init_std: float | None = Field(None, gt=0)
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

    def arch_fields(self) -> dict[str, Any]:
        """The architecture fields that differ from the preset (None = take the preset's)."""
        skip = {"family", "preset", "init"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


class DistConfig(Strict):
    timeout_s: int = Field(600, ge=10, description="timeout of distributed init and collectives")
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class PretrainConfig(Strict):
    """`llmstack pretrain`: tokenizer -> model -> engine -> data -> loop."""

    run: RunConfig = Field(default_factory=RunConfig)
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw ds_config merged on top")


class TokenizerTrainConfig(Strict):
    """`llmstack tokenizer train`: writes tokenizer.path."""

    seed: int = 1234
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)


class DataPrepareConfig(Strict):
    """`llmstack data prepare`: data.sources -> token shards + manifest.json in data.out."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)


SCHEMAS: dict[str, type[Strict]] = {"pretrain": PretrainConfig, "tokenizer": TokenizerTrainConfig,
                                    "data": DataPrepareConfig}


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> validated object
# ---------------------------------------------------------------------------------------------


def parse_override(arg: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so lists and numbers work)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key.sub=value")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {arg!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return parts, value


def set_dotted(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(schema: type[Strict], path: str | None, overrides: list[str] = ()) -> Strict:
    """Resolve defaults < YAML < overrides and validate. Raises ConfigError with a clear message."""
    data = read_yaml(path) if path else {}
    for arg in overrides:
        set_dotted(data, *parse_override(arg))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n" + format_errors(schema, e)) from None


def _field_model(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of `loc` (for listing allowed keys)."""
    model = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        # unwrap Optional[...] / list[...] to find a nested model
        cands = [ann, *getattr(ann, "__args__", ())]
        for a in list(cands):
            cands.extend(getattr(a, "__args__", ()))
        model = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def format_errors(schema: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _field_model(schema, loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""`CheckpointMeta`: the typed record of what a checkpoint (meta.json) or a model directory
(llmstack_model.json of a consolidated or imported model; the recorded facts of a Hugging Face
directory) says about the weights it holds.

Written by one place (the trainer's checkpoint callback, `consolidate`, `import`), read by every
stage, export, generate and eval through `CheckpointMeta.from_dict`, the only code that looks up
keys in the JSON: files written by older versions lack some keys, and their defaults live here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any



@dataclass
class CheckpointMeta:
    """One checkpoint's (or model directory's) record. `model` is the architecture as the family's
    config dataclass fields (json types: tuples as lists); `config` the run's resolved config."""

    step: int | None = None  # optimizer updates contained in the weights
    tokens: int | None = None  # training tokens seen (all ranks)
    world_size: int = 1  # processes that wrote the ZeRO partitions
    zero_stage: int = 0
    precision: str = "fp32"
    universal: bool = False  # DeepSpeed universal format (`checkpoint reshape`): loads on any world size
    model_family: str = "gpt"
    model: dict | None = None
    head: str | None = None  # "scalar": a reward model or critic (ScalarHeadModel)
    lora: dict | None = None  # {"r", "alpha", "scaling", "modules"} of an `sft` LoRA run
    tokenizer_hash: str | None = None
    tokenizer_path: str | None = None
    config: dict | None = None
    stage: str | None = None  # the command that wrote it (sft, rm, dpo, ppo-actor, ...)
    data: dict | None = None  # pretraining: every stream's cursor (data_pipeline/stream.py state)
    data_fingerprint: str | None = None  # sft: the conversations and their settings
    ppo: dict | None = None  # ppo actor: {"kl": controller state, "moments": running moments}
    source: str | None = None  # where a converted or consolidated copy came from
    special_ids: dict | None = None  # an imported model's pad/bos/eos ids
    hf_model_type: str | None = None
    checkpoint_format: int = 1
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading and writing -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> CheckpointMeta:
        """The record of a parsed meta.json / llmstack_model.json; a missing key takes its default
        (None for an unrecorded fact), an unknown one is kept in `extra`."""
        if not isinstance(raw, dict):
            raise ValueError(f"checkpoint metadata must be a JSON object, not {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names and v is not None}
        meta = cls(**known, extra={k: v for k, v in raw.items() if k not in names})
        meta.universal = bool(meta.universal)
        meta.world_size = int(meta.world_size or 1)
        meta.zero_stage = int(meta.zero_stage or 0)
        meta.checkpoint_format = int(meta.checkpoint_format or 1)
        return meta

    @classmethod
    def from_hf(cls, family: str, model: dict, hf_config: dict, *, source: str, tokenizer_path: str | None,
                tokenizer_hash: str | None) -> CheckpointMeta:
        """The record of a Hugging Face model directory converted to `family` / `model`, from its
        parsed config.json (`hf_config`): its model type and pad/bos/eos ids are kept."""
        return cls(model_family=family, model=model, source=source, tokenizer_path=tokenizer_path,
                   tokenizer_hash=tokenizer_hash, hf_model_type=hf_config.get("model_type"),
                   special_ids={k: hf_config.get(f"{k}_token_id") for k in ("pad", "bos", "eos")})

    @classmethod
    def read(cls, path) -> CheckpointMeta:
        """From a JSON file (ValueError when it is not one)."""
        from pathlib import Path

        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self, only: tuple[str, ...] | None = None) -> dict:
        """The JSON object; `only`: just these fields, in this order (a model directory's
        llmstack_model.json records the weights, not the ZeRO layout or data cursor of the run)."""
        if only is not None:
            return {k: getattr(self, k) for k in only}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def to_json(self, only: tuple[str, ...] | None = None) -> str:
        return json.dumps(self.to_dict(only), indent=2, default=str)

    def replace(self, **changes) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)

    def stamped(self) -> CheckpointMeta:
        return self.replace(time=time.time())

    # -- facts derived from the nested records -------------------------------------------------

    @property
    def vocab_size(self) -> int | None:
        v = (self.model or {}).get("vocab_size")
        return v if isinstance(v, int) else None

    @property
    def tied_embeddings(self) -> bool:
        return bool((self.model or {}).get("tie_embeddings"))

    def config_value(self, *keys: str, default=None):
        """A value of the recorded run config, e.g. config_value("data", "seq_len"); `default`
        when the config or any section on the way is not recorded."""
        node: Any = self.config
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return default if node is None else node

    @property
    def lora_scaling(self) -> float | None:
        """alpha / r of the LoRA adapters the weights carry (None: no adapters)."""
        return self.lora.get("scaling") if self.lora else None

    @property
    def partitioned(self) -> bool:
        """ZeRO partitions tied to the number of processes that wrote them."""
        return self.zero_stage > 0 and not self.universal

    def special_id(self, name: str) -> int | None:
        v = (self.special_ids or {}).get(name)
        return v if isinstance(v, int) or isinstance(v, list) else None

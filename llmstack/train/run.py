"""Starting a training run, the same for every stage: process group, batch arithmetic, run
directory and its lock, and the checkpoint to resume from with every check a resume needs.

`start(cfg)` is the first call of every stage recipe (pretraining opens the run directory only
once its tokenizer exists: `Run.open`). Resuming is checked in one place:
- world size: ZeRO partitions load only on the number of processes that wrote them, unless the
  checkpoint is universal (`llmstack checkpoint reshape`), which then sets DeepSpeed's
  `checkpoint.load_universal` in every engine's config (`Run.engine_config`);
- tokenizer: the checkpoint's tokenizer hash against the run's (`Run.check_resume`);
- architecture: the recorded family and architecture against the run's (`check_architecture`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llmstack.config import to_yaml
from llmstack.distributed import deepspeed as ds
from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt
from llmstack.train.meta import CheckpointMeta

# Fields of a recorded architecture that may change on resume: how activations are stored and
# how much dropout the remaining steps use, not what the saved weights compute.
RESUMABLE_CHANGES = ("activation_checkpointing", "dropout", "attn_dropout")


def ds_config_for(cfg, world: int, zero=None, *, micro_batch: int | None = None, grad_accum: int | None = None,
                  lr: float | None = None) -> tuple[dict, int, int]:
    """(ds_config, grad_accum, global_batch) of one engine of `cfg` at this world size: the
    config's zero section (or `zero`), train section and precision; the arguments override the
    micro-batch, accumulation and learning rate (PPO's engines)."""
    t, zero = cfg.train, zero or cfg.zero
    micro, accum, global_batch = ds.resolve_batch(micro_batch or t.micro_batch, grad_accum or t.grad_accum,
                                                  getattr(t, "global_batch", None) if micro_batch is None else None,
                                                  world)
    ds_config = ds.build_ds_config(
        micro_batch=micro, grad_accum=accum, world=world, precision=cfg.precision, zero_stage=zero.stage,
        offload_optimizer=zero.offload_optimizer, offload_params=zero.offload_params, grad_clip=t.grad_clip,
        lr=lr or t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, comm_dtype=zero.comm_dtype,
        extra=cfg.deepspeed)
    return ds_config, accum, global_batch


@dataclass
class Run:
    """A started run (see `start`). `saved` is the meta of the checkpoint to resume from."""

    cfg: object
    world: int
    rank: int
    dir: Path
    ckpt_root: Path
    resume_from: Path | None
    saved: CheckpointMeta | None
    ds_config: dict | None
    accum: int
    global_batch: int

    @property
    def start_step(self) -> int:
        return self.saved.step if self.saved is not None else 0

    def engine_config(self, ds_config: dict) -> dict:
        """An engine's ds_config, reading a universal checkpoint when resuming from one."""
        if self.saved is None or not self.saved.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def check_resume(self, tokenizer_hash: str, family: str | None = None, arch=None) -> None:
        """Refuse to resume a checkpoint of another tokenizer, or (given) another model."""
        if self.saved is None:
            return
        try:
            check_tokenizer(self.saved.tokenizer_hash, tokenizer_hash, self.resume_from)
        except UsageError as e:
            raise UsageError(f"{e}, or: {separate_run_hint(self.resume_from)}") from None
        if family is not None:
            check_architecture(self.saved, family, arch, self.resume_from)

    def meta(self, step: int, tokens: int, *, tokenizer, arch, zero_stage: int, family: str | None = None,
             **extra) -> CheckpointMeta:
        """The record of a checkpoint this run writes at `step` (family: the architecture's by default)."""
        if family is None:
            from llmstack import models

            family = models.family_of_config(arch)
        return CheckpointMeta(step=step, tokens=tokens, world_size=self.world, zero_stage=zero_stage,
                              precision=self.cfg.precision, tokenizer_hash=tokenizer.hash,
                              tokenizer_path=str(tokenizer.path), model_family=family, model=dict(vars(arch)),
                              config=self.cfg.model_dump(mode="json"), **extra)

    def open(self) -> Run:
        """Lock the run directory (created now) and pick the checkpoint to resume from
        (train.resume: auto = the newest that verifies), checking that this world size can load
        it; a universal checkpoint sets `load_universal` in ds_config."""
        resume_from = ckpt.start_run(self.cfg.train.resume, self.ckpt_root, self.dir)
        saved = ckpt.read_meta(resume_from) if resume_from is not None else None
        if saved is not None:
            check_world_size(saved, self.world, resume_from)
        self.resume_from, self.saved = resume_from, saved
        if self.ds_config is not None:
            self.ds_config = self.engine_config(self.ds_config)
        return self

    def record(self, tokenizer_hash: str, **extra) -> None:
        """Rank 0 records the resolved config, code revision and tokenizer hash in the run directory."""
        if not env.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(self.cfg))
        info = {"git_revision": git_revision(), "tokenizer_hash": tokenizer_hash, "argv": sys.argv,
                "world_size": self.world, "torch": torch.__version__, **extra}
        (self.dir / "run.json").write_text(json.dumps(info, indent=2, default=str))


def start(cfg, *, ckpt_root: Path | None = None, open_run: bool = True) -> Run:
    """Every rank, first thing: init the process group, check the precision is available and
    resolve the batch arithmetic (stages with one trained engine: cfg.zero); then, unless
    `open_run=False` (the stage calls `Run.open` itself, later), open the run directory.
    A checkpoint this world size cannot load is refused before the process group starts
    (`precheck_world_size`)."""
    ckpt_root = ckpt_root or cfg.run.path / "checkpoints"
    if "WORLD_SIZE" in os.environ or "RANK" not in os.environ:  # as env.init will see it (alone: 1)
        precheck_world_size(cfg.train.resume, ckpt_root, int(os.environ.get("WORLD_SIZE", 1)))
    env.init(cfg.dist.backend, cfg.dist.timeout_s)
    ds.check_precision(cfg.precision)  # before any tokenizer, data or model is built
    world, t = env.world_size(), cfg.train
    ds_config, accum, global_batch = ds_config_for(cfg, world) if hasattr(cfg, "zero") else (None, t.grad_accum, 0)
    run = Run(cfg=cfg, world=world, rank=env.rank(), dir=cfg.run.path, ckpt_root=ckpt_root, resume_from=None,
              saved=None, ds_config=ds_config, accum=accum, global_batch=global_batch)
    return run.open() if open_run else run


def separate_run_hint(where) -> str:
    """The end of a refusal to resume the checkpoint `where` into a run that differs from it: the
    user most likely meant a new run, and run.dir defaults to runs/<run.name>, which the demo
    configs share (gpt-tiny.yaml's run.name is the same whatever data.sources says)."""
    run_dir = ckpt.run_dir_of(Path(where).parent)
    return (f"{run_dir} holds a run with other settings: to start a separate run, give it its own name, "
            "run.name=NEW_NAME (or run.dir=DIR); to start this one over, train.resume=none (its checkpoints are "
            "set aside)")


def check_world_size(saved: CheckpointMeta, world: int, where) -> None:
    """ZeRO partitions load only on the number of processes that wrote them; a universal
    checkpoint (`llmstack checkpoint reshape`) or an unpartitioned one loads on any."""
    if saved.partitioned and saved.world_size != world:
        raise UsageError(f"{where} holds ZeRO-{saved.zero_stage} partitions of {saved.world_size} processes; "
                         f"this run has {world}. Resume with the same number of processes, or convert it "
                         f"first: llmstack checkpoint reshape {where}")


def precheck_world_size(resume: str, ckpt_root: Path, world: int) -> None:
    """The world-size refusal of `Run.open`, made before the process group starts: importing
    DeepSpeed and initialising it (on CPU, a first run builds its shared-memory op) took from
    seconds to minutes before the refusal came. Only the checkpoints' meta.json files are read (no
    lock, no hashing, no collective: every rank decides alone, and alike). It refuses only when
    every checkpoint `train.resume` may pick is partitioned for another world size, so that the
    verified choice of `Run.open` would be refused too; anything else is left to `Run.open`."""
    if resume == "none":
        return
    try:
        candidates = [p for _, p in ckpt.step_dirs(ckpt_root)] if resume == "auto" else [ckpt.resolve(resume)]
        metas = [(p, ckpt.read_meta(p)) for p in candidates]
    except UsageError:
        return  # a missing or unreadable checkpoint: Run.open says so, with the run's lock held
    if metas and all(m.partitioned and m.world_size != world for _, m in metas):
        where, saved = metas[-1]
        check_world_size(saved, world, where)


def check_tokenizer(saved: str | None, current: str, where) -> None:
    if saved and saved != current:
        raise UsageError(
            f"tokenizer mismatch: {where} was made with tokenizer {saved}, the config's tokenizer is {current}; "
            "set tokenizer.path to the tokenizer of that checkpoint"
        )


def check_architecture(saved: CheckpointMeta, family: str, arch, where) -> None:
    """Refuse to resume `where` into another model than the one it saved: the checkpoint's
    recorded family and architecture against this run's.

    Another size failed late with a shape error; a change that keeps every shape (n_head at the
    same d_model, rope_theta, the norm, the activation, the positions) loaded without complaint
    and went on training a different function of the saved weights. Fields the checkpoint does
    not record (written by an older version) are not compared.
    """
    diff = []
    if saved.model_family != family:
        diff.append(f"model.family: {saved.model_family!r} -> {family!r}")
    recorded = saved.model or {}
    now = arch if isinstance(arch, dict) else dict(vars(arch))
    now = json.loads(json.dumps(now, default=str))  # as meta.json holds it (tuples as lists)
    diff += [f"model.{k}: {recorded[k]!r} -> {now[k]!r}" for k in sorted(recorded)
             if k in now and k not in RESUMABLE_CHANGES and recorded[k] != now[k]]
    if diff:
        raise UsageError(f"cannot resume from {where}: this run's model differs from the checkpoint's ("
                         + "; ".join(diff) + "); resume with the checkpoint's architecture, or: "
                         + separate_run_hint(where))


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def dry_run(cfg) -> None:
    """`--dry-run` of a training stage: the resolved config, and the DeepSpeed config of a
    one-engine stage at this world size; touches nothing."""
    print("# resolved config")
    print(to_yaml(cfg), end="")
    if hasattr(cfg, "zero"):
        ds_config, _, _ = ds_config_for(cfg, env.world_size())
        print(f"# deepspeed config (world size {env.world_size()})")
        print(json.dumps(ds_config, indent=2))

"""`llmstack` command line: subcommand dispatch only (the work is in llmstack/stages/).

Every command: `--help` explains it; a bad argument, a missing file or a bad config exits with
status 2 and one message, no traceback. Around every command (`entry_point`, shared with
`llmstack-eval`): stdout carries results only, and a closed pipe ends it quietly. Validation
comes before the heavy libraries (DeepSpeed, transformers) are imported: they are imported by
the commands that use them, when they use them.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import functools
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import time

from data_pipeline.errors import DataError
from llmstack import __version__
from llmstack.errors import Diverged, TrainingStopped, UsageError

# seconds a rank that failed for another reason waits before exiting (see main)
_PEER_EXIT_GRACE_S = 3.0

# the commands dispatched through llmstack.stages.STAGES (imported only when one of them runs)
TRAINING_STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")

OVERRIDES_HELP = "dotted overrides, e.g. train.max_steps=200 zero.stage=3 (values parsed as YAML)"
# the fine-tuning stages' word on the generic backend (models/hf_backend.py)
HF_BACKEND_HELP = ("A transformers model that `llmstack import` does not map trains through its own class with "
                   "model.backend=hf (actor.backend / critic.backend for ppo and grpo; init: its directory, or a "
                   "checkpoint of such a run) under the same DeepSpeed engine, ZeRO stages and precision. It lacks "
                   "packed sequences (sft.packing=false), the fused chunked loss (the logits are formed), the "
                   "native decoding step (rollouts and `llmstack generate` use the model's own KV cache), `llmstack "
                   "plan` and `llmstack-eval` (export it and use lm-evaluation-harness). LoRA targets are its module names (q_proj, ...; q k v o up gate down as *_proj).")

VERSION = f"llmstack {__version__}"  # what `llmstack --version` and `llmstack-eval --version` print

# the exit status of a command whose reader closed its stdout early (`llmstack ... | head`): the
# one a Unix tool killed by SIGPIPE has (128 + 13), so `set -o pipefail` scripts see what they
# see from cat or seq; 0 would claim the whole output was delivered
EXIT_BROKEN_PIPE = 141


# --- what our entry points do around any command: stdout for results, a closed pipe ---------------

def entry_point(command, argv: list[str] | None) -> int:
    """Run an entry point's `command(argv)` so that stdout carries only the command's results
    (DeepSpeed's own output goes to stderr: `deepspeed_output_to_stderr`) and a reader that stops
    early (`| head`) ends the command quietly with EXIT_BROKEN_PIPE instead of a traceback."""
    deepspeed_output_to_stderr()
    try:
        try:
            return command(argv)
        finally:  # the last buffered lines too (--help and SystemExit included), inside the guard
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull, or its flush at exit fails ("Exception ignored")
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def deepspeed_output_to_stderr() -> None:
    """Send what DeepSpeed writes to stderr, so that `llmstack generate ... > out.txt` holds the
    generated text only. DeepSpeed's logger has a handler on sys.stdout ("Setting accelerator to
    CPU", ...); its modules print() progress ("Processing zero checkpoint ...", "... built
    successfully"); an op build runs the compiler with file descriptor 1 as its output. DeepSpeed
    is imported lazily, by the commands that use it, so this hooks its import: every deepspeed
    module gets a `print` of its own that writes to stderr, the logger's handler is re-pointed
    once created, and op builds run with descriptor 1 on stderr. Idempotent."""
    if not any(isinstance(f, _DeepSpeedToStderr) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeepSpeedToStderr(sys.stdout))
    if "deepspeed.utils.logging" in sys.modules:  # imported before this ran (a call from Python)
        _logger_to_stderr(sys.modules["deepspeed.utils.logging"])


class _DeepSpeedToStderr(importlib.abc.MetaPathFinder):
    """Finds deepspeed modules as the normal path finder does, loaded by `_StderrLoader`."""

    def __init__(self, stdout):
        self.stdout = stdout  # prints aimed at another stream (sys.stdout swapped for a file) stay there

    def find_spec(self, fullname, path, target=None):
        if fullname.partition(".")[0] != "deepspeed":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _StderrLoader(spec.loader.name, spec.loader.path, self.stdout)
        return spec


class _StderrLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname, path, stdout):
        super().__init__(fullname, path)
        self.stdout = stdout

    def exec_module(self, module):
        module.print = functools.partial(_print_to_stderr, self.stdout)  # found before the builtin
        super().exec_module(module)
        if module.__name__ == "deepspeed.utils.logging":
            _logger_to_stderr(module)
        elif module.__name__ == "deepspeed.ops.op_builder.builder":
            jit_load = module.OpBuilder.jit_load

            @functools.wraps(jit_load)
            def jit_load_to_stderr(*args, **kwargs):
                with _fd1_to_stderr():
                    return jit_load(*args, **kwargs)

            module.OpBuilder.jit_load = jit_load_to_stderr


def _print_to_stderr(stdout, *args, file=None, **kwargs):
    if file is None:
        file = sys.stderr if sys.stdout is stdout else sys.stdout
    builtins.print(*args, file=file, **kwargs)


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of the write (a handler keeps its stream: a
    stream swapped in for a while, then closed, must not stay the handler's)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _logger_to_stderr(module) -> None:
    for h in getattr(module, "logger", logging.getLogger("DeepSpeed")).handlers:
        if type(h) is logging.StreamHandler and not isinstance(h.stream, _CurrentStderr):
            with contextlib.suppress(ValueError, OSError):  # the old stream may be closed by now
                h.flush()
            h.stream = _CurrentStderr()  # (setStream would flush the old stream unguarded)


@contextlib.contextmanager
def _fd1_to_stderr():
    """File descriptor 1 (what subprocesses write to) on stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; we read LOCAL_RANK from the environment instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            os.environ.setdefault("LOCAL_RANK", a)
            skip = False
        elif m := re.fullmatch(r"--local[_-]rank=(\d+)", a):
            os.environ.setdefault("LOCAL_RANK", m.group(1))
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(a)
    return out


def _config_cmd(sub, name: str, help_: str, description: str, config_optional: bool = False):
    epilog = HF_BACKEND_HELP if sub.dest == "command" and name in ("sft", "rm", "dpo", "ppo", "grpo") else None
    p = sub.add_parser(name, help=help_, description=description, epilog=epilog)
    p.add_argument("config", help="YAML config file (see configs/)", nargs="?" if config_optional else None)
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config (and DeepSpeed config) and exit")
    return p


def _overwrite_arg(p, command: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace a non-empty --out, but only one written by `llmstack {command}` (nothing else in it: "
                   "a run directory or checkpoints are refused); the new output is written beside it and swapped "
                   "in when complete")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmstack",
        description="LLM pretraining and fine-tuning stack: tokenizer -> data -> pretrain (DeepSpeed ZeRO) -> ...",
        epilog="Multi-process: deepspeed --num_gpus N --module llmstack pretrain CONFIG ... "
        "or torchrun --nproc_per_node N -m llmstack pretrain CONFIG ...",
    )
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tok = sub.add_parser("tokenizer", help="train a tokenizer", description="Tokenizer commands.")
    tok_sub = tok.add_subparsers(dest="action", metavar="ACTION", required=True)
    _config_cmd(tok_sub, "train", "train a BPE / SentencePiece tokenizer from a config",
                "Train a byte-level BPE (tokenizers) or SentencePiece BPE/Unigram tokenizer and save it to "
                "tokenizer.path in a form transformers.AutoTokenizer loads.")

    pretrain_cmd = _config_cmd(sub, "pretrain", "pretrain a GPT, BERT or T5 with DeepSpeed ZeRO",
                "Pretraining with the model family's objective (model.family): causal LM for gpt, masked LM "
                "(15%%, 80/10/10) for bert, span corruption (15%% noise, mean span 3, sentinels) for t5. Trains the "
                "config's tokenizer first if it does not exist. Resumes from the newest complete checkpoint by "
                "default (train.resume=auto).", config_optional=True)
    pretrain_cmd.add_argument("--list-options", action="store_true",
                              help="list the model / optimizer component options with their config keys and exit")

    _config_cmd(sub, "sft", "supervised fine-tuning on chat records (full or LoRA)",
                "Fine-tune a GPT (model.init: a checkpoint, an imported or a Hugging Face directory; its tokenizer "
                "is used) on chat records: JSONL or HF datasets with `messages` (system/user/assistant) or "
                "`prompt`/`response`, or builtin-sft:train (the demo pairs). Loss on assistant tokens only "
                "(sft.train_on=all|last), conversations packed without cross-attention (sft.packing) or padded, "
                "token-mean loss over the whole global batch. lora.enabled=true trains peft LoRA adapters "
                "(lora.r, lora.alpha, lora.dropout, lora.target), merged on export. Bad records are skipped and "
                "counted (data.on_error=skip) or stop the run (fail, exit 2).")

    _config_cmd(sub, "rm", "train a reward model on preference pairs",
                "Train a scalar-head reward model (GPT backbone, reward read at the last token) with the "
                "Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - rm.margin) on preference pairs: JSONL or HF "
                "datasets with prompt/chosen/rejected (or chosen/rejected message lists), or builtin-prefs:train "
                "(the demo pairs). model.init: an SFT checkpoint (fresh head; its tokenizer is used). Logs pairwise "
                "accuracy and reward margin, on data.val_sources too.")
    _config_cmd(sub, "dpo", "direct preference optimisation of a policy (no reward model)",
                "DPO (sigmoid loss, dpo.beta, dpo.label_smoothing) of a GPT (model.init: an SFT checkpoint) against a "
                "frozen reference (its initial weights; log-probs precomputed or computed online: dpo.reference). "
                "Same data as `llmstack rm`. Logs the implicit reward margin and chosen-over-rejected accuracy.")
    _config_cmd(sub, "ppo", "optimise a policy against a reward with PPO",
                "PPO with four models, each its own DeepSpeed engine and ZeRO stage: actor and critic trained, "
                "reference and reward frozen. Rollouts decode with the KV cache (actor.init, e.g. an SFT checkpoint); "
                "rewards come from a reward model (reward.init) or a Python function (reward.function=module:function) "
                "with a per-token KL penalty to the reference (fixed or adaptive), GAE, whitened advantages, clipped "
                "policy and value losses, several epochs of mini-batches per rollout batch. Logs reward, KL, entropy, "
                "clip fraction, value loss, approx-KL, response length and the generate/score/train time split.")

    _config_cmd(sub, "grpo", "critic-free group-relative RL on verifiable rewards (GRPO, Dr. GRPO, RLOO, REINFORCE++)",
                "Sample rollout.group_size completions of each prompt from the actor (actor.init, e.g. an SFT "
                "checkpoint), score them with a verifier (reward.function: llmstack.rlhf.verifiers:numeric_answer, "
                "regex_format or program_tests, or any module:function called as f(prompts, responses, references, "
                "**reward.kwargs)) against each record's reference (data.reference_field), and train with "
                "group-relative advantages (grpo.algo: grpo, dr_grpo, rloo, reinforce_pp), the clipped objective "
                "(grpo.clip_low / clip_high), optional KL to the reference (grpo.kl_coef, in the loss or the reward), "
                "dynamic sampling and overlong handling. No critic, no reward model. Logs reward, the fraction of "
                "all-equal groups, KL, clip fraction, response length and the sampler-vs-trainer log-prob gap.")

    data = sub.add_parser("data", help="prepare and inspect token shards", description="Data commands.")
    data_sub = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    _config_cmd(data_sub, "prepare", "tokenize data.sources into token shards (data.out)",
                "Tokenize data.sources offline, in data.num_workers parallel processes, into binary token shards "
                "plus manifest.json under data.out. The shards directory is then a source for pretraining "
                "(data.sources='[{path: DIR}]'): memory-mapped, no tokenization at training time. Bad records are "
                "skipped and counted (data.on_error=skip) or stop the run naming file and line (fail, exit 2).")
    ins = data_sub.add_parser("inspect", help="counts, token histogram and decoded samples of a shards directory",
                              description="Summarize a directory written by `llmstack data prepare`: documents and "
                              "tokens per source, document-length and token histograms, decoded samples, skipped input.")
    ins.add_argument("shards_dir", help="directory with manifest.json and shard_*.bin")
    ins.add_argument("--tokenizer", help="tokenizer dir for decoding (default: the one recorded in the manifest)")
    ins.add_argument("--samples", type=int, default=3, help="documents to decode (default: %(default)s)")
    ins.add_argument("--top", type=int, default=20, help="most frequent tokens to list (default: %(default)s)")

    ck = sub.add_parser("checkpoint", help="checkpoint tools", description="Checkpoint tools.")
    ck_sub = ck.add_subparsers(dest="action", metavar="ACTION", required=True)
    cons = ck_sub.add_parser("consolidate", help="one fp32 model file from a checkpoint of any ZeRO stage",
                             description="Gather a (possibly ZeRO-partitioned) checkpoint into OUT/model.safetensors "
                             "plus OUT/llmstack_model.json (architecture, tokenizer hash, step).")
    cons.add_argument("checkpoint", help="step_N dir, checkpoints/latest, or a run directory")
    cons.add_argument("--out", required=True, help="output directory (must not exist or be empty; see --overwrite)")
    _overwrite_arg(cons, "checkpoint consolidate")
    rs = ck_sub.add_parser("reshape", help="make a ZeRO checkpoint resumable on any number of processes",
                           description="Convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format, written "
                           "beside it as <step_N>_universal/. Resume on any world size with "
                           "train.resume=<that dir> (same global batch: micro_batch x grad_accum x world).")
    rs.add_argument("checkpoint", help="step_N dir, checkpoints/latest, or a run directory")
    rs.add_argument("--out", help="output directory (default: beside the checkpoint)")

    ex = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint",
                        description="Convert a checkpoint (any ZeRO stage), a consolidated or an imported directory "
                        "into a Hugging Face directory: config.json, model.safetensors (sharded beyond "
                        "--max-shard-size) and the tokenizer files. gpt2-style GPT -> GPT2LMHeadModel, llama-style "
                        "GPT -> LlamaForCausalLM, BERT -> BertForMaskedLM, T5 -> T5ForConditionalGeneration. "
                        "An architecture with no Hugging Face equivalent is refused, naming the option.")
    ex.add_argument("checkpoint", help="step_N dir, checkpoints/latest, a run directory, or a consolidated/imported dir")
    ex.add_argument("--out", required=True, help="output directory (must not exist or be empty; see --overwrite)")
    _overwrite_arg(ex, "export")
    ex.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded with the checkpoint)")
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default: %(default)s)")
    ex.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: %(default)s)")

    im = sub.add_parser("import", help="convert a Hugging Face model directory into a native model",
                        description="Read a Hugging Face directory (GPT2LMHeadModel, LlamaForCausalLM, "
                        "BertForMaskedLM, T5ForConditionalGeneration) into OUT: model.safetensors, "
                        "llmstack_model.json and the tokenizer files. OUT is accepted by model.init, "
                        "`llmstack generate`, `llmstack-eval` and `llmstack export`.")
    im.add_argument("hf_dir", help="directory with config.json and model.safetensors (or shards, or pytorch_model.bin)")
    im.add_argument("--out", required=True, help="output directory (must not exist or be empty; see --overwrite)")
    _overwrite_arg(im, "import")

    gen = sub.add_parser("generate", help="generate text from a GPT or T5 model (KV-cache decoding)",
                         description="Continue each --prompt with a GPT (or answer it with a T5) from a checkpoint, a "
                         "consolidated/imported directory or a Hugging Face directory. Sampling by default; "
                         "--temperature 0 is greedy. Stops at EOS, at any --stop token, or after --max-new-tokens.")
    gen.add_argument("checkpoint", help="step_N dir, checkpoints/latest, a run directory, or a model directory")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    gen.add_argument("--chat", action="append", default=[], help="a user message, answered under the chat template "
                     "(repeat for a batch; stops at <|end|>); for models fine-tuned with `llmstack sft`")
    gen.add_argument("--system", help="with --chat: a system message before each user message")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: off)")
    gen.add_argument("--stop", action="append", default=[], help="extra stop token (repeatable); EOS always stops")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded with the model)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; for checks)")
    gen.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                     help="where the model runs: auto (default) = the GPU (cuda:LOCAL_RANK) when CUDA is available, "
                     "else cpu; an explicit cuda without a GPU exits 2")
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weights and activations: auto (default) = bf16 on a GPU, fp32 on CPU; fp16 needs a GPU. "
                     "Logits are upcast to fp32 before sampling or argmax")

    pl = sub.add_parser("plan", help="memory per GPU for each ZeRO stage, suggested micro-batch",
                        description="Estimate parameters, FLOPs/token and memory per GPU (weights, gradients, optimizer "
                        "states, activations with and without checkpointing, offload) for ZeRO 0-3 and suggest the "
                        "largest micro-batch that fits. Exits 2 when no setting fits, before anything is launched.")
    pl.add_argument("config", help="pretrain YAML config")
    pl.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pl.add_argument("--gpus", type=int, required=True, help="data-parallel processes (GPUs in total)")
    pl.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB")

    pf = sub.add_parser("preflight", help="check every host of a hostfile before a multi-node launch",
                        description="Probe each host of a DeepSpeed hostfile (locally, or over ssh with this Python) "
                        "and print a table of Python/torch/CUDA/deepspeed/transformers/llmstack versions, GPUs and "
                        "whether the rendezvous port is free on the first host. Exit 1 on any mismatch.")
    pf.add_argument("--hostfile", required=True, help="'<host> slots=<N>' per line")
    pf.add_argument("--port", type=int, default=29500, help="rendezvous port to check (default: %(default)s)")

    qs = sub.add_parser("quickstart", help="the tiny demo pipeline on CPU",
                        description="The whole pipeline on the builtin corpus (the Python standard library's "
                        "docstrings and comments): tokenizer -> pretrain a tiny GPT -> SFT -> reward model -> PPO "
                        "and DPO -> GRPO (verifiable arithmetic rewards) -> eval, each stage with its demo config "
                        "from configs/. Writes OUT/report.md "
                        "(a table of every stage's metrics, PNG curves in OUT/plots/) and OUT/report.json. "
                        "About 9.5 minutes on 2 CPU cores.")
    qs.add_argument("--out", default="runs/quickstart", help="output directory (default: %(default)s)")
    qs.add_argument("--steps", type=int, default=300, help="pretraining steps (default: %(default)s)")
    qs.add_argument("--scale", type=float, default=1.0,
                    help="multiply every later stage's steps by this (0 < F <= 1; a smoke run of the wiring)")
    qs.add_argument("--pretrain-only", action="store_true",
                    help="stop after the tokenizer and pretraining (about 2.5 minutes on 2 CPU cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main, argv)


def _main(argv: list[str] | None) -> int:
    entry = argv is None  # the process's own command (console script, python -m), not a call from Python
    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        rc = _dispatch(args)
        if "torch.distributed" in sys.modules:  # only commands that may have started a process group
            from llmstack.distributed import env

            if entry:
                env.exit_after_group(rc)  # does not return if one was started (see there why)
            env.shutdown()
        return rc
    except (UsageError, DataError) as e:
        # Errors every rank meets are printed once; bad data is met by one rank, which says so.
        # (DataError: the data layer's own, which training stages that read all their data on
        # every rank, SFT and the preference / prompt stages, let through.)
        every_rank = getattr(e, "every_rank", False)
        if os.environ.get("RANK", "0") == "0" or every_rank:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if every_rank and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os._exit(2)  # the peers wait in a collective: leave now, the launcher stops them
        if entry and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "torch.distributed" in sys.modules:
            # every rank met this error (after the same collectives): leave without interpreter
            # finalization, where the process group's worker threads can abort the process
            # ("terminate called without an active exception", see env.exit_after_group)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except TrainingStopped as e:
        # Divergence (3) or a stop signal (75): every rank decided it at the same step, after the
        # last collective, so each ends the way a finished run does, with the run's own status.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}" if isinstance(e, Diverged) else str(e), file=sys.stderr, flush=True)
        if "torch.distributed" in sys.modules:
            from llmstack.distributed import env

            if entry:
                env.exit_after_group(e.exit_code)
            env.shutdown()
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a fault: keep the traceback, and say which process it was
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        if "torch.distributed" in sys.modules:
            from llmstack.distributed import watchdog

            watchdog.collective_failed(e)  # a timed-out collective: names the silent rank, exits
        import socket
        import traceback

        traceback.print_exc()
        print(f"error: rank {os.environ.get('RANK')} on host {socket.gethostname()} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if "torch.distributed" in sys.modules:
            watchdog.stop()  # this rank is going: its peers may say so at once, not after a timeout
        # Exit without process-group teardown (it would wait for peers that are themselves
        # waiting for this rank); the launcher then stops the others. Wait a little first: when a
        # peer stopped with exit 2 (bad input it alone met), this rank's error is only the lost
        # connection, and the deepspeed launcher reports the first failed status it polls
        # (once a second), which should be that peer's 2.
        time.sleep(_PEER_EXIT_GRACE_S)
        os._exit(1)


def _dispatch(args) -> int:
    from llmstack.config import PretrainConfig, TokenizerTrainConfig, load_config, to_yaml

    if args.command == "tokenizer":
        cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from llmstack.stages.common import train_tokenizer

        train_tokenizer(cfg.tokenizer, cfg.data.sources)
        return 0
    if args.command in TRAINING_STAGES:
        if args.command == "pretrain" and args.list_options:
            from llmstack.options import format_table

            print(format_table())
            return 0
        if args.config is None:
            raise UsageError("llmstack pretrain needs a CONFIG file (or --list-options)")
        from llmstack.config import SCHEMAS

        # validated before the stage modules (torch, DeepSpeed) are imported: a bad config fails fast
        cfg = load_config(SCHEMAS[args.command], args.config, args.overrides)
        from llmstack.stages import STAGES

        stage = STAGES[args.command]
        if args.dry_run:
            stage.dry_run(cfg)
            return 0
        stage.run(cfg)
        return 0
    if args.command == "data":
        if args.action == "inspect":
            from llmstack.stages import data

            data.inspect(args.shards_dir, args.tokenizer, samples=args.samples, top=args.top)
            return 0
        from llmstack.config import DataPrepareConfig

        cfg = load_config(DataPrepareConfig, args.config, args.overrides)  # before the heavy imports
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from llmstack.stages import data

        data.prepare(cfg)
        return 0
    if args.command == "checkpoint":
        from llmstack.train import checkpoint

        if args.action == "reshape":
            print(f"wrote {checkpoint.reshape(args.checkpoint, args.out)}")
        else:
            from llmstack.stages.export import consolidate

            print(f"wrote {consolidate(args.checkpoint, args.out, overwrite=args.overwrite)}")
        return 0
    if args.command == "export":
        from llmstack.stages.export import export

        out = export(args.checkpoint, args.out, tokenizer_path=args.tokenizer, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    if args.command == "import":
        from llmstack.stages.export import import_hf

        print(f"wrote {import_hf(args.hf_dir, args.out, overwrite=args.overwrite)}")
        return 0
    if args.command == "generate":
        from llmstack.stages import generation

        generation.run(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                       seed=args.seed, tokenizer_path=args.tokenizer, use_cache=not args.no_cache,
                       chat=args.chat, system=args.system, device=args.device, dtype=args.dtype)
        return 0
    if args.command == "plan":
        from llmstack.stages import plan

        return plan.run(load_config(PretrainConfig, args.config, args.overrides), args.gpus, args.gpu_mem)
    if args.command == "preflight":
        from llmstack.distributed import preflight

        return preflight.run(args.hostfile, args.port)
    if args.command == "quickstart":
        from llmstack.stages import quickstart

        quickstart.run(out=args.out, steps=args.steps, scale=args.scale, pretrain_only=args.pretrain_only)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

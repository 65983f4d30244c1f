"""`llmstack` command line: subcommand dispatch only (the work is in llmstack/stages/).

Every command: `--help` explains it; a bad argument, a missing file or a bad config exits with
status 2 and one message, no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from llmstack.errors import UsageError

OVERRIDES_HELP = "dotted overrides, e.g. train.max_steps=200 zero.stage=3 (values parsed as YAML)"


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


def _config_cmd(sub, name: str, help_: str, description: str):
    p = sub.add_parser(name, help=help_, description=description)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config (and DeepSpeed config) and exit")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmstack",
        description="LLM pretraining and fine-tuning stack: tokenizer -> data -> pretrain (DeepSpeed ZeRO) -> ...",
        epilog="Multi-process: deepspeed --num_gpus N --module llmstack pretrain CONFIG ... "
        "or torchrun --nproc_per_node N -m llmstack pretrain CONFIG ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tok = sub.add_parser("tokenizer", help="train a tokenizer", description="Tokenizer commands.")
    tok_sub = tok.add_subparsers(dest="action", metavar="ACTION", required=True)
    _config_cmd(tok_sub, "train", "train a BPE / SentencePiece tokenizer from a config",
                "Train a byte-level BPE (tokenizers) or SentencePiece BPE/Unigram tokenizer and save it to "
                "tokenizer.path in a form transformers.AutoTokenizer loads.")

    _config_cmd(sub, "pretrain", "pretrain a GPT with DeepSpeed ZeRO",
                "Causal-LM pretraining. Trains the config's tokenizer first if it does not exist. Resumes from "
                "the newest complete checkpoint by default (train.resume=auto).")

    ck = sub.add_parser("checkpoint", help="checkpoint tools", description="Checkpoint tools.")
    ck_sub = ck.add_subparsers(dest="action", metavar="ACTION", required=True)
    cons = ck_sub.add_parser("consolidate", help="one fp32 model file from a checkpoint of any ZeRO stage",
                             description="Gather a (possibly ZeRO-partitioned) checkpoint into OUT/model.safetensors "
                             "plus OUT/llmstack_model.json (architecture, tokenizer hash, step).")
    cons.add_argument("checkpoint", help="step_N dir, checkpoints/latest, or a run directory")
    cons.add_argument("--out", required=True, help="output directory")
    rs = ck_sub.add_parser("reshape", help="make a ZeRO checkpoint resumable on any number of processes",
                           description="Convert a ZeRO 1-3 checkpoint to DeepSpeed's universal format, written "
                           "beside it as <step_N>_universal/. Resume on any world size with "
                           "train.resume=<that dir> (same global batch: micro_batch x grad_accum x world).")
    rs.add_argument("checkpoint", help="step_N dir, checkpoints/latest, or a run directory")
    rs.add_argument("--out", help="output directory (default: beside the checkpoint)")

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
                        description="Train a tiny tokenizer and a tiny GPT on the builtin corpus (the Python "
                        "standard library's docstrings and comments) and report validation loss against the "
                        "corpus's unigram entropy. A few minutes on a laptop CPU.")
    qs.add_argument("--out", default="runs/quickstart", help="output directory (default: %(default)s)")
    qs.add_argument("--steps", type=int, default=300, help="pretraining steps (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a fault: keep the traceback, and say which process it was
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise
        import socket
        import traceback

        traceback.print_exc()
        print(f"error: rank {os.environ.get('RANK')} on host {socket.gethostname()} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        # exit at once: a normal exit would wait in process-group teardown for peers that are
        # themselves waiting for this rank; the launcher then stops the others.
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
    if args.command == "pretrain":
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        from llmstack.stages import pretrain

        if args.dry_run:
            pretrain.dry_run(cfg)
            return 0
        pretrain.run(cfg)
        return 0
    if args.command == "checkpoint":
        from llmstack.train import checkpoint

        if args.action == "reshape":
            print(f"wrote {checkpoint.reshape(args.checkpoint, args.out)}")
        else:
            print(f"wrote {checkpoint.consolidate(args.checkpoint, args.out)}")
        return 0
    if args.command == "plan":
        from llmstack.stages import plan

        return plan.run(load_config(PretrainConfig, args.config, args.overrides), args.gpus, args.gpu_mem)
    if args.command == "preflight":
        from llmstack.dist import preflight

        return preflight.run(args.hostfile, args.port)
    if args.command == "quickstart":
        from llmstack.stages import quickstart

        quickstart.run(out=args.out, steps=args.steps)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

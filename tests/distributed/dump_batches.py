"""Test entry point: run the data pipeline as one rank of a real launch and dump what it sees.

    deepspeed --num_gpus 2 tests/distributed/dump_batches.py --out DIR --tokenizer TOK --source PATH=WEIGHT ...

Each rank writes DIR/rank<R>.npy: its input_ids rows in the order it consumed them (row n is
global position R_rank + n * world). With --save-after N the merged data state of all ranks
after N global batches goes to DIR/state.json; --state FILE resumes from such a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", action="append", required=True, help="PATH=WEIGHT")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-after", type=int)
    p.add_argument("--state")
    args, _ = p.parse_known_args()  # the deepspeed launcher appends --local_rank=N

    from data_pipeline.sources import resolve_source
    from data_pipeline.stream import Loader, StreamConfig, merge_states
    from data_pipeline.tokenizer import load_tokenizer
    from llmstack.distributed import env

    env.init("gloo", 120)
    rank, world = env.rank(), env.world_size()
    tok = load_tokenizer(args.tokenizer)
    sources = [resolve_source(path, weight=float(w)) for path, w in (s.rsplit("=", 1) for s in args.source)]
    state = json.loads(Path(args.state).read_text()) if args.state else None
    loader = Loader(sources, StreamConfig(seq_len=args.seq_len, streams=args.streams, seed=args.seed), tok.path,
                    tok.hash, micro_batch=args.global_batch // world, rank=rank, world=world,
                    num_workers=args.workers, state=state)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in range(args.batches):
        rows.append(next(loader)["input_ids"].numpy())
        if args.save_after == b + 1:
            merged = merge_states(env.all_gather_object(loader.state_dict()))
            if rank == 0:
                (out / "state.json").write_text(json.dumps(merged))
    np.save(out / f"rank{rank}.npy", np.concatenate(rows))
    env.exit_after_group(0)


if __name__ == "__main__":
    main()

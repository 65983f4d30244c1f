"""Test entry point: `llmstack ...` whose training loss turns NaN from one micro-batch on.

    python tests/distributed/nan_driver.py FIRST[:LAST] [RANK] -- pretrain CONFIG [key=value ...]
    deepspeed --num_gpus 2 tests/distributed/nan_driver.py 5:7 1 -- pretrain CONFIG [...]

The losses of this process's training micro-batches FIRST+1 .. LAST (1-based; to the end without
LAST) are multiplied by NaN, only on rank RANK when given: the way a bad batch or an overflow
shows up. The seam is this wrapper around the stage's loss function, not a switch in the loop.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
    split = args.index("--")
    first, _, last = args[0].partition(":")
    first, last, only_rank = int(first), int(last) if last else None, (int(args[1]) if split > 1 else None)

    from llmstack import cli
    from llmstack.stages import pretrain

    make_loss = pretrain.train_loss

    def train_loss(cfg):
        loss_fn, seen = make_loss(cfg), [0]

        def poisoned(engine, batch):
            loss = loss_fn(engine, batch)
            seen[0] += 1
            mine = only_rank is None or int(os.environ.get("RANK", 0)) == only_rank
            bad = first < seen[0] and (last is None or seen[0] <= last)
            return loss * float("nan") if mine and bad else loss
        return poisoned

    pretrain.train_loss = train_loss
    return cli.main(args[split + 1:])


if __name__ == "__main__":
    sys.exit(main())

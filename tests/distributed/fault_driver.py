"""Test entry point: `llmstack ...` with a fault injected through test-only seams.

    python tests/distributed/fault_driver.py --kill-in-save STEP -- pretrain CONFIG [key=value ...]
    deepspeed --num_gpus 2 tests/distributed/fault_driver.py --raise-at RANK:STEP -- pretrain CONFIG [...]

--raise-at RANK:STEP   rank RANK raises in step STEP (1-based): a Trainer callback installed in
                       trainer.EXTRA_CALLBACKS, to test that one failing rank takes the whole job
                       down promptly instead of leaving the others hanging in a collective.
--kill-in-save STEP    the process SIGKILLs itself while saving step STEP's checkpoint, after the
                       engine files are written and before meta.json (the write of meta.json is
                       wrapped), to test that a killed save never replaces the previous checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def main() -> int:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher's
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--raise-at")
    p.add_argument("--kill-in-save", type=int)
    args = p.parse_args(argv[:split])

    from llmstack import cli
    from llmstack.train import checkpoint, trainer

    if args.raise_at:
        rank, step = (int(x) for x in args.raise_at.split(":"))

        class RaiseAt(trainer.Callback):
            def on_step_start(self, tr, s: int) -> None:
                if s == step and int(os.environ.get("RANK", 0)) == rank:
                    raise RuntimeError(f"injected fault in step {s}")

        trainer.EXTRA_CALLBACKS.append(RaiseAt())
    if args.kill_in_save is not None:
        write = checkpoint._write_atomic

        def killing_write(path, text):
            if path.name == checkpoint.META and path.parent.name == f".tmp_step_{args.kill_in_save}":
                os.kill(os.getpid(), signal.SIGKILL)
            return write(path, text)

        checkpoint._write_atomic = killing_write
    return cli.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())

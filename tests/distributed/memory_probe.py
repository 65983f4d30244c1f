"""Measure the peak memory of a real `llmstack pretrain` run, from model construction until its
final checkpoint is written: the training steps and the final validation, not the checkpoint's
serialisation (not a training step). Runs in one process or under the deepspeed launcher (each
rank prints its own line).

Two measures, each as an increase over a baseline taken just before the model is built, so that
the interpreter, torch, DeepSpeed, the tokenizer and the corpus cache are not counted:
- heap: bytes in use by malloc (glibc's mallinfo2: arena + mmap'd blocks, where torch's CPU
  tensors live), sampled by a thread every half millisecond. CPU torch has no allocator
  statistics like CUDA's max_memory_allocated; this is the closest thing. (The main arena: other
  threads' arenas are not seen, and training allocates its tensors on the main thread.)
- rss: the kernel's resident-set high-water mark (VmHWM, reset at the baseline through
  /proc/self/clear_refs), so no transient escapes it; it also counts freed memory malloc has
  not returned to the system, and library pages first touched during training.
Also the heap at each phase (after the model, after the engine, and the peak inside each
forward, backward and optimizer step), so a mismatch with the planner can be located.
Prints one JSON line: {"peak_bytes": heap peak, "rss_peak_bytes": ..., "phases": {...}}.
Usage: python tests/distributed/memory_probe.py CONFIG [key=value ...]
"""

import ctypes
import json
import os
import sys
import threading
import time

libc = ctypes.CDLL("libc.so.6")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def main() -> None:
    import deepspeed.runtime.engine as ds_engine

    from llmstack.config import PretrainConfig, load_config
    from llmstack.stages import common, pretrain
    from llmstack.train import trainer as trainer_mod

    state = {"base": None, "peak": 0, "window": 0, "stop": False, "rss_base": 0, "rss_ok": False}
    phases: dict[str, int] = {}

    def sample():
        while not state["stop"]:
            if state["base"] is not None:
                h = heap_in_use()
                state["peak"] = max(state["peak"], h)
                state["window"] = max(state["window"], h)
            time.sleep(0.0005)

    steps = {"n": 0}

    def record(name: str, value: int) -> None:
        phases[name] = max(phases.get(name, 0), value - state["base"])

    build = common.build_model

    def measured_build(*args, **kwargs):
        state["rss_ok"] = reset_rss_peak()
        state["rss_base"] = _status_kb("VmRSS")
        state["base"] = heap_in_use()
        model = build(*args, **kwargs)
        record("model", heap_in_use())
        return model

    engine_of = common.train_engine

    def measured_engine(*args, **kwargs):
        engine = engine_of(*args, **kwargs)
        record("engine", heap_in_use())
        return engine

    def windowed(name, fn):
        def wrapper(*args, **kwargs):
            if state["base"] is None or state["stop"]:
                return fn(*args, **kwargs)
            state["window"] = heap_in_use()
            out = fn(*args, **kwargs)
            n = steps["n"] + 1  # 1-based index of the optimizer step this call belongs to
            record(f"{name}{n}", max(state["window"], heap_in_use()))
            record(f"after_{name}{n}", heap_in_use())
            if name == "step":
                steps["n"] = n
            return out
        return wrapper

    cls = ds_engine.DeepSpeedEngine
    cls.forward = windowed("forward", cls.forward)
    cls.backward = windowed("backward", cls.backward)
    cls.step = windowed("step", cls.step)
    save = trainer_mod.Checkpointer.save

    def stop_then_save(self, *args, **kwargs):
        if not state["stop"]:
            state["stop"] = True
            state["rss_peak"] = _status_kb("VmHWM")
        return save(self, *args, **kwargs)

    trainer_mod.Checkpointer.save = stop_then_save
    common.build_model, common.train_engine = measured_build, measured_engine
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # (added by the deepspeed launcher)
    pretrain.run(load_config(PretrainConfig, args[0], args[1:]))
    if not state["stop"]:
        state["rss_peak"] = _status_kb("VmHWM")
    state["stop"] = True
    thread.join()
    out = {"peak_bytes": state["peak"] - state["base"], "phases": phases}
    if state["rss_ok"]:
        out["rss_peak_bytes"] = state["rss_peak"] - state["rss_base"]
    # one write() of the whole line: the deepspeed launcher runs ranks with `python -u`, where print
    # writes the text and its newline separately and two ranks' lines can interleave in the pipe
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps(out) + "\n").encode())
    # leave as the CLI does after a multi-process run: a gloo teardown abort at interpreter exit
    # would otherwise kill a rank (and, unflushed, its line) now and then
    from llmstack.distributed import env

    env.exit_after_group(0)


if __name__ == "__main__":
    main()

"""Measure the peak heap memory of a real `llmstack pretrain` run, from model construction on.

CPU has no allocator statistics like CUDA's max_memory_allocated, so a thread samples glibc's
mallinfo2 (bytes in use: arena + mmap'd blocks, which is where torch's CPU tensors live) every
half millisecond. The baseline is taken as the model starts being built, so imports, the
tokenizer and the corpus cache are not counted. Prints one JSON line: {"peak_bytes": ...}.
Usage: python tests/distributed/memory_probe.py CONFIG [key=value ...]
"""

import ctypes
import json
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


def main() -> None:
    from llmstack.config import PretrainConfig, load_config
    from llmstack.stages import common, pretrain

    state = {"base": None, "peak": 0, "stop": False}

    def sample():
        while not state["stop"]:
            if state["base"] is not None:
                state["peak"] = max(state["peak"], heap_in_use())
            time.sleep(0.0005)

    build = common.build_model

    def measured_build(*args, **kwargs):
        state["base"] = heap_in_use()
        return build(*args, **kwargs)

    common.build_model = measured_build
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    pretrain.run(load_config(PretrainConfig, sys.argv[1], sys.argv[2:]))
    state["stop"] = True
    thread.join()
    print(json.dumps({"peak_bytes": state["peak"] - state["base"]}))


if __name__ == "__main__":
    main()

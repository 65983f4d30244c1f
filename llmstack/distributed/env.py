"""Process-group facts every stage needs: rank, world, device, print0, barrier, reductions.

Works the same under the `deepspeed` launcher, `torchrun`, or a plain single process (where we
fill in the rendezvous variables ourselves so DeepSpeed can still build an engine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from llmstack.errors import RankError, UsageError

# How long the other ranks wait for rank 0's work in rank0_first (training a tokenizer on a real
# corpus, building a cache). This is a wait on the store, not a collective, so dist.timeout_s
# (which bounds collectives and would end the job) does not apply to it.
RANK0_WAIT_S = 24 * 3600
# How long a failed rank 0 waits for the others to read its error before it exits: under the
# deepspeed launcher rank 0's process hosts the store they read it from.
RANK0_ERROR_READ_S = 30.0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE, the deepspeed
    launcher's LOCAL_SIZE, else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM's cpusets), lowered to a
    cgroup CPU quota where one is set (containers): os.cpu_count() counts the whole machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota() -> int | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, v1 cfs_quota_us / cfs_period_us), rounded
    up; None when unlimited or unknown."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else -(-int(quota) // int(period))
    with contextlib.suppress(OSError, ValueError):
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else -(-quota // period)
    return None


def cores_per_process(cores: int | None = None, local_world: int | None = None) -> int:
    """This process's share of the machine's cores: cores / local processes, at least 1
    (the same rule launch/*.sh use for OMP_NUM_THREADS)."""
    cores = available_cores() if cores is None else cores
    local_world = local_world_size() if local_world is None else local_world
    return max(1, cores // max(1, local_world))


def set_host_threads(environ=os.environ) -> int | None:
    """Give this process its share of the cores as compute threads when the user did not choose.

    With OMP_NUM_THREADS unset, torch (and the OpenMP runtime of DeepSpeed's CPU Adam, used for
    zero.offload_optimizer) start one thread per core in *every* process, so N local ranks
    oversubscribe the CPU N times; one thread each starves CPU Adam instead. Several local
    processes get cores / local processes threads each (set in the environment too, for OpenMP
    runtimes loaded later); a process alone keeps torch's default. OMP_NUM_THREADS, when set
    (the launch scripts set it, and torchrun sets 1 when it is unset), is left as it is.
    Returns the number set, or None."""
    if environ.get("OMP_NUM_THREADS") or local_world_size() <= 1:
        return None
    n = cores_per_process()
    environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def to_device(batch: dict, dev: torch.device | None = None) -> dict:
    """A batch of CPU tensors on this rank's device. On CUDA each tensor is first put in pinned
    (page-locked) host memory, so the copy is an asynchronous DMA (non_blocking) and the host
    goes on to make the next micro-batch meanwhile; from pageable memory the copy would make the
    host wait. The caching host allocator keeps a pinned buffer until its copy is done."""
    dev = device() if dev is None else dev
    if dev.type != "cuda":
        return {k: v.to(dev) for k, v in batch.items()}
    return {k: (v if v.is_pinned() else v.pin_memory()).to(dev, non_blocking=True) for k, v in batch.items()}


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only (flushes, so launcher logs interleave sensibly)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str = "auto", timeout_s: int = 600) -> None:
    """Join (or, alone, create) the process group. Idempotent.

    A single process without a launcher gets RANK=0/WORLD_SIZE=1 and a free local port. The
    timeout bounds init and every collective, so a dead peer ends the job instead of hanging it.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    set_host_threads()  # before any compute, and before DeepSpeed's CPU Adam loads its OpenMP runtime
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    # DeepSpeed calls torch collectives that torch marks deprecated: one warning per call and rank
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import deepspeed  # deferred: importing deepspeed costs seconds and logs noise

    from llmstack.distributed import watchdog

    watchdog.default_group_timeout(timedelta(seconds=timeout_s))  # DeepSpeed's groups too (see watchdog.py)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    if world_size() > 1:
        watchdog.start(timeout_s)  # a rank that stops answering ends the job, named (see watchdog.py)
        barrier()  # every rank has now mapped every peer's shared-memory buffer (see below)
        release_shm_buffer()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_rank0_first_calls = 0  # every rank enters the same rank0_first blocks in the same order


@contextlib.contextmanager
def rank0_first(what: str = "running its part", wait_s: float = RANK0_WAIT_S):
    """Rank 0 runs the block first (e.g. to build a cache or train a tokenizer), then the others run it.

    The others wait on a key of the process group's store (TCPStore), not in a barrier: a
    collective ends the job after dist.timeout_s, and rank 0's work may take longer (hours, for a
    tokenizer trained on a real corpus); they wait up to `wait_s`. Rank 0 sets the key to "ok"
    when its block succeeded, else to its error, which the others raise (RankError: exit 2, the
    message names rank 0's failure) instead of running the block. `what` names the work in it.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    global _rank0_first_calls
    _rank0_first_calls += 1
    key = f"llmstack/rank0_first/{_rank0_first_calls}"
    store = dist.distributed_c10d._get_default_store()
    if is_main():
        try:
            yield
        except BaseException as e:
            user = isinstance(e, UsageError)
            store.set(key, "failed: " + (str(e) if user else f"{type(e).__name__}: {e}"))
            _wait_read(store, key)
            if user and not getattr(e, "every_rank", False):
                raise RankError(str(e)) from None  # exit 2 at once, as the others do
            raise
        store.set(key, "ok")
        return
    t0 = time.monotonic()
    try:
        store.wait([key], timedelta(seconds=wait_s))
        status = store.get(key).decode()
    except dist.DistError as e:
        if time.monotonic() - t0 >= wait_s:
            raise RankError(f"rank {rank()} waited {wait_s:.0f} s for rank 0 {what}; giving up") from None
        raise RankError(f"rank {rank()} lost rank 0 while it was {what} (its process ended or its host is "
                        f"unreachable: {e}); rank 0's output says why") from None
    if status != "ok":
        store.add(key + "/read", 1)
        raise RankError(f"rank 0 failed {what}: {status.removeprefix('failed: ')}")
    yield


def _wait_read(store, key: str) -> None:
    """Rank 0, failed: wait (briefly) until every other rank has read its error. They print it
    (it is in their message) and exit at once; polling often lets rank 0 print its own before
    the launcher, seeing their exit, stops it."""
    deadline = time.monotonic() + RANK0_ERROR_READ_S
    with contextlib.suppress(Exception):
        while store.add(key + "/read", 0) < world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.01)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a no-op alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj):
    """rank 0's Python object, on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order, on every rank (a one-element list alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def hostname() -> str:
    return socket.gethostname()


def shutdown() -> None:
    """Tear the process group down after a successful command: every rank waits for the others,
    then destroys it. Left to interpreter exit, the backend's worker threads can be destroyed
    while still joinable, which aborts the process ("terminate called without an active
    exception") after all work is done and turns a finished run into a failed one. Commands
    end with :func:`exit_after_group`, which calls this and then skips finalization too."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            barrier()
        from llmstack.distributed import watchdog

        watchdog.stop()  # after the barrier: a peer still working must not take this rank for lost
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def exit_after_group(rc: int) -> None:
    """End a process that ran a process group: tear the group down (:func:`shutdown`), flush
    every output buffer, and leave without interpreter finalization (returns only when no group
    was started). A finished 2-process gloo run aborted at exit in CI ("terminate called without
    an active exception") although :func:`shutdown` had destroyed the group; finalization, where
    Python destroys whatever still holds the backend's objects, is the phase left where that can
    happen. Callers have closed and fsynced everything they write before this point."""
    if not dist.is_initialized():
        return
    import ctypes
    import logging

    shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)  # C-level stdio buffers (extensions that print)
    os._exit(rc)


# DeepSpeed's CPU communication op (all ranks on one machine) gives each rank a ~69 MB POSIX
# shared-memory file named after the rendezvous address, port and rank, and never unlinks it:
# every multi-process CPU run would leave them in /dev/shm (RAM) until the machine fills up.
# Once every rank has mapped every peer's file (init_distributed returns after that), the names
# are unlinked; the mappings stay valid and the memory is freed when the last process exits,
# however it exits (a killed rank included).
SHM_DIR = Path("/dev/shm")


def shm_buffer_path(rank: int | None = None) -> Path:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer() -> None:
    """Unlink this rank's buffer. Peers keep their mappings (unlinking removes only the name), but
    one still waiting to open it would wait forever: call only after a barrier that follows
    init_distributed."""
    if world_size() > 1:
        with contextlib.suppress(OSError):
            shm_buffer_path().unlink()

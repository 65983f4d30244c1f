"""Hung and lost ranks: collective timeouts that fire, and a heartbeat that names the silent rank.

A job whose rank stops answering (a stopped or swapped-out process, a hung host, a lost network
link) must end within dist.timeout_s with a message saying which rank it was, not wait forever.
Two pieces make that so:

1. **Every process group gets dist.timeout_s.** torch gives a group made by ``new_group()``
   without a timeout the library default (30 minutes for gloo, 10 for NCCL), not the timeout
   passed to ``init_process_group``; DeepSpeed makes its data-parallel groups that way, so the
   gradient all-reduce of a ZeRO run waited 30 minutes for a stopped peer whatever
   dist.timeout_s said. :func:`default_group_timeout` (called by ``env.init`` before DeepSpeed
   starts) sets the default for every later group. (DeepSpeed's CPU shared-memory all-reduce,
   which waits on memory flags with no timeout, is used only by its inference kernels, never by
   training.)
2. **A heartbeat.** A thread of each rank adds 1 to its counter in the rendezvous store every
   ``period`` seconds and reads the counters of its ring neighbours (ranks r-1 and r+1: two
   reads per rank and period at any world size). A neighbour whose counter has not moved for
   dist.timeout_s has stopped answering (stopped, dead, or cut off from the store): the thread
   ends this process with one message naming that rank, its host and process id. When a
   collective raises first (its timeout fired, or a peer's connection dropped), the command
   line's error handler calls :func:`collective_failed`, which reports the same way, naming the
   silent ranks (a scan of every counter when the neighbours are not the culprits) or saying
   that every rank still answers (then one is stuck outside the collective).

A silent rank that runs on this host is ended too (SIGKILL, after checking that its process id
still names the same process): a stopped process does not act on the launcher's SIGTERM, and the
launchers (deepspeed, torchrun) wait 30 s before their SIGKILL, so the job would outlive its
timeout by that much.

Counters are compared on this process's own clock, so clocks of different hosts never meet. The
thread talks to the store over its own connection (``Store.clone``): the main thread may wait on
the store for hours (``env.rank0_first``), and that must not hold up the heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

KEY = "llmstack/heartbeat/"
EXIT_CODE = 1  # a fault, not bad input: the job's status is the launcher's non-zero exit

_watchdog: Watchdog | None = None
_ending = threading.Lock()  # the first of the heartbeat thread and the error handler reports; the other waits


def default_group_timeout(timeout: timedelta) -> None:
    """Make process groups created later without an explicit timeout (DeepSpeed's) use `timeout`.

    torch reads these module defaults each time ``new_group`` gets no timeout; there is no public
    setting for them.
    """
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3


def _identity() -> dict:
    """What tells this process apart from any other: host, boot, process id and start time."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return {"host": socket.gethostname(), "boot": boot, "pid": os.getpid(), "start": _start_time(os.getpid())}


class Watchdog:
    """This rank's heartbeat and its watch over its ring neighbours (see the module docstring)."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, float(timeout_s)
        # a silent peer is noticed between timeout_s and timeout_s + 2 periods after its last beat
        self.period = min(max(self.timeout_s / 8, 0.5), 15.0)
        self.store.set_timeout(timedelta(seconds=max(self.period, 2.0)))
        self.watched = sorted({(rank - 1) % world, (rank + 1) % world} - {rank})
        now = time.monotonic()
        self.seen = {p: (None, now) for p in self.watched}  # peer -> (counter, when it last moved)
        self.store_ok = now
        self.info: dict[int, dict] = {}
        self.me = _identity()
        self.store.set(f"{KEY}info/{rank}", json.dumps(self.me))
        self.store.add(f"{KEY}{rank}", 1)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmstack-heartbeat", daemon=True)

    def _read(self, peers: list[int]) -> list[int]:
        return [self.store.add(f"{KEY}{p}", 0) for p in peers]  # add 0: a read that never blocks

    def _poll(self) -> None:
        self.store.add(f"{KEY}{self.rank}", 1)
        values = self._read(self.watched)
        now = self.store_ok = time.monotonic()
        for p, v in zip(self.watched, values):
            if v != self.seen[p][0]:
                self.seen[p] = (v, now)
        for p in self.watched:
            if p not in self.info:  # kept for the report: the store may be gone by then
                with contextlib.suppress(Exception):
                    self.info[p] = json.loads(self.store.get(f"{KEY}info/{p}"))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):  # the store did not answer in time: counted below
                self._poll()
            now = time.monotonic()
            silent = {p: now - t for p, (_, t) in self.seen.items() if now - t > self.timeout_s}
            lost = now - self.store_ok > self.timeout_s
            if (silent or lost) and not self._stop.is_set():
                _end(self, "", silent, lost)

    def silent_peers(self) -> tuple[dict[int, float], bool]:
        """(rank -> seconds silent, store lost) after a collective failed. A neighbour silent for
        several periods is named at once; otherwise the counters of the neighbours (of every rank
        in a larger job) are read twice, 1.5 periods (at least 3 s) apart, and those that did not move are the
        silent ones (a peer whose process just died has not been silent for long yet)."""
        now = time.monotonic()
        silent = {p: now - t for p, (_, t) in self.seen.items() if now - t > 3 * self.period}
        if silent:
            return silent, False
        others = self.watched if self.world <= 3 else [p for p in range(self.world) if p != self.rank]
        try:
            before = self._read(others)
            # at least 3 s: a peer that stopped with exit 2 (bad input) should be the status the
            # launcher reports, so this rank leaves after it (as the command line's grace does)
            time.sleep(max(1.5 * self.period + 0.2, 3.0))
            after = self._read(others)
        except Exception:  # the store did not answer
            return {}, True
        now = time.monotonic()
        return {p: now - self.seen.get(p, (None, now - 1.5 * self.period))[1]
                for p, a, b in zip(others, before, after) if a == b}, False

    def stop(self) -> None:
        self._stop.set()


def _describe(wd: Watchdog, p: int, seconds: float) -> str:
    info = wd.info.get(p, {})
    where = f" (pid {info['pid']} on host {info['host']})" if info else ""
    text = f"rank {p}{where} stopped answering: no heartbeat for {seconds:.0f} s"
    same_process = (info and info.get("host") == wd.me["host"] and info.get("boot") == wd.me["boot"]
                    and info.get("start") is not None and _start_time(info["pid"]) == info["start"])
    if same_process:
        try:
            os.kill(info["pid"], signal.SIGKILL)
            text += "; ended it (SIGKILL)"
        except OSError:
            pass
    return text


def _end(wd: Watchdog, why: str, silent: dict[int, float], store_lost: bool) -> None:
    """Report the silent ranks (ending those on this host), then end this process."""
    with _ending:
        lines = [_describe(wd, p, s) for p, s in sorted(silent.items())]
        if store_lost:
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            lines.append(f"the rendezvous store at {addr} stopped answering for over {wd.timeout_s:.0f} s (it runs in "
                         "rank 0's process under the deepspeed launcher, in the agent under torchrun): that process "
                         "is stopped or gone, or its host is unreachable")
        if not lines:
            lines.append("every other rank still answers, so one of them is stuck outside the collective (a hang in "
                         "its own code or I/O) or the ranks called different collectives")
        print(f"error: rank {wd.rank} on host {wd.me['host']}: {why + ': ' if why else ''}" + "; ".join(lines)
              + f" (dist.timeout_s={wd.timeout_s:.0f}); ending the job", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


def start(timeout_s: float) -> None:
    """Start this rank's heartbeat (every rank of a multi-process group, once, after init)."""
    global _watchdog
    if _watchdog is not None or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    store = dist.distributed_c10d._get_default_store().clone()
    _watchdog = Watchdog(store, dist.get_rank(), dist.get_world_size(), timeout_s)
    _watchdog.thread.start()


def stop() -> None:
    """Stop the heartbeat (before the group is torn down at a normal end: peers that outlive this
    rank by more than dist.timeout_s would otherwise take it for a lost one)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def is_collective_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer's connection (gloo and NCCL wordings)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("gloo/", "Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                            "NCCL communicator was aborted"))


def collective_failed(err: BaseException) -> None:
    """Called with an error raised in the main thread: when it is a failed collective and the
    heartbeat runs, report the ranks that stopped answering and end the process (no return).
    Otherwise return, and the caller reports the error as it would."""
    wd = _watchdog
    if wd is None or not is_collective_failure(err):
        return
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "timed out" in first.lower():
        why = "a collective timed out"
    else:
        why = f"a collective failed ({first[:200]})"
    silent, store_lost = wd.silent_peers()
    _end(wd, why, silent, store_lost)

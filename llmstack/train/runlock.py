"""One run per run directory: `run.dir/run.lock`, held by rank 0 for the life of the run.

Two runs on one run directory interleave their checkpoints, `latest` pointer and metrics, and
one's keep_last cleanup deletes the other's checkpoints. The lock is an exclusive `flock`, which
the kernel (or a network filesystem's lock manager) releases when the process ends however it
ends, so a killed run's lock is simply taken over; the file records the holder (host, pid, start
time, command) for the message a second run gets, and for filesystems without flock.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from llmstack.distributed import env
from llmstack.errors import UsageError

LOCK_FILE = "run.lock"
# Run directories whose lock this process holds: resolved path -> open file descriptor.
_held_locks: dict[Path, int] = {}
# How long to wait for a lock whose recorded holder has ended (processes it started, such as
# data loader workers, hold the lock until they notice and exit too).
LOCK_ORPHAN_WAIT_S = 15.0


def lock_run_dir(run_dir: Path) -> None:
    """Keep other runs off `run_dir` while this process lives: rank 0 takes run_dir/run.lock
    (one lock per job, whatever its number of processes) and every rank learns the outcome, so a
    second run on the same run directory exits 2 on every rank with a message naming the holder.

    The lock is an exclusive `flock` on run.lock, which records the holder's host, pid, start
    time and command. The kernel (or the network filesystem's lock manager) drops it when the
    process ends however it ends, so the lock of a killed run is simply taken over. On a
    filesystem without flock the record decides: a holder on this host whose process is gone is
    taken over; one on another host cannot be checked from here, which the message says.
    """
    error = None
    if env.is_main():
        try:
            _acquire(Path(run_dir))
        except UsageError as e:
            error = str(e)
    error = env.broadcast_object(error)
    if error:
        raise UsageError(error)


def _acquire(run_dir: Path) -> None:
    key = run_dir.resolve()
    if key in _held_locks:
        return
    release_run_lock()  # a process runs one training at a time (the quickstart runs its stages in turn)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot create the run directory's lock file {path}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_ORPHAN_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                if _holder_alive(holder) is False and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise UsageError(_in_use(run_dir, path, holder, locked=True)) from None
            except OSError:  # no flock on this filesystem: judge by the record
                holder = _lock_holder(fd)
                if holder and _holder_alive(holder) is not False:
                    raise UsageError(_in_use(run_dir, path, holder, locked=False)) from None
                break
        record = {"host": env.hostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:1000],
                  "world_size": env.world_size()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    if not _held_locks:
        atexit.register(release_run_lock)  # registering twice is harmless: release is idempotent
    _held_locks[key] = fd


def release_run_lock() -> None:
    """Give up the run-directory locks this process holds (empties run.lock). Also done by the
    kernel when the process ends; this is for a process that goes on to other work."""
    for key, fd in list(_held_locks.items()):
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)
            del _held_locks[key]


def _lock_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22), which tells a
    reused pid apart; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _holder_alive(holder: dict) -> bool | None:
    """Whether the recorded lock holder still runs: None when it ran on another host."""
    if not holder:
        return False
    if holder.get("host") != env.hostname():
        return None
    try:
        pid = int(holder.get("pid"))
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: alive
        pass
    start = _proc_start(pid)
    return not (holder.get("start") and start and start != holder["start"])


def _in_use(run_dir: Path, path: Path, holder: dict, *, locked: bool) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
           f" (`{holder.get('command', '?')}`)" if holder else "a process that has not recorded itself yet")
    msg = (f"run.dir {run_dir} is in use by another run: {who}. Two runs on one run directory would overwrite "
           "each other's checkpoints and metrics; wait for it to end, stop it, or start a separate run with its own "
           "name, run.name=NEW_NAME (or run.dir=DIR)")
    alive = _holder_alive(holder)
    if locked and alive is False:
        msg += (f". That process has ended, but a process it started still holds the lock on {path} "
                f"(see `fuser {path}`)")
    elif not locked and alive is None:
        msg += (f". This filesystem has no file locks and host {holder.get('host')} is not this one, so whether "
                f"that run still goes on cannot be checked from here: if it has ended, delete {path}")
    return msg

"""The run directory lock (train/runlock.py): one run per run dir, a dead holder's lock taken over.

Two real `llmstack pretrain` runs on one run directory are in tests/distributed/test_checkpoint_faults.py;
here the lock is exercised directly, with holders in other processes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmstack.distributed import env
from llmstack.errors import UsageError
from llmstack.train import runlock
from tests.conftest import child_env

HOLD = """
import sys, time
from pathlib import Path
from llmstack.train import runlock
runlock.lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture(autouse=True)
def release():
    yield
    runlock.release_run_lock()


def holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def record(run_dir) -> dict:
    return json.loads((run_dir / runlock.LOCK_FILE).read_text())


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = holder(run_dir)
    try:
        assert record(run_dir)["pid"] == first.pid and record(run_dir)["host"] == env.hostname()
        with pytest.raises(UsageError, match=rf"run.dir {run_dir} is in use by another run: pid {first.pid} on host "):
            runlock.lock_run_dir(run_dir)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    runlock.lock_run_dir(run_dir)  # the kernel dropped the killed process's flock
    assert record(run_dir)["pid"] != first.pid
    runlock.lock_run_dir(run_dir)  # this process holds it: taking it again is a no-op


def test_lock_is_released_for_the_next_run(tmp_path):
    runlock.lock_run_dir(tmp_path / "a")
    runlock.lock_run_dir(tmp_path / "b")  # one run at a time per process: a's lock is given up
    assert (tmp_path / "a" / runlock.LOCK_FILE).read_text() == ""
    proc = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", ""), str(tmp_path / "a")],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0 and "locked" in proc.stdout, proc.stderr


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """Filesystems without flock: a dead holder on this host is taken over, a live one refused,
    and one on another host refused with a message saying it cannot be checked."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / runlock.LOCK_FILE
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock.write_text(json.dumps({"host": env.hostname(), "pid": ended.pid, "since": "earlier"}))
    runlock.lock_run_dir(run_dir)
    assert record(run_dir)["pid"] != ended.pid
    runlock.release_run_lock()

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": env.hostname(), "pid": alive.pid, "since": "earlier"}))
        with pytest.raises(UsageError, match=f"in use by another run: pid {alive.pid}"):
            runlock.lock_run_dir(run_dir)
    finally:
        alive.kill()
        alive.wait()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "earlier"}))
    with pytest.raises(UsageError, match=f"host elsewhere is not this one, so whether that run still goes on cannot "
                                         f"be checked from here: if it has ended, delete {lock}"):
        runlock.lock_run_dir(run_dir)


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    me = runlock._proc_start(os.getpid())
    assert me is not None
    # this very pid, but a process that started at another time: the recorded holder is gone
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({"host": env.hostname(), "pid": os.getpid(), "start": "1"}))
    runlock.lock_run_dir(run_dir)
    assert record(run_dir)["start"] == me


def test_waits_for_processes_left_by_a_dead_holder(tmp_path, monkeypatch):
    """A flock still held although the recorded holder has ended (its data workers hold the
    inherited descriptor) is waited for briefly, then refused with a message that says so."""
    run_dir = tmp_path / "run"
    first = holder(run_dir)
    monkeypatch.setattr(runlock, "LOCK_ORPHAN_WAIT_S", 1.0)
    rec = record(run_dir)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (run_dir / runlock.LOCK_FILE).write_text(json.dumps({**rec, "pid": ended.pid}))
    try:
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="That process has ended, but a process it started still holds the lock"):
            runlock.lock_run_dir(run_dir)
        assert time.monotonic() - t0 >= 1.0
    finally:
        first.kill()
        first.wait()

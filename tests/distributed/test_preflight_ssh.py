"""Preflight's ssh command: a hostfile name is never an ssh option, the remote command is quoted."""

from __future__ import annotations

import shlex
import sys

import pytest

from llmstack.distributed.preflight import parse_hostfile, probe_argv
from llmstack.errors import UsageError


def test_remote_host_comes_after_double_dash():
    argv = probe_argv("gpu-07", 29500)
    assert argv[0] == "ssh"
    i = argv.index("--")
    assert argv[i + 1] == "gpu-07" and all(not a.startswith("gpu-07") for a in argv[:i])
    # what ssh hands to the remote shell: one quoted string that splits back into our command
    assert shlex.split(argv[i + 2]) == [sys.executable, "-m", "llmstack.distributed.preflight", "--probe", "29500"]
    assert len(argv) == i + 3


def test_local_host_runs_without_ssh():
    assert probe_argv("localhost", 29500)[0] == sys.executable


def test_option_like_host_is_refused():
    with pytest.raises(UsageError, match="not a host name"):
        probe_argv("-oProxyCommand=touch /tmp/x", 29500)


@pytest.mark.parametrize("host", ["-oProxyCommand=sh", "-F/tmp/cfg", "a;b", "$(id)"])
def test_hostfile_refuses_names_that_are_not_hosts(tmp_path, host):
    f = tmp_path / "hostfile"
    f.write_text(f"node1 slots=8\n{host} slots=8\n")
    with pytest.raises(UsageError, match=r"hostfile:2: .* is not a host name"):
        parse_hostfile(f)


def test_hostfile_accepts_usual_names(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("gpu-01 slots=8\nuser@10.0.0.2 slots=8\nnode_3.cluster.local slots=4\n[::1] slots=1\n")
    assert [h for h, _ in parse_hostfile(f)] == ["gpu-01", "user@10.0.0.2", "node_3.cluster.local", "[::1]"]

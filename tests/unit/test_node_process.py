"""Children die with their parent: the lifeline pipe, and pid helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lepton_ai.node.process import Lifeline, kill_pid, pid_alive

CHILD = (
    "import time\n"
    "from lepton_ai.node.process import watch_parent\n"
    "watch_parent()\n"
    "print('armed', flush=True)\n"
    "time.sleep(60)\n"
)


def test_lifeline_cut_makes_the_child_exit() -> None:
    line = Lifeline()
    env = dict(os.environ, **line.child_env())
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        pass_fds=(line.read_fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    line.after_spawn()
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "armed"
        assert pid_alive(child.pid)
        t0 = time.monotonic()
        line.cut()
        assert child.wait(10) == 1
        assert time.monotonic() - t0 < 5
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not pid_alive(child.pid)
    assert not kill_pid(child.pid)


def test_advertised_address_is_never_a_wildcard() -> None:
    """A listener bound to 0.0.0.0 advertises this host's address toward a peer (never
    0.0.0.0, which a remote peer cannot dial); ``--advertise`` wins, with or without
    a port."""
    import socket

    from lepton_ai.node.node_net import advertised_address, local_ip_toward

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))  # bound, never listening: nothing is exposed
        port = sock.getsockname()[1]
        assert advertised_address(sock, None, "127.0.0.1") == f"127.0.0.1:{port}"
        assert not advertised_address(sock, None, None).startswith("0.0.0.0")
        assert advertised_address(sock, "h1.example", None) == f"h1.example:{port}"
        assert advertised_address(sock, "10.0.0.5:7400", None) == "10.0.0.5:7400"
        with pytest.raises(ValueError, match="HOST:PORT"):
            advertised_address(sock, "h1:notaport", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert advertised_address(sock, None, "10.1.2.3").startswith("127.0.0.1:")
    assert local_ip_toward("127.0.0.1") == "127.0.0.1"

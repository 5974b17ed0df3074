"""Children die with their parent: the lifeline pipe, and pid helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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

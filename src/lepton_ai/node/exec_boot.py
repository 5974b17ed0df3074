"""Start-up of an executor process: say hello first, import later.

The agent counts a slot ready when its executor says hello. Interpreter start-up
is cheap; importing msgspec, the plan and task machinery is not. So this
module, with nothing but the standard library, sends a hand-encoded hello (the
MessagePack of ``messages.ExecHello(pid)``, checked by a unit test) and only
then imports ``executor`` - while the first task is still on its way.
"""

from __future__ import annotations

import os
import socket
import struct

FD_ENV = "LEPTON_EXEC_FD"
_TAG = b"\xa4type\xa9ExecHello\xa3pid"


def hello_frame(pid: int) -> bytes:
    """A length-prefixed frame holding ``ExecHello(pid)`` as msgspec would encode it."""
    if not 0 <= pid < 2**32:
        raise ValueError(f"pid out of range: {pid}")
    body = b"\x82" + _TAG + (b"\xce" + struct.pack(">I", pid) if pid > 127 else bytes([pid]))
    return struct.pack(">I", len(body)) + body


def main() -> None:
    from lepton_ai.node.process import watch_parent

    watch_parent()
    sock = socket.socket(fileno=int(os.environ[FD_ENV]))
    try:
        sock.sendall(hello_frame(os.getpid()))
    except OSError:
        # The agent closed us while we started (a spare or replacement no longer
        # wanted, or the node is stopping): nobody is listening, leave quietly.
        os._exit(0)
    from lepton_ai.node.executor_process import run_executor

    run_executor(sock)


if __name__ == "__main__":
    main()

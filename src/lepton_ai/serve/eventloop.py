"""The serving layer's event loop: uvloop's when it is installed, else asyncio's.

uvicorn makes the same choice for the replicas (``loop="auto"``). The balancer
and the load generator are all sockets and callbacks, where libuv's loop and
transports cost a fraction of the pure-Python selector loop's CPU per request;
without uvloop everything still works, only slower.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on ``new_event_loop()``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

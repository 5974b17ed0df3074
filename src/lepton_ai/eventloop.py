"""The event loop of every lepton process: uvloop's when it is installed, else asyncio's.

uvicorn makes the same choice for the model replicas (``loop="auto"``). The
coordinators, worker agents, balancer and load generator are all sockets and
callbacks, where libuv's loop and transports cost a fraction of the pure-Python
selector loop's CPU per message (coordinators and agents: about a third less CPU
per task); without uvloop everything still works, only slower. ``LEPTON_UVLOOP=0``
forces asyncio's loop (A/B measurements, debugging).

One difference matters to callers: uvloop raises ``RuntimeError`` on a write to a
closed transport where asyncio's loop drops it, so writers check ``is_closing()``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's ``new_event_loop``, or None for asyncio's default."""
    if os.environ.get("LEPTON_UVLOOP", "1") == "0":
        return None
    try:
        # Imported by name: type checking must not require it (no uvloop on Windows).
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    factory = loop_factory()
    return factory() if factory is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on ``new_event_loop()``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

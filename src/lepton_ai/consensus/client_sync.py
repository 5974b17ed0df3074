"""The synchronous KV handle ``KV`` (what ``cluster.kv`` returns).

It runs an asyncio ``client.KvClient`` on a private event-loop thread that it owns and
stops in ``close`` (or at interpreter exit), so plain scripts and code inside other
event loops can use the replicated KV without an event loop of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from lepton_ai.consensus.client import KvClient, KvClientConfig
from lepton_ai.consensus.client_messages import Status

T = TypeVar("T")


class KV:
    """Synchronous KV handle (``cluster.kv``): ``put``, ``get``, ``delete``, ``cas``.

    It runs a ``KvClient`` on a private event-loop thread that it owns and stops
    in ``close``, so it works from plain scripts and from inside other event loops.
    """

    def __init__(
        self, addresses: str | Sequence[str], *, token: str, config: KvClientConfig | None = None
    ) -> None:
        self._client = KvClient(addresses, token=token, config=config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lepton-kv-client", daemon=True
        )
        self._thread.start()
        # Closed at interpreter exit too, if the caller never did: else its connections'
        # reader tasks die with the loop and Python prints "Task was destroyed".
        self._finalizer = weakref.finalize(self, _close_kv, self._client, self._loop, self._thread)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise ValueError("this KV handle is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def put(self, key: str, value: Any) -> None:
        self._run(self._client.put(key, value))

    def get(self, key: str, default: Any = None) -> Any:
        return self._run(self._client.get(key, default))

    def delete(self, key: str) -> bool:
        return self._run(self._client.delete(key))

    def cas(self, key: str, expected: Any, new: Any) -> bool:
        return self._run(self._client.cas(key, expected, new))

    def status(self, address: str, timeout_s: float = 2.0) -> Status:
        return self._run(self._client.status(address, timeout_s))

    @property
    def addresses(self) -> list[str]:
        return list(self._client.addresses)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> KV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_kv(client: KvClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Close ``client`` on its loop, then stop the loop's thread (once)."""
    if not thread.is_alive():
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(5.0)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not thread.is_alive():
        loop.close()

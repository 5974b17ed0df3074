"""Checks the KV client makes itself: keys, values and the results replicas return.

A key or value the replicas would refuse (``kv.KvConfig`` defaults) is refused here at
once, not after a round trip; a refused command's result becomes ``ValueError`` (the
caller's fault) or ``KvError``.
"""

from __future__ import annotations

import msgspec

from lepton_ai.consensus.kv import KvConfig, KvError, KvResult

_value_encoder = msgspec.msgpack.Encoder()

_LIMITS = KvConfig()  # the replicas' defaults: refused here at once, not after a round trip


def check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"KV keys are str, got {type(key).__name__}")
    if not key:
        raise ValueError("KV keys cannot be empty")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:  # a lone surrogate: not text any replica can store
        raise ValueError(f"KV key {key!r} is not valid Unicode text: {exc.reason}") from None
    if size > _LIMITS.key_bytes_max:
        raise ValueError(
            f"KV key of {size} bytes (UTF-8) over key_bytes_max={_LIMITS.key_bytes_max}"
        )


def check_value(value: object) -> None:
    if value is None:
        raise ValueError("KV values cannot be None (None means 'absent'; use delete)")
    try:
        size = len(_value_encoder.encode(value))
    except TypeError as exc:
        raise TypeError(f"KV value is not serialisable as MessagePack: {exc}") from exc
    except UnicodeEncodeError as exc:
        raise ValueError(f"KV value holds text that is not valid Unicode: {exc.reason}") from None
    if size > _LIMITS.value_bytes_max:
        raise ValueError(
            f"KV value of {size} bytes (MessagePack) over value_bytes_max={_LIMITS.value_bytes_max}"
        )


def checked(result: KvResult) -> KvResult:
    if result.error is not None:
        if result.error.startswith(("too_large", "invalid")) or result.error == "none_value":
            raise ValueError(f"KV refused the command: {result.error}")
        raise KvError(f"KV refused the command: {result.error}")
    return result

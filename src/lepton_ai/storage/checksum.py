"""CRC32C (Castagnoli) checksums, with the ``crc32c`` package imported on first use.

The package's ``__init__`` pulls in ``importlib.metadata`` (~50-100 ms), which
would otherwise be paid at the start of every worker and executor process,
most of which never touch a shuffle file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_impl: Callable[..., int] | None = None


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of ``data`` (bytes-like), continuing from ``value``."""
    global _impl
    if _impl is None:
        import crc32c as package

        _impl = package.crc32c
    return _impl(data, value)

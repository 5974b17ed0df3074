"""cloudpickle for shipping the user's functions, keeping their file names.

cloudpickle (3.x) replaces every pickled code object's ``co_filename`` with
``"<dynamic-code>"`` to make its payloads byte-for-byte deterministic wherever a
function was defined. For us that costs more than it gives: a task's traceback
then says ``File "<dynamic-code>", line 3`` instead of the user's file. Code
objects here go through ``marshal`` instead, which keeps every field; executors run
the same interpreter as the driver (a by-value function's bytecode needs that
anyway), and the file name of one function is the same on every submit.
"""

from __future__ import annotations

import io
import marshal
import types
from collections import ChainMap
from typing import Any

import cloudpickle


def _rebuild_code(data: bytes) -> types.CodeType:
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):  # pragma: no cover - our own payload
        raise TypeError("not a code object")
    return code


def _reduce_code(code: types.CodeType) -> tuple[Any, tuple[bytes]]:
    return _rebuild_code, (marshal.dumps(code),)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    # A class attribute: the C pickler reads ``dispatch_table`` once, at __init__.
    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj, protocol=5)``, with code objects' file names kept."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(obj)
    return buf.getvalue()

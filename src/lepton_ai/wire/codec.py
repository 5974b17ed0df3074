"""msgspec MessagePack encoding of tagged message structs.

Each service defines its messages as ``msgspec.Struct`` subclasses with
``tag=True`` (the tag is the class name) and a ``Union`` of them; a ``Codec`` for
that union decodes only those types. Anything else — malformed MessagePack, an
unknown tag, a field of the wrong type — is a ``ProtocolError``, which closes the
connection that sent it.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from lepton_ai.errors import ProtocolError

T = TypeVar("T")

_ENCODER = msgspec.msgpack.Encoder()


def encode(msg: Any) -> bytes:
    """Encode any msgspec-supported value as MessagePack."""
    return _ENCODER.encode(msg)


class Codec(Generic[T]):
    """Encode any struct; decode only the message type (usually a Union) given.

    Construct with an explicit parameter so the type checker knows ``T``:
    ``Codec[PeerMessage](PeerMessage)``.
    """

    def __init__(self, msg_type: Any) -> None:
        self.msg_type = msg_type
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(msg_type)

    def encode(self, msg: Any) -> bytes:
        return _ENCODER.encode(msg)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"undecodable message: {exc}") from exc
        except RecursionError:  # a small frame nested thousands deep: malformed, not a crash
            raise ProtocolError("undecodable message: nested too deep") from None

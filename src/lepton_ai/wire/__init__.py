"""Wire protocol: bounded length-prefixed frames of msgspec MessagePack structs behind an HMAC handshake."""

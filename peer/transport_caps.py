"""A cap on every message hivemind reads from a libp2p stream.

hivemind frames each stream message with an 8-byte length and reads that many bytes
(``P2P.receive_raw_data``), so one peer could announce 2**63 bytes and make the reader allocate
until it dies (the security review's D1). ``install`` replaces that reader with one that refuses a
message longer than ``MAX_STREAM_MESSAGE`` before reading it: the stream fails, and only that
call with it. Every Barnraise message is far below the cap (payload and state chunks are 1 MiB,
a record at most 256 KiB; a DHT reply of a round's announcements about 500 bytes per peer).
Installed once, at import of ``peer.swarm``, before hivemind starts its processes (they inherit it).
"""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P

__all__ = ["MAX_STREAM_MESSAGE", "install"]

MAX_STREAM_MESSAGE = 16 * 1024 * 1024
"""The longest stream message read (bytes)."""


class StreamMessageTooLarge(ConnectionError):
    """A peer announced a stream message longer than ``MAX_STREAM_MESSAGE``."""


async def receive_capped(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_STREAM_MESSAGE:
        raise StreamMessageTooLarge(f"stream message of {length} bytes, more than {MAX_STREAM_MESSAGE}")
    return await reader.readexactly(length)


def install() -> None:
    P2P.receive_raw_data = staticmethod(receive_capped)

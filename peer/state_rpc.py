"""A peer's consensus state over libp2p: served by root, fetched from chosen donors, capped.

The state download is the fallback for a peer (or the coordinator) that cannot replay the
rounds it missed. hivemind's own state sharing is not used: it downloads from whichever
averager declares the highest self-chosen priority, with no byte or time limit. Here:

    rpc_state_record   a peer's current signed progress record (what it would serve), so a
                       joiner can ask several peers directly and find the state a quorum
                       vouches for (``protocol.policy.quorum_state``)
    rpc_state          the state itself, served only for the root the caller names and only if
                       this peer holds it now: the signed record, then the parameters and the
                       outer momentum as raw float32 bytes; at most ``STATE_UPLOADS`` at once
                       (a request beyond that gets nothing and moves on to the next donor)

A fetch takes donors in turn, each with its own deadline, and reads at most the bytes the
state can have (the record's cap plus 8 bytes per parameter): a donor that sends more, sends
too little, or stalls is dropped for the next. The bytes are checked by the caller against
the quorum's root (``peer.join.state_from_quorum``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's name to find stream handlers)

from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.mpfuture import MPFuture

from peer.rpc_gate import RpcGate
from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError
from protocol.records import PeerProgress
from protocol.wire import MAX_RECORD_BYTES

__all__ = ["StateServing", "STATE_UPLOADS"]

logger = logging.getLogger(__name__)

STATE_UPLOADS = 2
"""States one peer serves at once: each one holds a copy of the state while it streams."""
_CHUNK_BYTES = 1 << 20
_RECORD_SECONDS = 5.0
"""How long a peer may take to say which state it holds."""
_FLOOR_BYTES_PER_SECOND = 2_000_000
"""A donor slower than this (beyond a 10 s start) is left for the next one; a caller reading slower
is cut off by the donor (10 s plus the state at this rate), so it cannot hold an upload slot."""
_HOST_SECONDS = 30.0
"""How long the peer's process may take to hand its state to the averager process."""


class StateServing:
    """Mixed into the payload averager: runs in hivemind's averager process, except the methods
    marked "(peer process)", which send it a command and wait for the answer."""

    _state_record: bytes = b""
    _state_uploads: asyncio.Semaphore | None = None
    _gate: RpcGate
    _presented: bytes

    # --- the serving side

    def publish_record(self, record: bytes) -> None:
        """(Peer process) the signed progress record of the state this peer serves from now on."""
        self._call("_set_state_record", 10.0, record=record)

    async def _set_state_record(self, record: bytes, future: MPFuture) -> None:
        self._state_record = record
        future.set_result(True)

    async def rpc_state_record(self, request: averaging_pb2.AveragingData,
                               context: P2PContext) -> averaging_pb2.DownloadData:
        if not self._gate.allows(context.remote_id.to_base58(), request.peer_id):
            return averaging_pb2.DownloadData()
        return averaging_pb2.DownloadData(metadata=self._state_record)

    async def rpc_state(self, request: averaging_pb2.AveragingData,
                        context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        """The state whose root the caller names, if this peer holds it now; else nothing."""
        if not self._gate.allows(context.remote_id.to_base58(), request.peer_id):
            return
        if self._state_uploads is None:  # created on the averager process's own event loop
            self._state_uploads = asyncio.Semaphore(STATE_UPLOADS)
        if self._state_uploads.locked() or len(request.group_id) != 32:
            return
        async with self._state_uploads, asyncio.timeout(_HOST_SECONDS) as deadline:
            # a caller that stops reading cannot hold an upload slot for longer than a slow reader may
            metadata, tensors, _ = await self._get_current_state_from_host_process()
            record = MSGPackSerializer.loads(metadata) if metadata else None
            if not isinstance(record, bytes) or len(tensors) != 2 or _root_of(record) != request.group_id.hex():
                return
            size = sum(4 * t.numel() for t in tensors)
            deadline.reschedule(asyncio.get_running_loop().time() + 10.0 + size / _FLOOR_BYTES_PER_SECOND)
            yield averaging_pb2.DownloadData(metadata=record)
            for tensor in tensors:
                raw = tensor.contiguous().numpy().tobytes()
                for start in range(0, len(raw), _CHUNK_BYTES):
                    yield averaging_pb2.DownloadData(metadata=raw[start : start + _CHUNK_BYTES])

    # --- the fetching side

    def state_records(self, holders: Sequence[str], timeout: float) -> dict[str, bytes]:
        """(Peer process) each holder's current signed record (libp2p id -> bytes), asked at once."""
        return self._call("_state_records", timeout + 10.0, holders=list(holders), timeout=timeout)

    async def _state_records(self, holders: list[str], timeout: float, future: MPFuture) -> None:
        async def ask(holder: str) -> tuple[str, bytes]:
            try:
                stub = self.get_stub(self._p2p, PeerID.from_base58(holder), namespace=self.prefix)
                answer = await asyncio.wait_for(stub.rpc_state_record(averaging_pb2.AveragingData(peer_id=self._presented)), timeout)
                record = answer.metadata
                return holder, record if 0 < len(record) <= MAX_RECORD_BYTES else b""
            except Exception as error:  # this holder did not answer: it does not vouch
                logger.debug("state record of %s failed: %r", holder, error)
                return holder, b""

        try:
            answers = await asyncio.gather(*(ask(h) for h in holders))
            future.set_result({holder: record for holder, record in answers if record})
        except Exception as error:
            future.set_exception(TransportError(f"asking peers for their state records failed: {error!r}"[:200]))

    def fetch_state(self, root: str, state_bytes: int, donors: Sequence[str], destination: Path,
                    timeout: float) -> str | None:
        """(Peer process) the state of ``root`` from the first of ``donors`` that serves it whole,
        written to ``destination`` (4-byte record length, record, ``state_bytes`` of tensors);
        returns the donor's libp2p id, or None when none did within ``timeout``."""
        try:
            return self._call("_fetch_state", timeout + 30.0, root=root, state_bytes=state_bytes,
                              donors=list(donors), destination=str(destination), timeout=timeout)
        except DeadlineExceeded:
            return None

    async def _fetch_state(self, root: str, state_bytes: int, donors: list[str], destination: str,
                           timeout: float, future: MPFuture) -> None:
        deadline = time.monotonic() + timeout
        per_donor = 10.0 + state_bytes / _FLOOR_BYTES_PER_SECOND
        try:
            for donor in donors:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if await self._receive_state(donor, root, state_bytes, Path(destination), min(remaining, per_donor)):
                    future.set_result(donor)
                    return
            future.set_result(None)
        except Exception as error:  # reported to the caller, which tries again later
            future.set_exception(TransportError(f"state fetch failed: {error!r}"[:200]))

    async def _receive_state(self, donor: str, root: str, state_bytes: int, destination: Path,
                             timeout: float) -> bool:
        partial = destination.with_suffix(".partial")
        request = averaging_pb2.AveragingData(group_id=bytes.fromhex(root), peer_id=self._presented)

        async def receive(handle) -> bool:
            stub = self.get_stub(self._p2p, PeerID.from_base58(donor), namespace=self.prefix)
            record, received = None, 0
            async for message in await stub.rpc_state(request):
                if record is None:
                    record = message.metadata
                    if not 0 < len(record) <= MAX_RECORD_BYTES:
                        return False
                    handle.write(len(record).to_bytes(4, "big") + record)
                    continue
                received += len(message.metadata)
                if received > state_bytes:
                    return False  # more than a state of this run can hold
                handle.write(message.metadata)
            return record is not None and received == state_bytes

        try:
            with partial.open("wb") as handle:
                ok = await asyncio.wait_for(receive(handle), timeout=timeout)
        except Exception as error:  # this donor failed: the next one is asked
            logger.debug("state from %s failed: %r", donor, error)
            ok = False
        if ok:
            os.replace(partial, destination)
        else:
            partial.unlink(missing_ok=True)
        return ok


def _root_of(record: bytes) -> str | None:
    try:
        return PeerProgress.from_bytes(record).state_root
    except MalformedRecord:  # what this peer serves is its own record; a bad one is served as nothing
        return None

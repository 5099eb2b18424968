"""The adapter to hivemind: the only module of the peer that imports it.

It speaks Barnraise's types (bytes of signed records, flat tensors, ``AverageOutcome``),
so the round logic never sees hivemind's. The coordinator reuses ``SwarmNode`` through its
own thin adapter (``coordinator/swarm.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's name to find stream handlers)

import torch

from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError
from protocol.manifest import AveragingConfig

# hivemind logs every failed all-reduce or state download as an exception with a traceback;
# Barnraise reports each round's outcome itself, so hivemind stays quiet unless the user sets
# HIVEMIND_LOGLEVEL (e.g. INFO) to see its own logs.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")

import hivemind  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.averaging.group_info import GroupInfo  # noqa: E402
from hivemind.averaging.matchmaking import MatchmakingException  # noqa: E402
from hivemind.compression import NoCompression  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.storage import DictionaryDHTValue  # noqa: E402
from hivemind.p2p import P2PContext, PeerID  # noqa: E402
from hivemind.proto import averaging_pb2  # noqa: E402
from hivemind.utils import MSGPackSerializer  # noqa: E402
from hivemind.utils.mpfuture import MPFuture  # noqa: E402
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time  # noqa: E402

__all__ = ["SwarmNode", "ExchangeResult", "PendingExchange", "StateSource"]

logger = logging.getLogger(__name__)

StateSource = Callable[[], tuple[bytes | None, list[torch.Tensor]]]
"""Returns (signed progress record bytes, state tensors) for a joiner, or (None, [])."""

_CHUNK_BYTES = 1 << 20
"""Payloads stream in messages of at most this size (libp2p's limit per message is 4 MiB)."""
_KEPT_ROUNDS = 4
"""Own payloads (and groups) the averager process keeps for groupmates still downloading."""
_GROUP_WAIT = 10.0
"""How long a payload request waits for this peer to learn the group it names."""
_MATCHMAKING_POLL = 1.0
"""Seconds between two reads of the group key while matchmaking. hivemind re-reads it as soon as
its queue of potential leaders is empty, i.e. back to back for the whole matchmaking window on the
peer that is the leader (about 100 DHT requests per peer and round, most of the round's bytes)."""


@dataclass(frozen=True)
class ExchangeResult:
    """What one all-gather of compressed payloads really did."""

    payloads: dict[str, tuple[object, bytes]]
    """Each groupmate's (gathered record, payload), by libp2p id, this peer's own included.
    Untrusted: records are still to be decoded and payloads checked against them."""
    failure: str | None
    """Why no group's payloads arrived, or None."""
    seconds: float
    """From the launch to the last payload in hand."""
    missing: int = 0
    """Groupmates whose payload could not be downloaded (left out of ``payloads``)."""


class PendingExchange:
    """An all-gather in flight in the averager's process; ``result`` waits for it (bounded)."""

    def __init__(self, control, started: float, deadline_seconds: float):
        self._control, self._started, self._deadline = control, started, started + deadline_seconds
        self._result: ExchangeResult | None = None

    def cancel(self) -> None:
        """Abandon the exchange (its averager step stops holding matchmaking for the next one)."""
        if self._result is None:
            self._control.cancel()
            self._result = ExchangeResult({}, "abandoned", time.monotonic() - self._started)

    def result(self) -> ExchangeResult:
        """Wait until the exchange ends or its deadline passes (then it is cancelled)."""
        if self._result is not None:
            return self._result
        try:
            gathered = self._control.result(timeout=max(0.0, self._deadline - time.monotonic()))
        except TimeoutError:
            self._control.cancel()
            failure = "the exchange did not finish before its deadline"
            self._result = ExchangeResult({}, failure, time.monotonic() - self._started)
        except (Exception, asyncio.CancelledError) as error:  # a failed step: no payloads, reported, not hidden
            self._result = ExchangeResult({}, f"{type(error).__name__}: {error}"[:200], time.monotonic() - self._started)
        else:
            self._result = _exchange_result(gathered, self._started)
        return self._result


def _exchange_result(gathered, started: float) -> ExchangeResult:
    if not isinstance(gathered, dict) or "payloads" not in gathered:
        return ExchangeResult({}, "no group formed before the deadline", time.monotonic() - started)
    seconds = gathered["finished"] - started if isinstance(gathered.get("finished"), float) else 0.0
    return ExchangeResult(dict(gathered["payloads"]), None, max(seconds, 0.0), int(gathered.get("missing", 0)))


class _StateSharingAverager(DecentralizedAverager):
    """hivemind's averager, serving the peer's verified round-boundary state to joiners.

    ``get_current_state`` is hivemind's documented extension point; it runs in this
    process (on hivemind's pipe thread) when a joiner downloads state.
    """

    def __init__(self, *args, state_source: StateSource | None, **kwargs):
        self._state_source = state_source
        super().__init__(*args, **kwargs)

    def get_current_state(self):
        if self._state_source is None:
            return None, [], None
        metadata, tensors = self._state_source()
        return metadata, tensors, None


class _PayloadGatheringAverager(_StateSharingAverager):
    """Matchmaking from hivemind, then an all-gather of compressed payloads instead of its
    all-reduce: each groupmate downloads every other groupmate's payload (streamed, size-capped,
    only to members of the group), so the payload bytes are exactly what crosses the network.

    Runs in hivemind's averager process; the peer hands over its payload with ``offer_payload``
    before each step, as a file in a private folder: hivemind's command pipe is non-blocking in
    that process, and a message of megabytes can break partway through when the CPU is busy.
    """

    def __init__(self, *args, payload_limit: int, handoff: Path, **kwargs):
        self._payload_limit = payload_limit
        self._handoff = handoff
        self._offered: OrderedDict[int, bytes] = OrderedDict()
        self._groups: OrderedDict[bytes, tuple[bytes, frozenset[PeerID]]] = OrderedDict()
        super().__init__(*args, **kwargs)

    async def _step(self, **kwargs):
        _pace_group_reads(self._matchmaking.group_key_manager, _MATCHMAKING_POLL)
        return await super()._step(**kwargs)

    def offer_payload(self, round_: int, payload: bytes) -> None:
        """(Peer process) make ``payload`` this peer's part of the exchange of ``round_``."""
        path = self._handoff / f"{round_}.payload"
        partial = path.with_suffix(".partial")
        partial.write_bytes(payload)
        os.replace(partial, path)
        future = MPFuture()
        self._outer_pipe.send(("_offer_payload", [], dict(round_=round_, path=str(path), future=future)))
        try:
            future.result(timeout=30.0)
        except TimeoutError:
            raise TransportError("the averager process did not take this round's payload within 30 s") from None

    async def _offer_payload(self, round_: int, path: str, future: MPFuture) -> None:
        try:
            payload = Path(path).read_bytes()
            os.unlink(path)
        except OSError as error:
            future.set_exception(TransportError(f"payload hand-off failed: {error}"))
            return
        self._offered[round_] = payload
        while len(self._offered) > _KEPT_ROUNDS:
            self._offered.popitem(last=False)
        future.set_result(True)

    def _record(self, raw: bytes) -> object:
        """A groupmate's gathered record, still untrusted (None if hivemind's framing is broken)."""
        try:
            return self.serializer.loads(self.serializer.loads(raw)[2])
        except Exception:  # a malformed record leaves out its sender only
            return None

    async def _aggregate_with_group(self, group_info: GroupInfo, **kwargs) -> dict:
        # hivemind registers a future for its all-reduce runner; there is none here, and a caller
        # of its all-reduce RPC must be told "no such group" at once rather than wait on it
        running = self._running_groups.pop(group_info.group_id, None)
        if running is not None:
            running.cancel()
        records = [self._record(raw) for raw in group_info.gathered]
        own_index = group_info.peer_ids.index(self.peer_id)
        own = records[own_index] if isinstance(records[own_index], dict) else {}
        payload = self._offered.get(own.get("round"))
        if payload is None:
            raise MatchmakingException(f"no payload offered for round {own.get('round')}")
        self._groups[group_info.group_id] = (payload, frozenset(group_info.peer_ids))
        while len(self._groups) > _KEPT_ROUNDS * 2:
            self._groups.popitem(last=False)
        # a member of another round or codec would be rejected anyway: do not download it
        wanted = {k: own.get(k) for k in ("round", "codec", "payload_size")}
        others = [
            (i, p) for i, p in enumerate(group_info.peer_ids)
            if p != self.peer_id and isinstance(records[i], dict) and all(records[i].get(k) == v for k, v in wanted.items())
        ]
        try:
            fetched = await asyncio.gather(*(self._download(p, group_info.group_id) for _, p in others))
        except Exception as error:  # hivemind retries or fails the step on this type only
            raise MatchmakingException(f"payload exchange failed: {error!r}") from None
        payloads = {str(self.peer_id): (own, payload)}
        for (index, peer), body in zip(others, fetched, strict=True):
            if body is not None:
                payloads[str(peer)] = (records[index], body)
        return {"payloads": payloads, "missing": len(others) + 1 - len(payloads), "finished": time.monotonic()}

    async def _download(self, peer: PeerID, group_id: bytes) -> bytes | None:
        """A groupmate's payload, or None if it failed or ran past the size limit."""
        request = averaging_pb2.AveragingData(group_id=group_id, peer_id=self.peer_id.to_bytes())
        received = bytearray()

        async def receive() -> None:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            async for message in await stub.rpc_download_payload(request):
                received.extend(message.metadata)
                if len(received) > self._payload_limit:
                    raise MatchmakingException("payload larger than the manifest allows")

        try:
            # one stalled groupmate must not hold the others past the exchange's deadline
            await asyncio.wait_for(receive(), timeout=0.8 * self._allreduce_timeout)
        except Exception as error:  # a groupmate that fails or stalls is left out, and counted
            logger.debug("payload download from %s failed: %r", peer, error)
            return None
        return bytes(received) if received else None

    async def rpc_download_payload(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Serve this peer's payload of a group to the members of that group, and no one else."""
        deadline = time.monotonic() + _GROUP_WAIT
        while request.group_id not in self._groups and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        entry = self._groups.get(request.group_id)
        if entry is None or context.remote_id not in entry[1]:
            return
        payload = entry[0]
        for start in range(0, len(payload), _CHUNK_BYTES):
            yield averaging_pb2.DownloadData(metadata=payload[start : start + _CHUNK_BYTES])


def _pace_group_reads(key_manager, interval: float) -> None:
    """(Averager process) make ``key_manager.get_averagers`` wait until ``interval`` seconds have
    passed since its previous call: matchmaking then reads the DHT at most once per interval."""
    if getattr(key_manager, "_barnraise_paced", False):
        return
    read, last = key_manager.get_averagers, [-float("inf")]

    async def paced(*args, **kwargs):
        wait = last[0] + interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        last[0] = time.monotonic()
        return await read(*args, **kwargs)

    key_manager.get_averagers = paced
    key_manager._barnraise_paced = True


async def _stored_value(_dht, node, key: str):
    """(DHT process) the value of ``key`` in this node's own storage (not its cache), decoded."""
    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None:
        return None
    try:
        if isinstance(found.value, DictionaryDHTValue):
            return {sub: MSGPackSerializer.loads(item.value) for sub, item in found.value.items()}
        return MSGPackSerializer.loads(found.value)
    except Exception:  # a value that does not decode is no value
        return None


async def _stored_expiration(_dht, node, key: str) -> float | None:
    found = node.protocol.storage.get(DHTID.generate(source=key))
    return None if found is None else float(found.expiration_time)


class SwarmNode:
    """One DHT node and, once a run is known, one averager on the run's prefix."""

    def __init__(self, *, initial_peers: Sequence[str], host_maddrs: Sequence[str], identity_path: str | None = None):
        self.averager: _PayloadGatheringAverager | None = None
        self.round_deadline = 0.0
        self._handoff: Path | None = None
        try:
            self.dht = hivemind.DHT(
                initial_peers=list(initial_peers),
                host_maddrs=list(host_maddrs),
                identity_path=identity_path,
                start=True,
            )
        except Exception as error:  # hivemind raises many types when a bootstrap peer is unreachable
            raise TransportError(f"could not join the swarm through {list(initial_peers)}: {error}") from None

    def start_averager(
        self,
        *,
        prefix: str,
        payload_limit: int,
        averaging: AveragingConfig,
        state_source: StateSource | None = None,
        client_mode: bool = False,
    ) -> None:
        """Start exchanging payloads of up to ``payload_limit`` bytes on ``prefix``; serve
        ``state_source`` to joiners.

        Call from the main thread: hivemind's averager sets SIGINT to "ignore" in the calling
        process when it starts (so Ctrl+C would stop working); we put the handler back.
        """
        sigint = signal.getsignal(signal.SIGINT)
        try:
            self.averager = _PayloadGatheringAverager(
                [torch.zeros(1)],  # hivemind's all-reduce is not used: payloads are all-gathered
                self.dht,
                start=True,
                prefix=prefix,
                target_group_size=averaging.target_group_size,
                min_group_size=averaging.min_group_size,
                min_matchmaking_time=averaging.matchmaking_seconds,
                # below the matchmaking time, as hivemind advises (equal ones can split a group)
                request_timeout=min(3.0, averaging.matchmaking_seconds / 2),
                allreduce_timeout=averaging.round_deadline_seconds,
                state_compression=NoCompression(),
                allow_state_sharing=state_source is not None,
                declare_state_period=30.0,
                client_mode=client_mode,
                state_source=state_source,
                payload_limit=payload_limit,
                handoff=self._handoff_folder(),
            )
        finally:
            signal.signal(signal.SIGINT, sigint)
        self.round_deadline = averaging.round_deadline_seconds

    def _handoff_folder(self) -> Path:
        """A private folder (in shared memory when there is one) for handing payloads over."""
        if self._handoff is None:
            shm = Path("/dev/shm")
            self._handoff = Path(tempfile.mkdtemp(prefix="barnraise-", dir=shm if shm.is_dir() else None))
        return self._handoff

    def set_state_priority(self, priority: float) -> None:
        """Joiners download from the peer with the highest priority first (we use the round)."""
        self._need_averager().state_sharing_priority = float(priority)

    def _need_averager(self) -> _PayloadGatheringAverager:
        if self.averager is None:
            raise TransportError("the averager has not been started")
        return self.averager

    @property
    def maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def p2p_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def start_exchange(self, *, round: int, payload: bytes, member: dict, weight: float) -> PendingExchange:
        """Launch the all-gather of ``payload`` with this round's group; returns at once.

        ``member`` (this peer's record) reaches every groupmate through matchmaking. Matchmaking
        is bounded by the round deadline and the download after it by the same again.
        """
        averager = self._need_averager()
        started = time.monotonic()
        averager.offer_payload(round, payload)
        control = averager.step(gather=member, weight=weight, timeout=self.round_deadline, wait=False)
        return PendingExchange(control, started, 2 * self.round_deadline)

    def store(self, key: str, value: bytes, *, ttl: float, subkey: str | None = None) -> bool:
        expiration = get_dht_time() + ttl
        return bool(self.dht.store(key, value, expiration_time=expiration, subkey=subkey))

    def fetch(self, key: str) -> dict[str, bytes] | bytes | None:
        """Latest value of ``key``: bytes, or for a key with subkeys a map subkey -> bytes."""
        found = self.dht.get(key, latest=True)
        if found is None:
            return None
        value = found.value
        if isinstance(value, dict):
            return {
                str(sub): item.value
                for sub, item in value.items()
                if isinstance(item, ValueWithExpiration) and isinstance(item.value, bytes)
            }
        return value if isinstance(value, bytes) else None

    def fetch_local(self, key: str) -> dict[str, bytes] | bytes | None:
        """What this node itself stores for ``key`` (no network): the DHT keeps every value on its
        ``num_replicas`` (5) nodes nearest to the key, so in a swarm of up to 5 nodes every node holds
        every value, and in a larger one this is part of it, or nothing. Same shape as ``fetch``."""
        value = self.dht.run_coroutine(partial(_stored_value, key=key))
        if isinstance(value, dict):
            return {str(sub): item for sub, item in value.items() if isinstance(item, bytes)}
        return value if isinstance(value, bytes) else None

    def stored_expiration(self, key: str) -> float | None:
        """When the value of ``key`` that this node stores itself expires (Unix time), or None."""
        return self.dht.run_coroutine(partial(_stored_expiration, key=key))

    def download_state(self, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        """The state a peer serves to joiners: (its signed progress bytes, its tensors)."""
        try:
            result = self._need_averager().load_state_from_peers(timeout=timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no peer served its state within {timeout:.0f} s") from None
        if result is None:
            raise TransportError("no peer served its state (none sharing, or all downloads failed)")
        metadata, tensors = result
        if not isinstance(metadata, bytes):
            raise MalformedRecord("state download: metadata is not a signed progress record")
        return metadata, list(tensors)

    def shutdown(self) -> None:
        """Stop the averager and the DHT (and with them the libp2p daemon)."""
        try:
            if self.averager is not None:
                self.averager.shutdown()
        finally:
            self.dht.shutdown()
            if self._handoff is not None:
                shutil.rmtree(self._handoff, ignore_errors=True)

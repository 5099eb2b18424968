"""The adapter to hivemind: the only module of the peer that imports it.

It speaks Barnraise's types (bytes of signed records and payloads, flat tensors),
so the round logic never sees hivemind's. The coordinator reuses ``SwarmNode`` through its
own thin adapter (``coordinator/swarm.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's name to find stream handlers)

import torch

from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError
from protocol.manifest import AveragingConfig
from protocol.multiaddr import libp2p_id_of, peer_id_of, valid_multiaddr
from protocol.policy import Admission
from protocol.records import seal, unseal
from protocol.signing import SigningKey

# hivemind logs every failed all-reduce or state download as an exception with a traceback;
# Barnraise reports each round's outcome itself, so hivemind stays quiet unless the user sets
# HIVEMIND_LOGLEVEL (e.g. INFO) to see its own logs.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")

import hivemind  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.compression import NoCompression  # noqa: E402
from hivemind.dht.routing import DHTID  # noqa: E402
from hivemind.dht.storage import DictionaryDHTValue  # noqa: E402
from hivemind.p2p import P2PContext, PeerID  # noqa: E402
from hivemind.proto import averaging_pb2  # noqa: E402
from hivemind.utils import MSGPackSerializer  # noqa: E402
from hivemind.utils.mpfuture import MPFuture  # noqa: E402
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time  # noqa: E402

from peer.dht_records import SignedRecordValidator  # noqa: E402
from peer.pacing import Pacer  # noqa: E402
from peer.reachability import DialBack, Reachability, judge, listen_port, observed_address  # noqa: E402
from peer.rpc_gate import RpcGate  # noqa: E402
from peer.state_rpc import StateServing  # noqa: E402
from peer.transport_caps import install as _cap_stream_messages  # noqa: E402

_cap_stream_messages()

__all__ = ["SwarmNode", "StateSource"]

logger = logging.getLogger(__name__)

StateSource = Callable[[], tuple[bytes | None, list[torch.Tensor]]]
"""Returns (signed progress record bytes, state tensors) for a joiner, or (None, [])."""

_CHUNK_BYTES = 1 << 20
"""Payloads stream in messages of at most this size (libp2p's limit per message is 4 MiB)."""
_KEPT_ROUNDS = 12
"""Rounds of payloads (G + 1 each) a peer's store keeps, for followers replaying them."""
_PER_HOLDER_SECONDS = 10.0
"""How long one holder may take to serve a payload before the next one is asked."""
_FETCH_PAUSE = 0.5
"""Pause between two passes over a payload's holders (none had it yet)."""
_NOTICE_SECONDS = 5.0
"""Deadline of one notice (ask a peer to fetch a payload just announced)."""
_MAX_PREFETCHES = 64
"""Fetches on notice one averager runs at once (more notices are ignored)."""
_GIVE_UP_PASSES = 6
_BLOB_UPLOADS = 4
"""Blob files (shards, configs) one peer serves at once."""
_BLOB_FLOOR_BYTES_PER_SECOND = 1_000_000
"""A holder slower than this for a blob is left for the next one."""
"""Passes over every holder (its author first or second) before a payload counts as lost."""
_DIAL_BACK = "barnraise.dial_back"
"""The libp2p handler every node serves: where a caller's connection comes from, and whether a new
TCP connection to that address, at the caller's listen port, gets through (``peer.reachability``)."""
_DIAL_BACK_SECONDS = 3.0
"""How long a node tries to open the TCP connection back to a caller."""
_DIAL_BACK_EVERY = 10.0
"""A node dials one caller back at most once in this many seconds (more asks get an empty answer)."""
_DIAL_BACK_ASKED = 4
"""Nodes one peer asks to dial it back (its bootstrap peers first, then others it is connected to)."""


class _StateSharingAverager(DecentralizedAverager):
    """hivemind's averager, handing the peer's round-boundary state to ``StateServing``.

    ``get_current_state`` is hivemind's documented extension point; it runs in the peer's
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


class _PayloadAverager(StateServing, _StateSharingAverager):
    """Content-addressed payloads over libp2p: this peer's store, served to anyone who asks by
    sha256, and fetches from any holder. hivemind's matchmaking and all-reduce are not used.

    Runs in hivemind's averager process. Payloads cross between it and the peer's process as files
    in a private folder: hivemind's command pipe is non-blocking in that process, and a message of
    megabytes can break partway through when the CPU is busy.
    """

    def __init__(self, *args, payload_limit: int, handoff: Path, kept: int, blobs: Path | None = None,
                 admission: Admission | None = None, token: bytes = b"", upload_rate: float | None = None,
                 download_rate: float | None = None, evidence: Path | None = None, **kwargs):
        self._payload_limit, self._handoff, self._kept = payload_limit, handoff, kept
        self._pace_up, self._pace_down = Pacer(upload_rate), Pacer(download_rate)
        """The volunteer's caps (``--max-upload-mbps``, ``--max-download-mbps``): payloads and the
        run's files are paced through them, sent and received (``peer.pacing``)."""
        self._gate = RpcGate(admission)
        """Who is served (private runs: callers with a join token for their own id), at what rate."""
        self._presented = token
        """What this peer's requests carry: its join token in a private run (else nothing)."""
        self._blobs = blobs
        """The peer's blob cache (model config, tokenizer, data index, shards), served by sha256."""
        self._evidence = evidence
        """The peer's work evidence of its last rounds, served by id (``peer.evidence``)."""
        self._blob_uploads: asyncio.Semaphore | None = None
        self._store: OrderedDict[str, bytes] = OrderedDict()
        self._prefetching: set[asyncio.Task] = set()
        """Fetches started on another peer's notice (owned here, bounded by ``_MAX_PREFETCHES``)."""
        super().__init__(*args, **kwargs)

    def _call(self, method: str, wait: float, **kwargs):
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(kwargs, future=future)))
        try:
            return future.result(timeout=wait)
        except TimeoutError:
            raise DeadlineExceeded(f"the averager process did not answer {method} within {wait:.0f} s") from None

    def present(self, token: bytes) -> None:
        """(Peer process) carry ``token`` in this peer's requests from now on."""
        self._call("_present", 10.0, token=token)

    async def _present(self, token: bytes, future: MPFuture) -> None:
        self._presented = token
        future.set_result(True)

    def hold(self, payload: bytes, notify: Sequence[str] = ()) -> str:
        """(Peer process) keep ``payload`` in the store and serve it, and tell the peers ``notify``
        (libp2p ids) to fetch it at once, so that it outlives this peer; returns its sha256."""
        digest = hashlib.sha256(payload).hexdigest()
        path = self._handoff / f"{digest}.hold"
        partial = path.with_suffix(".partial")
        partial.write_bytes(payload)
        os.replace(partial, path)
        self._call("_hold", 30.0, path=str(path), digest=digest, notify=list(notify))
        return digest

    def fetch(self, wanted: Sequence[tuple[str, int, Sequence[str]]], timeout: float) -> dict[str, bytes]:
        """(Peer process) the payloads ``(sha256, size, holders' libp2p ids)`` that arrived within
        ``timeout``, each checked against its size and sha256, by sha256."""
        got = self._call("_fetch", timeout + 30.0, wanted=[(d, n, list(h)) for d, n, h in wanted], timeout=timeout)
        out = {}
        for digest in got:
            path = self._handoff / f"{digest}.fetched"
            try:
                out[digest] = path.read_bytes()
                path.unlink()
            except OSError:
                continue
        return out

    def fetch_blob(self, digest: str, limit: int, holders: Sequence[str], destination: Path, timeout: float,
                   *, by_content: bool = True) -> bool:
        """(Peer process) a blob of at most ``limit`` bytes from the first of ``holders`` (libp2p ids)
        that serves it, written to ``destination``; ``by_content``: only one whose sha256 is
        ``digest`` (False: a file named by another id, such as work evidence, which its caller checks)."""
        return self._call("_fetch_blob", timeout + 30.0, digest=digest, limit=limit, holders=list(holders),
                          destination=str(destination), timeout=timeout, by_content=by_content)

    async def _fetch_blob(self, digest: str, limit: int, holders: list[str], destination: str, timeout: float,
                          future: MPFuture, by_content: bool = True) -> None:
        deadline = time.monotonic() + timeout
        try:
            per_holder = _PER_HOLDER_SECONDS + limit / _BLOB_FLOOR_BYTES_PER_SECOND  # a slow holder yields to the next
            for holder in holders:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                body = await self._receive(holder, digest, limit, min(remaining, per_holder))
                if body is not None and (not by_content or hashlib.sha256(body).hexdigest() == digest):
                    await asyncio.to_thread(Path(destination).write_bytes, body)
                    future.set_result(True)
                    return
            future.set_result(False)
        except Exception as error:  # reported to the caller, who tries its next source
            future.set_exception(error)

    def _keep(self, digest: str, payload: bytes) -> None:
        self._store[digest] = payload
        self._store.move_to_end(digest)
        while len(self._store) > self._kept:
            self._store.popitem(last=False)

    async def _hold(self, path: str, digest: str, notify: list[str], future: MPFuture) -> None:
        try:
            payload = Path(path).read_bytes()
            os.unlink(path)
        except OSError as error:
            future.set_exception(TransportError(f"payload hand-off failed: {error}"))
            return
        self._keep(digest, payload)
        future.set_result(True)
        request = averaging_pb2.AveragingData(group_id=bytes.fromhex(digest), peer_id=self._presented,
                                              weight=float(len(payload)))
        for holder in notify:
            self._own(self._notify(holder, request))

    def _own(self, coroutine) -> None:
        """Run ``coroutine`` as a task this averager holds until it ends (bounded in number)."""
        if len(self._prefetching) >= _MAX_PREFETCHES:
            coroutine.close()
            return
        task = asyncio.create_task(coroutine)
        self._prefetching.add(task)
        task.add_done_callback(self._prefetching.discard)

    async def _notify(self, holder: str, request: averaging_pb2.AveragingData) -> None:
        try:
            stub = self.get_stub(self._p2p, PeerID.from_base58(holder), namespace=self.prefix)
            await asyncio.wait_for(stub.rpc_notice(request), timeout=_NOTICE_SECONDS)
        except Exception as error:  # a notice is a courtesy: the payload is still served from here
            logger.debug("notice of %s to %s failed: %r", request.group_id.hex()[:16], holder, error)

    async def rpc_notice(self, request: averaging_pb2.AveragingData, context: P2PContext) -> averaging_pb2.AveragingData:
        """A peer announced a payload: fetch it from that peer now (bounded), so that it stays
        available if its author leaves before the round is read."""
        if not self._gate.allows(context.remote_id.to_base58(), request.peer_id):
            return averaging_pb2.AveragingData()
        digest, size = request.group_id.hex(), int(request.weight)
        if len(request.group_id) == 32 and digest not in self._store and 0 < size <= self._payload_limit:
            self._own(self._prefetch(context.remote_id.to_base58(), digest, size))
        return averaging_pb2.AveragingData()

    async def _prefetch(self, holder: str, digest: str, size: int) -> None:
        body = await self._download(holder, digest, size, _PER_HOLDER_SECONDS)
        if body is not None and digest not in self._store:
            self._keep(digest, body)

    async def _fetch(self, wanted: list, timeout: float, future: MPFuture) -> None:
        deadline = time.monotonic() + timeout
        try:
            found = await asyncio.gather(*(self._fetch_one(d, n, h, deadline) for d, n, h in wanted))
            got = []
            for (digest, _, _), ok in zip(wanted, found, strict=True):
                if ok:
                    path = self._handoff / f"{digest}.fetched"
                    path.with_suffix(".partial").write_bytes(self._store[digest])
                    os.replace(path.with_suffix(".partial"), path)
                    got.append(digest)
            future.set_result(got)
        except Exception as error:  # reported to the peer, which treats the round as not settled
            future.set_exception(TransportError(f"payload fetch failed: {error!r}"[:200]))

    async def _fetch_one(self, digest: str, size: int, holders: list[str], deadline: float) -> bool:
        """Ask the holders in turn until one serves the payload whole, or the deadline passes: one
        that does not hold it yet answers with nothing at once. After ``_GIVE_UP_PASSES`` passes in
        which none had it (its author gone before anyone fetched it) the payload counts as lost."""
        if digest in self._store:
            return True
        for _ in range(_GIVE_UP_PASSES):
            if time.monotonic() >= deadline:
                return False
            for holder in holders:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                body = await self._download(holder, digest, size, min(remaining, _PER_HOLDER_SECONDS))
                if body is not None:
                    self._keep(digest, body)
                    return True
            await asyncio.sleep(_FETCH_PAUSE)
        return False

    async def _download(self, holder: str, digest: str, size: int, timeout: float) -> bytes | None:
        """The payload from one holder, or None (not held, failed, too large, or a wrong hash)."""
        if size > self._payload_limit:
            return None
        body = await self._receive(holder, digest, size, timeout)
        if body is None or len(body) != size or hashlib.sha256(body).hexdigest() != digest:
            return None
        return body

    async def _receive(self, holder: str, digest: str, size: int, timeout: float) -> bytes | None:
        """What one holder serves for ``digest``, at most ``size`` bytes, within ``timeout`` (None: failed)."""
        request = averaging_pb2.AveragingData(group_id=bytes.fromhex(digest), peer_id=self._presented)
        received = bytearray()

        async def receive() -> None:
            stub = self.get_stub(self._p2p, PeerID.from_base58(holder), namespace=self.prefix)
            async for message in await stub.rpc_payload(request):
                received.extend(message.metadata)
                if len(received) > size:
                    raise TransportError("payload larger than announced")
                await self._pace_down.take(len(message.metadata))

        try:
            await asyncio.wait_for(receive(), timeout=timeout)
        except Exception as error:  # this holder failed: the next one is asked
            logger.debug("payload %s from %s failed: %r", digest[:16], holder, error)
            return None
        return bytes(received) if received else None

    async def rpc_payload(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Serve a payload or a blob of the run's files this peer holds, by sha256, to any caller the
        gate lets through (in a public run, anyone within its rate); nothing if it does not hold it."""
        if not self._gate.allows(context.remote_id.to_base58(), request.peer_id):
            return
        digest = request.group_id.hex()
        payload = self._store.get(digest)
        folder = next((f for f in (self._blobs, self._evidence) if f is not None and len(digest) == 64
                       and (f / digest).is_file()), None)
        if payload is None and folder is not None:
            async for chunk in self._blob_chunks(folder / digest):
                await self._pace_up.take(len(chunk))
                yield averaging_pb2.DownloadData(metadata=chunk)
            return
        if payload is None:
            return
        for start in range(0, len(payload), _CHUNK_BYTES):
            chunk = payload[start : start + _CHUNK_BYTES]
            await self._pace_up.take(len(chunk))
            yield averaging_pb2.DownloadData(metadata=chunk)


    # hivemind's own averaging RPCs: Barnraise uses none of them (payloads are fetched by hash,
    # states served by root), so none of them answers anyone
    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest,
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
        return
        yield  # an async generator that yields nothing

    async def _blob_chunks(self, path: Path) -> AsyncIterator[bytes]:
        """A blob file in chunks, read one at a time; at most ``_BLOB_UPLOADS`` served at once (the
        others wait their turn), so requests cannot make this peer hold many files in memory."""
        if self._blob_uploads is None:  # created on the averager process's own event loop
            self._blob_uploads = asyncio.Semaphore(_BLOB_UPLOADS)
        async with self._blob_uploads:
            try:
                handle = await asyncio.to_thread(path.open, "rb")
            except OSError:
                return
            try:
                while chunk := await asyncio.to_thread(handle.read, _CHUNK_BYTES):
                    yield chunk
            finally:
                handle.close()


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


async def _set_admission(_dht, node, admission: Admission | None) -> None:
    """(DHT process) gate this node's storage: its ``SignedRecordValidator`` learns the run."""
    for validator in getattr(node.protocol.record_validator, "_validators", ()):
        if isinstance(validator, SignedRecordValidator):
            validator.admission = admission


async def _serve_dial_back(_dht, node) -> None:
    """(DHT process) answer ``_DIAL_BACK`` on this node's libp2p daemon until it stops.

    The answer names only the caller's own address, and the connection goes only to the IP the
    caller's connection comes from, at most once per ``_DIAL_BACK_EVERY`` per caller: nobody can
    make a node connect to a third party with it. Served to anyone, in private runs too (it
    reveals nothing about the run)."""
    p2p = node.p2p
    answered: dict[str, float] = {}

    async def dial_back(request: averaging_pb2.AveragingData, context: P2PContext) -> averaging_pb2.AveragingData:
        caller, now = context.remote_id.to_base58(), time.monotonic()
        if now - answered.get(caller, -_DIAL_BACK_EVERY) < _DIAL_BACK_EVERY:
            return averaging_pb2.AveragingData()
        if len(answered) > 4096:  # bounded: forget every caller whose pause is over
            for old in [c for c, t in answered.items() if now - t >= _DIAL_BACK_EVERY]:
                del answered[old]
        answered[caller] = now
        observed = None
        for info in await p2p.list_peers():  # one entry per connection, with its remote address
            if info.peer_id == context.remote_id:
                observed = next((str(a) for a in info.addrs if observed_address(str(a))), None) or observed
        port = int(request.weight) if 0 < request.weight < 65536 else 0
        connected = False
        if observed is not None and port:
            host = observed_address(observed)[0]
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), _DIAL_BACK_SECONDS)
                writer.close()
                connected = True
            except OSError:  # TimeoutError included
                pass
        # the caller as this node sees it (its address) in ``peer_id``; whether it got through in ``weight``
        return averaging_pb2.AveragingData(peer_id=(observed or "").encode(), weight=1.0 if connected else 0.0)

    await p2p.add_protobuf_handler(_DIAL_BACK, dial_back, averaging_pb2.AveragingData)


async def _ask_dial_back(_dht, node, holders: list[str], port: int, timeout: float) -> list[tuple[str, str, bool]]:
    """(DHT process) ask each of ``holders`` (libp2p ids) to dial this node back at ``port``:
    (holder, the address it sees, whether it got through) for each that answered in time."""

    async def ask(holder: str) -> tuple[str, str, bool] | None:
        request = averaging_pb2.AveragingData(weight=float(port))
        try:
            response = await asyncio.wait_for(node.p2p.call_protobuf_handler(
                PeerID.from_base58(holder), _DIAL_BACK, request, averaging_pb2.AveragingData), timeout)
        except Exception:  # an older node, a busy one, or one that is gone: no evidence either way
            return None
        observed = response.peer_id[:256].decode("ascii", errors="replace")
        return (holder, observed, response.weight == 1.0) if observed else None

    answers = await asyncio.gather(*(ask(holder) for holder in holders))
    return [answer for answer in answers if answer is not None]


async def _connected_peers(_dht, node) -> list[str]:
    return list(dict.fromkeys(info.peer_id.to_base58() for info in await node.p2p.list_peers()))


async def _latest_maddrs(_dht, node) -> list[str]:
    return [str(addr) for addr in await node.p2p.get_visible_maddrs(latest=True)]


async def _stored_expiration(_dht, node, key: str) -> float | None:
    found = node.protocol.storage.get(DHTID.generate(source=key))
    return None if found is None else float(found.expiration_time)


class SwarmNode:
    """One DHT node and, once a run is known, one averager on the run's prefix."""

    def __init__(self, *, initial_peers: Sequence[str], host_maddrs: Sequence[str], identity_path: str | None = None,
                 identity: SigningKey | None = None, admission: Admission | None = None, token: bytes = b"",
                 relay: bool = True):
        """``identity``: the peer's signing key, used as its libp2p identity too, so that the libp2p id
        its signed records name follows from their key (``protocol.multiaddr.libp2p_id_of``).
        ``admission``: a private run's gate (``admit`` sets it later when the run is not known yet);
        ``token``: this node's join token for it (the coordinator needs none).
        ``relay``: when libp2p's AutoNAT finds this node behind NAT, reserve a slot on a relay (the
        bootstrap peers first) so that others can dial it through the relay, and punch a hole to
        them from there; a node that AutoNAT finds public relays for others (libp2p's default).
        Off, a NATed node still trains over the connections it opens (``reachability``)."""
        self.averager: _PayloadAverager | None = None
        self.initial_peers = [str(a) for a in initial_peers]
        self.admission, self.token = admission, token
        self._handoff: Path | None = None
        key_folder = None
        if identity is not None:  # handed to the libp2p daemon in a private file, removed once it runs
            key_folder = Path(tempfile.mkdtemp(prefix="barnraise-id-"))
            identity_path = str(key_folder / "libp2p.key")
            descriptor = os.open(identity_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(identity.libp2p_identity())
        try:
            self.dht = hivemind.DHT(
                initial_peers=list(initial_peers),
                host_maddrs=list(host_maddrs),
                identity_path=identity_path,
                check_if_identity_free=identity is None,  # hivemind's check reads RSA identities only
                record_validators=[SignedRecordValidator(admission)],
                use_relay=True,  # dial others through relays (hivemind's default, said here)
                use_auto_relay=relay,
                # fed first as relay candidates; p2pd stops on one it cannot parse, so only checked ones
                trusted_relays=[a for a in self.initial_peers if valid_multiaddr(a)] if relay else None,
                start=True,
            )
        except Exception as error:  # hivemind raises many types when a bootstrap peer is unreachable
            raise TransportError(f"could not join the swarm through {list(initial_peers)}: {error}") from None
        finally:
            if key_folder is not None:
                shutil.rmtree(key_folder, ignore_errors=True)
        if identity is not None and self.p2p_id != libp2p_id_of(identity.public_key_hex):
            self.dht.shutdown()
            raise TransportError(f"the libp2p daemon took id {self.p2p_id}, not the one of this peer's key")
        self.dht.run_coroutine(_serve_dial_back)

    def reachability(self, timeout: float = 8.0) -> Reachability:
        """Whether other peers can dial this node: a few nodes it is connected to (its bootstrap peers
        first) each try to open a new connection to it, and say from where they see it; with the
        node's own addresses (a relay's, once libp2p holds a reservation), one line for the volunteer
        (``peer.reachability.judge``). Takes up to ``timeout`` seconds."""
        addresses = self.dht.run_coroutine(_latest_maddrs)
        port = listen_port(addresses)
        bootstrap = [p for a in self.initial_peers if (p := peer_id_of(a)) is not None]
        connected = self.dht.run_coroutine(_connected_peers)
        holders = [p for p in dict.fromkeys([*bootstrap, *connected]) if p != self.p2p_id][:_DIAL_BACK_ASKED]
        answers = []
        if port is not None and holders:
            answers = self.dht.run_coroutine(partial(_ask_dial_back, holders=holders, port=port, timeout=timeout))
        return judge(addresses=addresses, dial_backs=[DialBack(asked=h, observed=o, connected=c) for h, o, c in answers])

    def admit(self, admission: Admission | None, token: bytes = b"") -> None:
        """The run is known now: gate this node's DHT storage with ``admission`` (None: public) and
        seal this node's records with ``token``. Call before ``start_averager``."""
        self.admission, self.token = admission, token
        self.dht.run_coroutine(partial(_set_admission, admission=admission))

    def present(self, token: bytes) -> None:
        """A renewed join token: sealed into this node's records and carried by its requests from now on."""
        self.token = token
        if self.averager is not None:
            self.averager.present(token)

    def start_averager(
        self,
        *,
        prefix: str,
        payload_limit: int,
        averaging: AveragingConfig,
        state_source: StateSource | None = None,
        client_mode: bool = False,
        blobs: Path | None = None,
        evidence: Path | None = None,
        upload_rate: float | None = None,
        download_rate: float | None = None,
    ) -> None:
        """Start exchanging payloads of up to ``payload_limit`` bytes on ``prefix``; serve
        ``state_source`` to joiners, the run's files in ``blobs`` and this peer's work evidence
        in ``evidence`` (``peer.evidence``); pace traffic to the rates given (bytes per second).

        Call from the main thread: hivemind's averager sets SIGINT to "ignore" in the calling
        process when it starts (so Ctrl+C would stop working); we put the handler back.
        """
        sigint = signal.getsignal(signal.SIGINT)
        try:
            self.averager = _PayloadAverager(
                [torch.zeros(1)],  # hivemind's all-reduce is not used: payloads are fetched by hash
                self.dht,
                start=True,
                prefix=prefix,
                state_compression=NoCompression(),
                allow_state_sharing=False,  # states are served by root to chosen callers (StateServing)
                client_mode=client_mode,
                state_source=state_source,
                payload_limit=payload_limit,
                handoff=self._handoff_folder(),
                kept=(averaging.max_contributors + 1) * _KEPT_ROUNDS,
                blobs=blobs,
                evidence=evidence,
                admission=self.admission,
                token=self.token,
                upload_rate=upload_rate,
                download_rate=download_rate,
            )
        finally:
            signal.signal(signal.SIGINT, sigint)

    def _handoff_folder(self) -> Path:
        """A private folder (in shared memory when there is one) for handing payloads over."""
        if self._handoff is None:
            shm = Path("/dev/shm")
            self._handoff = Path(tempfile.mkdtemp(prefix="barnraise-", dir=shm if shm.is_dir() else None))
        return self._handoff

    def publish_state(self, record: bytes) -> None:
        """The signed progress record of the state this peer serves from now on (``StateSource``)."""
        self._need_averager().publish_record(record)

    def _need_averager(self) -> _PayloadAverager:
        if self.averager is None:
            raise TransportError("the averager has not been started")
        return self.averager

    @property
    def maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def p2p_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def hold_payload(self, payload: bytes, notify: Sequence[str] = ()) -> str:
        """Keep ``payload`` in this peer's store (served by sha256 to anyone) and ask the peers
        ``notify`` (libp2p ids) to fetch a copy now; returns the sha256."""
        return self._need_averager().hold(payload, notify)

    def fetch_blob(self, digest: str, limit: int, holders: Sequence[str], destination: Path, timeout: float,
                   *, by_content: bool = True) -> bool:
        """A blob from the first of ``holders`` that serves it, written to ``destination``
        (``by_content``: checked against ``digest``; False: the caller checks what it is)."""
        return self._need_averager().fetch_blob(digest, limit, holders, destination, timeout, by_content=by_content)

    def fetch_payloads(self, wanted: Sequence[tuple[str, int, Sequence[str]]], timeout: float) -> dict[str, bytes]:
        """Fetch ``(sha256, size, holders)`` payloads (holders: libp2p ids, asked in turn), checked
        against size and sha256; returns those that arrived within ``timeout``, by sha256. Each one
        fetched is kept and served from here too."""
        return self._need_averager().fetch(wanted, timeout)

    def store(self, key: str, value: bytes, *, ttl: float, subkey: str | None = None) -> bool:
        """Store ``value`` (a peer's record under its subkey, sealed with this node's join token in a
        private run; or the manifest)."""
        expiration = get_dht_time() + ttl
        if self.admission is not None and subkey is not None:
            value = seal(value, self.token)
        return bool(self.dht.store(key, value, expiration_time=expiration, subkey=subkey))

    def fetch(self, key: str) -> dict[str, bytes] | bytes | None:
        """Latest value of ``key``: bytes, or for a key with subkeys a map subkey -> bytes (records
        unsealed in a private run: the DHT's validator checked their tokens)."""
        found = self.dht.get(key, latest=True)
        if found is None:
            return None
        value = found.value
        if isinstance(value, dict):
            return self._unsealed({
                str(sub): item.value
                for sub, item in value.items()
                if isinstance(item, ValueWithExpiration) and isinstance(item.value, bytes)
            })
        return value if isinstance(value, bytes) else None

    def _unsealed(self, records: dict[str, bytes]) -> dict[str, bytes]:
        if self.admission is None:
            return records
        out = {}
        for sub, raw in records.items():
            try:
                out[sub] = unseal(raw)[0]
            except MalformedRecord:  # not a private run's record: left out
                continue
        return out

    def fetch_local(self, key: str) -> dict[str, bytes] | bytes | None:
        """What this node itself stores for ``key`` (no network): the DHT keeps every value on its
        ``num_replicas`` (5) nodes nearest to the key, so in a swarm of up to 5 nodes every node holds
        every value, and in a larger one this is part of it, or nothing. Same shape as ``fetch``."""
        value = self.dht.run_coroutine(partial(_stored_value, key=key))
        if isinstance(value, dict):
            return self._unsealed({str(sub): item for sub, item in value.items() if isinstance(item, bytes)})
        return value if isinstance(value, bytes) else None

    def stored_expiration(self, key: str) -> float | None:
        """When the value of ``key`` that this node stores itself expires (Unix time), or None."""
        return self.dht.run_coroutine(partial(_stored_expiration, key=key))

    def state_records(self, holders: Sequence[str], timeout: float) -> dict[str, bytes]:
        """Each of ``holders``' (libp2p ids) current signed progress record, asked directly (those
        that answered within ``timeout``)."""
        return self._need_averager().state_records(holders, timeout)

    def download_state(self, *, root: str, numel: int, donors: Sequence[str],
                       timeout: float) -> tuple[str, bytes, list[torch.Tensor]]:
        """The state of consensus ``root`` (``numel`` parameters and as many momentum values) from
        the first of ``donors`` that serves it whole within the deadline: (donor, its signed record
        bytes, [parameters, momentum]). The caller checks the bytes against ``root``."""
        destination = self._handoff_folder() / f"state-{root[:16]}.bin"
        donor = self._need_averager().fetch_state(root, 8 * numel, donors, destination, timeout)
        if donor is None:
            raise TransportError(f"none of {len(donors)} donors served state {root[:16]} within {timeout:.0f} s")
        flat = torch.empty(2 * numel, dtype=torch.float32)  # read in place: no second copy of the state
        try:
            with destination.open("rb") as handle:
                record = handle.read(int.from_bytes(handle.read(4), "big"))
                got = handle.readinto(memoryview(flat.numpy()).cast("B"))
        finally:
            destination.unlink(missing_ok=True)
        if got != 8 * numel:
            raise TransportError(f"state {root[:16]} from {donor}: {got} bytes, not {8 * numel}")
        return donor, record, [flat[:numel], flat[numel:]]

    def shutdown(self) -> None:
        """Stop the averager and the DHT (and with them the libp2p daemon)."""
        try:
            if self.averager is not None:
                self.averager.shutdown()
        finally:
            self.dht.shutdown()
            if self._handoff is not None:
                shutil.rmtree(self._handoff, ignore_errors=True)

"""The adapter to hivemind: the only module of the peer that imports it.

It speaks Barnraise's types (bytes of signed records, flat tensors, ``AverageOutcome``),
so the round logic never sees hivemind's. The coordinator reuses ``SwarmNode`` through its
own thin adapter (``coordinator/swarm.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError
from protocol.manifest import AveragingConfig

# hivemind logs every failed all-reduce or state download as an exception with a traceback;
# Barnraise reports each round's outcome itself, so hivemind stays quiet unless the user sets
# HIVEMIND_LOGLEVEL (e.g. INFO) to see its own logs.
os.environ.setdefault("HIVEMIND_LOGLEVEL", "CRITICAL")

import hivemind  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.compression import Float16Compression, NoCompression  # noqa: E402
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time  # noqa: E402

__all__ = ["SwarmNode", "AverageOutcome", "StateSource"]

logger = logging.getLogger(__name__)

StateSource = Callable[[], tuple[bytes | None, list[torch.Tensor]]]
"""Returns (signed progress record bytes, state tensors) for a joiner, or (None, [])."""

_CODECS = {"fp16": Float16Compression, "none": NoCompression}


@dataclass(frozen=True)
class AverageOutcome:
    """What one averaging round really did."""

    averaged: torch.Tensor | None
    """The group's mean as received, or None when the round failed."""
    gathered: dict[str, object]
    """Each groupmate's gathered record (untrusted, still to be decoded), by libp2p id."""
    seconds: float
    failure: str | None
    """Why the average did not arrive, or None."""


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


class SwarmNode:
    """One DHT node and, once a run is known, one averager on the run's prefix."""

    def __init__(self, *, initial_peers: Sequence[str], host_maddrs: Sequence[str], identity_path: str | None = None):
        self.averager: _StateSharingAverager | None = None
        self.round_deadline = 0.0
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
        vector_size: int,
        averaging: AveragingConfig,
        state_source: StateSource | None = None,
        client_mode: bool = False,
    ) -> None:
        """Start averaging ``vector_size`` floats on ``prefix``; serve ``state_source`` to joiners.

        Call from the main thread: hivemind's averager sets SIGINT to "ignore" in the calling
        process when it starts (so Ctrl+C would stop working); we put the handler back.
        """
        sigint = signal.getsignal(signal.SIGINT)
        try:
            self.averager = _StateSharingAverager(
                [torch.zeros(max(vector_size, 1))],
                self.dht,
                start=True,
                prefix=prefix,
                target_group_size=averaging.target_group_size,
                min_group_size=averaging.min_group_size,
                min_matchmaking_time=averaging.matchmaking_seconds,
                request_timeout=min(3.0, averaging.matchmaking_seconds),
                allreduce_timeout=averaging.round_deadline_seconds,
                compression=_CODECS[averaging.compression](),
                state_compression=NoCompression(),
                allow_state_sharing=state_source is not None,
                declare_state_period=10.0,
                client_mode=client_mode,
                state_source=state_source,
            )
        finally:
            signal.signal(signal.SIGINT, sigint)
        self.round_deadline = averaging.round_deadline_seconds

    def set_state_priority(self, priority: float) -> None:
        """Joiners download from the peer with the highest priority first (we use the round)."""
        self._need_averager().state_sharing_priority = float(priority)

    def _need_averager(self) -> _StateSharingAverager:
        if self.averager is None:
            raise TransportError("the averager has not been started")
        return self.averager

    @property
    def maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]

    @property
    def p2p_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def average(self, vector: torch.Tensor, *, gather: dict, weight: float, timeout: float) -> AverageOutcome:
        """Average ``vector`` with whoever forms this round's group, within ``timeout`` seconds."""
        started = time.monotonic()
        averager = self._need_averager()
        with averager.get_tensors() as buffers:
            buffers[0].copy_(vector.reshape(-1))
        control = averager.step(gather=gather, weight=weight, timeout=timeout, wait=False)
        try:
            # step's timeout bounds matchmaking only; the all-reduce after it gets its own deadline
            gathered = control.result(timeout=timeout + self.round_deadline)
        except TimeoutError:
            control.cancel()
            return AverageOutcome(None, {}, time.monotonic() - started, "the all-reduce did not finish before its deadline")
        except Exception as error:  # any failed step means the average did not arrive: reported, not hidden
            return AverageOutcome(None, {}, time.monotonic() - started, f"{type(error).__name__}: {error}"[:200])
        seconds = time.monotonic() - started
        if not gathered:
            return AverageOutcome(None, {}, seconds, "no group formed before the deadline")
        with averager.get_tensors() as buffers:
            averaged = buffers[0].clone()
        return AverageOutcome(averaged, {str(k): v for k, v in gathered.items()}, seconds, None)

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

"""Bytes that crossed a network interface during a run, read from the kernel's counters.

    with InterfaceBytes("lo") as counter:
        run_contender()
    print(counter.result.per_peer(4))

On loopback every byte a process sends is transmitted once and received once on ``lo``,
so "bytes on the network" is the transmit delta (the receive delta is the same number) and
the bytes per peer of an N-peer run are ``tx_delta / N``. Everything on the interface
counts: payload, TCP/IP headers, libp2p and DHT chatter, and any other process using the
interface at the same time. On a shared machine run the benchmark in a private network
namespace (``unshare -n sh -c 'ip link set lo up && python ...'``) so that only its own
traffic is counted.

The counters are read from ``/proc/self/net/dev``, which shows the reading process's own
network namespace. ``/sys/class/net/<iface>/statistics`` shows the namespace that mounted
``/sys`` instead (inside ``unshare -n`` it still reports the host's ``lo``), so it is only
offered as ``source="sysfs"`` for the default namespace, where both give the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from protocol.errors import InputError

__all__ = ["ByteCount", "InterfaceBytes", "read_interface_bytes"]

_PROC_NET_DEV = Path("/proc/self/net/dev")
_SYS_CLASS_NET = Path("/sys/class/net")


@dataclass(frozen=True, kw_only=True)
class ByteCount:
    """Bytes counted on one interface between ``start()`` and ``stop()``."""

    interface: str
    tx_bytes: int
    """Bytes transmitted; on loopback, the bytes on the network."""
    rx_bytes: int
    """Bytes received; on loopback equal to ``tx_bytes``."""
    seconds: float
    """Wall time between the two readings."""

    def per_peer(self, peers: int) -> float:
        """Transmitted bytes per peer when ``peers`` processes shared the interface evenly."""
        if peers <= 0:
            raise InputError(f"peers must be positive, not {peers}")
        return self.tx_bytes / peers


def _read_proc(interface: str) -> tuple[int, int]:
    # Lines look like "    lo: RX_bytes packets errs drop fifo frame compressed multicast TX_bytes ..."
    for line in _PROC_NET_DEV.read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == interface:
            values = fields.split()
            return int(values[8]), int(values[0])
    raise InputError(f"no network interface {interface!r} in {_PROC_NET_DEV}")


def _read_sysfs(interface: str) -> tuple[int, int]:
    folder = _SYS_CLASS_NET / interface / "statistics"
    if not folder.is_dir():
        raise InputError(f"no network interface {interface!r} under {_SYS_CLASS_NET}")
    return int((folder / "tx_bytes").read_text()), int((folder / "rx_bytes").read_text())


def read_interface_bytes(interface: str = "lo", source: Literal["proc", "sysfs"] = "proc") -> tuple[int, int]:
    """(tx_bytes, rx_bytes) the kernel has counted on ``interface`` so far."""
    if source == "proc":
        return _read_proc(interface)
    if source == "sysfs":
        return _read_sysfs(interface)
    raise InputError(f"source must be 'proc' or 'sysfs', not {source!r}")


class InterfaceBytes:
    """Diff of an interface's byte counters around a run; a context manager or start()/stop()."""

    def __init__(self, interface: str = "lo", *, source: Literal["proc", "sysfs"] = "proc"):
        self.interface = interface
        self.source: Literal["proc", "sysfs"] = source
        self._start: tuple[int, int, float] | None = None
        self._result: ByteCount | None = None
        read_interface_bytes(interface, source)  # fail now, not after a long run

    def start(self) -> None:
        """Take the first reading (again, if called twice)."""
        tx, rx = read_interface_bytes(self.interface, self.source)
        self._start = (tx, rx, time.monotonic())
        self._result = None

    def stop(self) -> ByteCount:
        """Take the second reading and return the difference."""
        if self._start is None:
            raise InputError("InterfaceBytes.stop() called before start()")
        tx, rx = read_interface_bytes(self.interface, self.source)
        tx0, rx0, t0 = self._start
        self._result = ByteCount(
            interface=self.interface, tx_bytes=tx - tx0, rx_bytes=rx - rx0, seconds=time.monotonic() - t0
        )
        return self._result

    @property
    def result(self) -> ByteCount:
        """The last ``stop()``'s count."""
        if self._result is None:
            raise InputError("InterfaceBytes has no result yet: call stop() or leave the with-block first")
        return self._result

    def __enter__(self) -> InterfaceBytes:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

"""Slow links for a benchmark: one network namespace per peer behind a rate-limited veth.

    with SlowLinks(peers=4, rate_mbit=20) as links:
        run_dataparallel(spec, workdir, launcher=links.launcher, master_addr=links.peer_ips[0],
                         gloo_ifname=links.ns_ifname)
        print(links.peer_bytes())

Layout (root only; ``ip`` and ``tc`` from iproute2)::

    root namespace                              namespace brn{pid}-{i}
    bridge brn{pid}b 10.77.0.1/24 ── brn{pid}v{i} ══ veth ══ slow0 10.77.0.{i+2}/24   (+ lo up)
                                     tbf: to the peer         tbf: from the peer

Each peer's link is shaped in both directions by a token bucket (``tc-tbf``) on the egress of
each end of its veth pair: the namespace end limits what the peer sends, the bridge end what
it receives. Peer-to-peer traffic crosses two shaped links (the sender's and the receiver's),
as between two volunteers on their own home connections. The bridge's address (``host_ip``) is
in the root namespace, so a coordinator started there without a launcher reaches every peer
and every peer reaches it; nothing is routed beyond the bridge's subnet. Loopback inside a
namespace is that namespace's own: a peer cannot reach ``127.0.0.1`` of the root namespace.

Names carry this process's id, so concurrent benchmarks do not collide, and leftovers of a
benchmark process that died without tearing down (its pid is gone) are removed at start.
Teardown always runs on leaving the ``with`` block, error or not, and may run twice: it kills
what still runs inside the namespaces (only the benchmark puts processes there), deletes the
veth pairs, the bridge and the namespaces, then checks that none is left. A SIGTERM does not
run ``__exit__`` by itself: a script turns it into ``SystemExit`` first.

``measure_mbit`` sends TCP bytes from one peer to another (or to the root namespace) for a
few seconds and returns the rate the receiver saw, to check the shaping before a long run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from bench.counters import read_interface_bytes
from protocol.errors import BarnraiseError, DeadlineExceeded, InputError

__all__ = ["SlowLinks", "PeerBytes", "LinkSetupError", "measure_mbit", "remove_leftovers", "NS_IFNAME", "PREFIX",
           "subnet_user"]

PREFIX = "brn"
"""First letters of every namespace and link this module creates (then the owner's pid)."""

NS_IFNAME = "slow0"
"""Name of the peer's end of its veth inside every namespace (e.g. for GLOO_SOCKET_IFNAME)."""

_IP_TIMEOUT_S = 10.0
_SETTLE_S = 5.0  # namespace deletion is asynchronous: links vanish a moment after ``ip netns del``
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)(?:-\d+|v\d+|b)$")


class LinkSetupError(BarnraiseError):
    """A namespace, link or qdisc could not be created (the message names the ``ip``/``tc`` command)."""


@dataclass(frozen=True, kw_only=True)
class PeerBytes:
    """Bytes one peer put on, and took from, its link (IP headers included, counted at the veth)."""

    sent: int
    received: int

    @property
    def total(self) -> int:
        """Bytes in both directions."""
        return self.sent + self.received

    def __sub__(self, other: PeerBytes) -> PeerBytes:
        return PeerBytes(sent=self.sent - other.sent, received=self.received - other.received)


def _run(argv: list[str], *, check: bool = True, timeout_s: float = _IP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s") from None
    if check and done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0]
        raise LinkSetupError(f"`{' '.join(argv)}` failed: {why}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    # Lines look like "brn123-0 (id: 4)" or just "brn123-0".
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def _links() -> list[str]:
    # Lines look like "7: brn123v0@if2: <BROADCAST,...> ..."; the name ends at "@" or ":".
    names = []
    for line in _run(["ip", "-o", "link", "show"]).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _owned_by(name: str, pid: int) -> bool:
    found = _LEFTOVER.match(name)
    return found is not None and int(found.group(1)) == pid


def _tbf(rate_mbit: float, burst_bytes: int, latency_ms: float) -> list[str]:
    return ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes), "latency", f"{latency_ms}ms"]


def subnet_user(network: ipaddress.IPv4Network) -> str | None:
    """``ADDRESS on INTERFACE`` of an address in the root namespace inside ``network``, or None:
    two labs on one subnet would route into each other."""
    for line in _run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines():
        fields = line.split()
        address = fields[fields.index("inet") + 1] if "inet" in fields else ""
        if address and ipaddress.IPv4Interface(address).network.overlaps(network):
            return f"{address} on {fields[1]}"
    return None


class SlowLinks:
    """N peers, each in its own network namespace behind a veth shaped to ``rate_mbit`` both ways.

    ``rate_mbit=None`` builds the same topology without shaping. ``burst_bytes`` (the bucket)
    defaults to 10 ms at the rate, at least 16 KiB; ``latency_ms`` bounds how long a packet may
    queue in the bucket (the queue is ``rate x latency + burst`` bytes; more is dropped).
    """

    _active: ClassVar[set[int]] = set()  # owner pids with a live instance: one per process at a time

    def __init__(self, peers: int, rate_mbit: float | None, *, latency_ms: float = 100.0,
                 burst_bytes: int | None = None, subnet: str = "10.77.0.0/24") -> None:  # fmt: skip
        network = ipaddress.IPv4Network(subnet)
        if not 0 < peers <= network.num_addresses - 3:
            raise InputError(f"SlowLinks: {peers} peers do not fit in {subnet} (bridge, network and broadcast)")
        if rate_mbit is not None and rate_mbit <= 0:
            raise InputError(f"SlowLinks: rate_mbit must be positive or None, not {rate_mbit}")
        if latency_ms <= 0:
            raise InputError(f"SlowLinks: latency_ms must be positive, not {latency_ms}")
        self.peers, self.rate_mbit, self.latency_ms = peers, rate_mbit, latency_ms
        default_burst = int(rate_mbit * 1e6 / 8 * 0.010) if rate_mbit else 0
        self.burst_bytes = burst_bytes if burst_bytes is not None else max(default_burst, 16 * 1024)
        self.network = network
        self.owner = os.getpid()
        self.bridge = f"{PREFIX}{self.owner}b"
        self.namespaces = [f"{PREFIX}{self.owner}-{i}" for i in range(peers)]
        self.host_links = [f"{PREFIX}{self.owner}v{i}" for i in range(peers)]
        self.host_ip = str(network[1])
        """The bridge's address in the root namespace: where a coordinator listens."""
        self.peer_ips = [str(network[i + 2]) for i in range(peers)]
        """Peer i's address, on ``NS_IFNAME`` inside ``namespaces[i]``."""
        self.ns_ifname = NS_IFNAME
        self._entered = False

    def launcher(self, rank: int, argv: list[str]) -> list[str]:
        """``bench.ranks.Launcher``: run ``argv`` inside peer ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[rank], *argv]

    def peer_bytes(self) -> list[PeerBytes]:
        """Bytes each peer has sent and received since the links were built (diff two readings)."""
        counts = []
        for link in self.host_links:
            tx, rx = read_interface_bytes(link)  # the bridge end: what it transmits, the peer receives
            counts.append(PeerBytes(sent=rx, received=tx))
        return counts

    def __enter__(self) -> SlowLinks:
        if os.geteuid() != 0:
            raise InputError("SlowLinks needs root (network namespaces, veth pairs and tc): run it as root")
        if self.owner in SlowLinks._active:
            raise LinkSetupError("SlowLinks: this process already holds slow links; leave that block first")
        remove_leftovers(also_pid=self.owner)
        self._check_subnet_free()
        SlowLinks._active.add(self.owner)
        self._entered = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def _check_subnet_free(self) -> None:
        if (user := subnet_user(self.network)) is not None:
            raise LinkSetupError(f"SlowLinks: {user} already uses {self.network}; pick another subnet")

    def _build(self) -> None:
        prefix = self.network.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.host_ip}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for ns, link, address in zip(self.namespaces, self.host_links, self.peer_ips, strict=True):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", link, "type", "veth", "peer", "name", NS_IFNAME, "netns", ns])
            _run(["ip", "link", "set", link, "master", self.bridge, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{address}/{prefix}", "dev", NS_IFNAME])
            _run(["ip", "-n", ns, "link", "set", NS_IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.rate_mbit is not None:
                shape = _tbf(self.rate_mbit, self.burst_bytes, self.latency_ms)
                _run(["tc", "qdisc", "add", "dev", link, *shape])  # to the peer
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", NS_IFNAME, *shape])  # from it

    def close(self) -> None:
        """Kill what runs in the namespaces, delete links, bridge and namespaces; safe to call again."""
        if not self._entered:
            return
        try:
            _kill_inside(self.namespaces)
            _delete(self.owner)
        finally:
            SlowLinks._active.discard(self.owner)
            self._entered = False


def _kill_inside(namespaces: list[str]) -> None:
    """SIGKILL every process still in these namespaces (the benchmark's own ranks) and wait for them."""
    present = set(_namespaces())
    pids = set()
    for ns in namespaces:
        if ns in present:
            pids.update(int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split())
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    deadline = time.monotonic() + _SETTLE_S
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pids:
        print(f"[netns] killed {len(names)} process(es) left in the namespaces: {sorted(names)}", file=sys.stderr)


def _delete(pid: int) -> None:
    """Delete every link and namespace of owner ``pid``; raise if any is still there after a while."""
    for link in sorted(_links(), key=lambda name: name.endswith("b")):  # veths before the bridge
        if _owned_by(link, pid):
            _run(["ip", "link", "del", link], check=False)  # a veth takes its peer end with it
    for ns in _namespaces():
        if _owned_by(ns, pid):
            _run(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + _SETTLE_S
    while True:
        left = [name for name in (*_links(), *_namespaces()) if _owned_by(name, pid)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise LinkSetupError(f"SlowLinks teardown left {left}; remove them with `ip link del` / `ip netns del`")
        time.sleep(0.1)


def remove_leftovers(also_pid: int | None = None) -> list[int]:
    """Delete links and namespaces of owners that no longer run (and of ``also_pid``); return their pids."""
    owners = set()
    for name in (*_links(), *_namespaces()):
        found = _LEFTOVER.match(name)
        if found is not None:
            owners.add(int(found.group(1)))
    stale = sorted(pid for pid in owners if pid == also_pid or not _pid_alive(pid))
    for pid in stale:
        print(f"[netns] removing leftover links and namespaces of process {pid}", file=sys.stderr)
        _delete(pid)
    return stale


_RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
server.settimeout(float(sys.argv[2]))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
connection.settimeout(float(sys.argv[2]))
count, first, last = 0, None, None
while chunk := connection.recv(1 << 16):
    last = time.monotonic()
    first = first or last
    count += len(chunk)
print(count * 8 / max(last - first, 1e-9) / 1e6 if first else 0.0, flush=True)
"""

_SENDER = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
chunk, end = b"x" * (1 << 16), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    sock.sendall(chunk)
sock.close()
"""


def _read_line(process: subprocess.Popen[str], deadline: float, what: str) -> str:
    if process.stdout is None:
        raise LinkSetupError("measure_mbit: the receiver was started without a stdout pipe")
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line:
                return line.strip()
            break  # end of output: the receiver exited
    raise DeadlineExceeded(f"measure_mbit: the receiver gave no {what} (exit code {process.poll()})")


def measure_mbit(links: SlowLinks, sender: int, receiver: int | None = None, seconds: float = 3.0) -> float:
    """Mbit/s that peer ``receiver`` (None: the root namespace, at ``host_ip``) receives from peer ``sender``.

    One TCP stream for ``seconds``, rated from its first to its last received byte.
    """
    wait_s = seconds + 15.0
    address = links.host_ip if receiver is None else links.peer_ips[receiver]
    receive = [sys.executable, "-c", _RECEIVER, address, str(wait_s)]
    if receiver is not None:
        receive = links.launcher(receiver, receive)
    deadline = time.monotonic() + wait_s
    process = subprocess.Popen(receive, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = _read_line(process, deadline, "port")
        send = links.launcher(sender, [sys.executable, "-c", _SENDER, address, port, str(seconds), str(wait_s)])
        _run(send, timeout_s=wait_s)
        return float(_read_line(process, deadline, "rate"))
    finally:
        process.kill()
        process.wait(timeout=_IP_TIMEOUT_S)

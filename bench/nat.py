"""Home routers for tests and benchmarks: peers behind NAT, each in its own network namespace.

    with NatLab(public=2, nated=2) as lab:
        lab.verify()                       # outbound works, nothing inbound reaches a NATed host
        coordinator = lab.launcher_public(0)([...])
        peer = lab.launcher_nated(1)([...])

Layout (root only; ``ip`` from iproute2 and ``iptables``)::

    root namespace: bridge brx{pid}b 10.78.0.1/24 ("the internet"; the test process looks from here)
      ├─ brx{pid}q{j} ══ wan0 10.78.0.{2+j}   namespace brx{pid}-p{j}: a public host (no default route)
      └─ brx{pid}v{i} ══ wan0 10.78.0.{11+i}  namespace brx{pid}-r{i}: a home router
                          lan0 192.168.{1+i}.1/24, ip_forward=1, MASQUERADE out of wan0,
                          FORWARD drops what comes in on wan0 unless it answers a connection from inside
                            ══ lan0 192.168.{1+i}.2/24  namespace brx{pid}-n{i}: a NATed host,
                                                        default route via its router

A NATed host reaches every public host (its connections leave with its router's address,
10.78.0.{11+i}, and the port the router picks). Nothing reaches it unasked: no public host has a
route to a private net, and a router forwards nothing inbound that is not the answer to a
connection its host opened (a stateful home router, without port forwarding or UPnP). Two NATed
hosts reach each other only through a public host (a relay), or by TCP hole punching (both dial
each other's router address at once, and each router takes the other's SYN as an answer).

Names carry this process's id (prefix ``brx``, apart from ``bench.netns``'s ``brn``), and
leftovers of a process that died without tearing down are removed at start. Teardown always runs
on leaving the ``with`` block, error or not, and may run twice: it kills what still runs inside
the namespaces, deletes the bridge, the links and the namespaces (a router's iptables rules go
with its namespace), then checks that none is left.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from bench.netns import LinkSetupError, _kill_inside, _links, _namespaces, _pid_alive, _run, subnet_user
from protocol.errors import InputError

__all__ = ["NatLab", "Launcher", "PREFIX", "leftovers", "remove_leftovers", "missing_tools", "running_inside"]

PREFIX = "brx"
"""First letters of every namespace and link this module creates (then the owner's pid)."""

Launcher = Callable[[list[str]], list[str]]
"""Wraps an argv so that it runs inside one host's namespace."""

_SETTLE_S = 5.0  # namespace deletion is asynchronous: links vanish a moment after ``ip netns del``
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)(?:-[pnr]\d+|[qv]\d+|b)$")
_PROBE_S = 3.0


def missing_tools() -> list[str]:
    """The commands ``NatLab`` needs that this machine lacks (``ip``, ``iptables``)."""
    found = []
    for tool in ("ip", "iptables"):
        if not any(os.access(os.path.join(folder, tool), os.X_OK)
                   for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]):
            found.append(tool)
    return found


def _owned_by(name: str, pid: int) -> bool:
    found = _LEFTOVER.match(name)
    return found is not None and int(found.group(1)) == pid


class NatLab:
    """``public`` hosts on a shared net and ``nated`` hosts each behind its own NAT router."""

    _active: ClassVar[set[int]] = set()  # owner pids with a live instance: one per process at a time

    def __init__(self, *, public: int, nated: int, subnet: str = "10.78.0.0/24") -> None:
        network = ipaddress.IPv4Network(subnet)
        if network.prefixlen > 24 or not 0 <= public <= 8 or not 0 <= nated <= 8:
            raise InputError(f"NatLab: at most 8 public and 8 NATed hosts on a /24 or wider, not "
                             f"{public} and {nated} on {subnet}")
        self.network, self.owner = network, os.getpid()
        self.bridge = f"{PREFIX}{self.owner}b"
        self.root_ip = str(network[1])
        """The bridge's address in the root namespace (where the test process looks from)."""
        self.public_namespaces = [f"{PREFIX}{self.owner}-p{j}" for j in range(public)]
        self.public_ips = [str(network[2 + j]) for j in range(public)]
        self.router_namespaces = [f"{PREFIX}{self.owner}-r{i}" for i in range(nated)]
        self.router_ips = [str(network[11 + i]) for i in range(nated)]
        """Each router's public address: what public hosts see a NATed host's connections come from."""
        self.nated_namespaces = [f"{PREFIX}{self.owner}-n{i}" for i in range(nated)]
        self.nated_ips = [f"192.168.{1 + i}.2" for i in range(nated)]
        self._entered = False

    def launcher_public(self, j: int) -> Launcher:
        return lambda argv: ["ip", "netns", "exec", self.public_namespaces[j], *argv]

    def launcher_nated(self, i: int) -> Launcher:
        return lambda argv: ["ip", "netns", "exec", self.nated_namespaces[i], *argv]

    def __enter__(self) -> NatLab:
        if os.geteuid() != 0:
            raise InputError("NatLab needs root (network namespaces, veth pairs, iptables): run it as root")
        if missing := missing_tools():
            raise InputError(f"NatLab needs {' and '.join(missing)} (apt-get install iproute2 iptables)")
        if self.owner in NatLab._active:
            raise LinkSetupError("NatLab: this process already holds a lab; leave that block first")
        remove_leftovers(also_pid=self.owner)
        NatLab._active.add(self.owner)
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
        """Two labs (or a lab and ``bench.netns``) on one subnet would route into each other."""
        if (user := subnet_user(self.network)) is not None:
            raise LinkSetupError(f"NatLab: {user} already uses {self.network}; another lab runs, or pick another "
                                 "subnet")

    def _build(self) -> None:
        self._check_subnet_free()
        prefix = self.network.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.root_ip}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for j, (ns, address) in enumerate(zip(self.public_namespaces, self.public_ips, strict=True)):
            self._attach(ns, f"{PREFIX}{self.owner}q{j}", f"{address}/{prefix}")
        for i, (router, host) in enumerate(zip(self.router_namespaces, self.nated_namespaces, strict=True)):
            self._attach(router, f"{PREFIX}{self.owner}v{i}", f"{self.router_ips[i]}/{prefix}")
            _run(["ip", "netns", "add", host])
            _run(["ip", "-n", router, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0", "netns", host])
            _run(["ip", "-n", router, "addr", "add", f"192.168.{1 + i}.1/24", "dev", "lan0"])
            _run(["ip", "-n", router, "link", "set", "lan0", "up"])
            _run(["ip", "-n", host, "addr", "add", f"{self.nated_ips[i]}/24", "dev", "lan0"])
            _run(["ip", "-n", host, "link", "set", "lan0", "up"])
            _run(["ip", "-n", host, "link", "set", "lo", "up"])
            _run(["ip", "-n", host, "route", "add", "default", "via", f"192.168.{1 + i}.1"])
            inside = ["ip", "netns", "exec", router]
            _run([*inside, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            _run([*inside, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"])
            _run([*inside, "iptables", "-A", "FORWARD", "-i", "wan0", "-m", "conntrack",
                  "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"])

    def _attach(self, ns: str, link: str, address: str) -> None:
        """Namespace ``ns`` with its end ``wan0`` of a veth on the bridge, at ``address``."""
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "wan0", "netns", ns])
        _run(["ip", "link", "set", link, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", address, "dev", "wan0"])
        _run(["ip", "-n", ns, "link", "set", "wan0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def verify(self) -> None:
        """Check the NAT: every NATed host connects to the first public host and arrives with its
        router's address; neither the public host nor the root namespace connects to a NATed host,
        at its private address or at its router's. Raises ``LinkSetupError`` naming what failed."""
        if not self.public_namespaces:
            return
        for i, host in enumerate(self.nated_namespaces):
            seen = _probe(self.launcher_nated(i), self.launcher_public(0), self.public_ips[0])
            if seen != self.router_ips[i]:
                raise LinkSetupError(f"NatLab: {host} reached {self.public_ips[0]} as {seen!r}, "
                                     f"not as its router {self.router_ips[i]}")
            for target in (self.nated_ips[i], self.router_ips[i]):
                for name, launcher in (("a public host", self.launcher_public(0)), ("the root namespace", _here)):
                    seen = _probe(launcher, self.launcher_nated(i), target)
                    if seen is not None:
                        raise LinkSetupError(f"NatLab: {name} connected to {host} at {target}: the NAT lets it in")

    def close(self) -> None:
        """Kill what runs in the namespaces, delete bridge, links and namespaces; safe to call again."""
        if not self._entered:
            return
        try:
            _kill_inside([*self.public_namespaces, *self.nated_namespaces, *self.router_namespaces])
            _delete(self.owner)
        finally:
            NatLab._active.discard(self.owner)
            self._entered = False


def _here(argv: list[str]) -> list[str]:
    return argv


_LISTEN = """
import socket, sys
server = socket.create_server(("0.0.0.0", 0))
server.settimeout(float(sys.argv[1]))
print(server.getsockname()[1], flush=True)
try:
    connection, (address, _) = server.accept()
    print(address, flush=True)
except OSError:
    print("-", flush=True)
"""

_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError:
    print("refused")
"""


def _probe(client: Launcher, server: Launcher, address: str) -> str | None:
    """Whether a TCP connection from ``client``'s namespace to ``address`` reaches a listener in
    ``server``'s: the source address the listener saw, or None."""
    listener = subprocess.Popen(server([sys.executable, "-c", _LISTEN, str(_PROBE_S)]), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    try:
        if listener.stdout is None:
            raise LinkSetupError("NatLab: the probe's listener has no stdout")
        port = listener.stdout.readline().strip()
        if not port.isdigit():
            raise LinkSetupError(f"NatLab: the probe's listener did not start (exit code {listener.poll()})")
        tried = _run(client([sys.executable, "-c", _CONNECT, address, port, str(_PROBE_S / 2)]), timeout_s=_PROBE_S + 10)
        if tried.stdout.strip() != "connected":
            return None
        seen = listener.stdout.readline().strip()
        return None if seen in ("", "-") else seen
    finally:
        listener.kill()
        listener.wait(timeout=10)


def _delete(pid: int) -> None:
    """Delete every link and namespace of owner ``pid``; raise if any is still there after a while."""
    for link in sorted(_links(), key=lambda name: name.endswith("b")):  # veths before the bridge
        if _owned_by(link, pid):
            _run(["ip", "link", "del", link], check=False)  # a veth takes its peer end with it
    for ns in _namespaces():
        if _owned_by(ns, pid):
            _run(["ip", "netns", "del", ns], check=False)  # its links and iptables rules go with it
    deadline = time.monotonic() + _SETTLE_S
    while True:
        left = [name for name in (*_links(), *_namespaces()) if _owned_by(name, pid)]
        if not left:
            return
        if time.monotonic() > deadline:
            raise LinkSetupError(f"NatLab teardown left {left}; remove them with `ip link del` / `ip netns del`")
        time.sleep(0.1)


def running_inside(lab: NatLab) -> list[str]:
    """``name (pid)`` of every process running in the lab's namespaces now."""
    present = set(_namespaces())
    found = []
    for ns in [*lab.public_namespaces, *lab.nated_namespaces, *lab.router_namespaces]:
        if ns in present:
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    found.append(f"{Path(f'/proc/{pid}/comm').read_text().strip()} ({pid})")
                except OSError:  # exited meanwhile
                    continue
    return found


def leftovers(pid: int) -> list[str]:
    """Links and namespaces of owner ``pid`` that exist now (a test asserts none after teardown)."""
    return [name for name in (*_links(), *_namespaces()) if _owned_by(name, pid)]


def remove_leftovers(also_pid: int | None = None) -> list[int]:
    """Delete links and namespaces of owners that no longer run (and of ``also_pid``); return their pids."""
    owners = set()
    for name in (*_links(), *_namespaces()):
        found = _LEFTOVER.match(name)
        if found is not None:
            owners.add(int(found.group(1)))
    stale = sorted(pid for pid in owners if pid == also_pid or not _pid_alive(pid))
    for pid in stale:
        print(f"[nat] removing leftover links and namespaces of process {pid}", file=sys.stderr)
        _kill_inside([name for name in _namespaces() if _owned_by(name, pid)])
        _delete(pid)
    return stale

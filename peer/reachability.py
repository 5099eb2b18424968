"""Can other peers dial this machine? One line for the volunteer, from what the swarm saw.

The evidence (gathered by ``peer.swarm.SwarmNode.reachability``):

- dial-backs: other nodes (the bootstrap peers first) tell this peer the address its connection
  to them comes from (``observed``), then open a *new* TCP connection to that address's IP at
  this peer's listen port. A home router without a forwarded port refuses that connection, however
  many connections the peer itself has open; a public address or a forwarded port accepts it.
- this node's own addresses as libp2p announces them: a ``/p2p-circuit`` address means a relay
  holds a reservation for it, so other peers reach it through that relay (libp2p then tries to
  punch a hole for a direct connection).

The verdict, in this order: a dial-back got through → ``direct``; else a relay address → ``relay``;
else some node answered (and could not get through) → ``outbound``: the peer still trains, since
every connection it opens carries streams both ways and its payloads reach other NATed peers
through the dialable peers that fetched them; but a swarm where no peer besides the coordinator
can be dialed does not average (measured: tests/test_nat.py's lab without its public peer). Else
nobody answered → ``unknown``.

Pure: no I/O, no hivemind. The line is built for a volunteer: what it means, what to do.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["DialBack", "Reachability", "judge", "observed_address", "listen_port"]

Verdict = Literal["direct", "relay", "outbound", "unknown"]

_IP4_TCP = re.compile(r"^/ip4/(\d{1,3}(?:\.\d{1,3}){3})/tcp/(\d{1,5})(?:/p2p/[1-9A-HJ-NP-Za-km-z]{1,128})?$")
_RELAYED = re.compile(r"^/ip4/\S+/p2p/([1-9A-HJ-NP-Za-km-z]{1,128})/p2p-circuit(?:/|$)")


@dataclass(frozen=True, kw_only=True)
class DialBack:
    """What one other node reported when asked to reach this peer."""

    asked: str
    """Its libp2p id."""
    observed: str | None
    """``/ip4/A/tcp/P``: where this peer's connection to it comes from (None: it did not say)."""
    connected: bool
    """Whether its new TCP connection to A, at this peer's listen port, got through."""


@dataclass(frozen=True, kw_only=True)
class Reachability:
    """The verdict and the one line that tells the volunteer."""

    verdict: Verdict
    line: str


def observed_address(text: str) -> tuple[str, int] | None:
    """``(ip, port)`` of a plain ``/ip4/A/tcp/P`` multiaddr (optionally ending in ``/p2p/ID``), else None."""
    found = _IP4_TCP.match(text)
    if found is None:
        return None
    try:
        address = ipaddress.IPv4Address(found.group(1))
    except ValueError:
        return None
    port = int(found.group(2))
    return (str(address), port) if 0 < port < 65536 else None


def listen_port(addresses: Sequence[str]) -> int | None:
    """The TCP port of this node's first plain ``/ip4`` address (libp2p listens on one port for all)."""
    for text in addresses:
        if (parsed := observed_address(text)) is not None:
            return parsed[1]
    return None


def _private(addresses: Sequence[str]) -> list[str]:
    """This node's own non-loopback IPv4 addresses, for the port-forwarding advice."""
    found = []
    for text in addresses:
        parsed = observed_address(text)
        if parsed is not None and not ipaddress.IPv4Address(parsed[0]).is_loopback and parsed[0] not in found:
            found.append(parsed[0])
    return found


def judge(*, addresses: Sequence[str], dial_backs: Sequence[DialBack]) -> Reachability:
    """The verdict from this node's own announced ``addresses`` (multiaddrs) and the ``dial_backs``
    other nodes reported (any number, in any order; untrusted: a lying node can only mislead this
    line, and one that says it connected is believed, as the cheaper mistake)."""
    port = listen_port(addresses)
    own = _private(addresses)
    forward = (f"forward TCP port {port} of your router to this machine"
               f"{f' ({own[0]}:{port})' if own else ''} and start with --port {port} so that it stays the same"
               if port is not None else "forward a TCP port of your router to this machine and start with --port N")
    through = next((d for d in dial_backs if d.connected and d.observed and observed_address(d.observed)), None)
    if through is not None and through.observed is not None and (parsed := observed_address(through.observed)):
        dialed = f"/ip4/{parsed[0]}/tcp/{port if port is not None else parsed[1]}"
        return Reachability(verdict="direct", line=f"reachable directly at {dialed}: other peers can dial this machine")
    relays = sorted({m.group(1) for a in addresses if (m := _RELAYED.match(a))})
    if relays:
        return Reachability(verdict="relay", line=(
            f"reachable through a relay ({', '.join(r[-8:] for r in relays)}): fine for training; "
            f"to save the relay hop, {forward}"))
    seen = sorted({d.observed for d in dial_backs if d.observed and observed_address(d.observed)})
    if dial_backs:
        where = f" (seen from outside as {', '.join(seen)})" if seen else ""
        return Reachability(verdict="outbound", line=(
            f"outbound only: other peers cannot dial this machine{where}; it trains over the connections it "
            f"opens, as long as some peers of the swarm can be dialed (or a relay takes it in). To be reachable "
            f"directly, {forward}, or enable UPnP on your router"))
    return Reachability(verdict="unknown", line=(
        "reachability unknown: no peer answered a dial-back (the swarm's peers may run an older version); "
        "training works either way"))

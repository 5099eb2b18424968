"""Which multiaddrs a node may be told to bootstrap from, checked as text.

Peers publish their multiaddrs in signed progress records, but anyone can make a key and sign
one. The coordinator passes the addresses on at ``/bootstrap`` and keeps them in ``swarm.json``.
hivemind parses every bootstrap address before it starts (``DHTNode.create``:
``PeerID.from_base58(Multiaddr(item)["p2p"])``), so one it cannot parse fails the whole join.
A multiaddr is therefore passed on only in one of these forms:

    /ip4/<dotted quad>/tcp/<port>/p2p/<peer id>
    /ip6/<IPv6 address>/tcp/<port>/p2p/<peer id>
    /dns/<host name>/tcp/<port>/p2p/<peer id>           (also /dns4 and /dns6)

- ``<port>`` is 1–65535, in decimal without leading zeros;
- ``<peer id>`` is a base58btc libp2p peer id: a sha2-256 multihash, or an identity multihash of
  at most 42 bytes (how libp2p inlines an Ed25519 or secp256k1 key);
- ``<host name>`` is ASCII letters, digits and inner hyphens, 1–63 per label, at most 253 in all;
  IDN (``xn--``) names are refused rather than checked;
- at most ``MAX_MULTIADDR_CHARS`` characters in all.

Without ``/p2p/<id>`` only where the caller asks (``require_p2p=False``: a node's own listen
address). Everything else is refused. That includes:

- relayed addresses (``…/p2p/<relay>/p2p-circuit/p2p/<target>``): hivemind takes the *first*
  ``/p2p`` id as the peer to bootstrap from, so the node would take the relay, a third party
  the record's signer chose, for the peer. A NATed node's relayed address is reachable through
  the swarm's own connections, and is not offered as a bootstrap address (docs/protocol.md §10.7);
- other transports and protocols (udp, quic, ws, ``/ip6zone``, ``/unix``);
- ``/dnsaddr``, whose TXT records expand into further addresses nobody has checked;
- whitespace, empty components and any character outside ASCII.

``checked_multiaddrs`` applies this to an untrusted list. It keeps at most ``per_peer``
addresses of one peer id and ``limit`` in all, and names each one it leaves out.

Pure: no hivemind, no I/O. The tests check the accepted forms against hivemind's parser.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_MULTIADDR_CHARS",
    "MAX_PER_PEER",
    "BOOTSTRAP_MAX_ADDRESSES",
    "CheckedMultiaddrs",
    "valid_multiaddr",
    "multiaddr_problem",
    "valid_peer_id",
    "peer_id_of",
    "checked_multiaddrs",
    "libp2p_id_of",
]

MAX_MULTIADDR_CHARS = 256
"""No accepted multiaddr is longer (a progress record allows 256 characters per address)."""
MAX_PER_PEER = 4
"""Addresses kept per peer id. A node listening on every interface lists one address per
interface; more than a few from one id only crowd out other peers."""

BOOTSTRAP_MAX_ADDRESSES = 32
"""A coordinator's ``/bootstrap`` lists, and a peer takes from it, at most this many."""

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_VALUE = {char: value for value, char in enumerate(_BASE58)}
_MAX_PEER_ID_CHARS = 64
"""A 44-byte identity multihash is at most 61 base58 characters; a sha2-256 one is 46."""
_SHA2_256, _IDENTITY = 0x12, 0x00
_MAX_INLINE_KEY = 42
"""libp2p inlines a public key in the peer id (identity multihash) only up to 42 bytes."""

_OCTET = re.compile(r"\A(?:0|[1-9][0-9]{0,2})\Z")
_PORT = re.compile(r"\A[1-9][0-9]{0,4}\Z")
_IPV6_CHARS = re.compile(r"\A[0-9A-Fa-f:.]{2,45}\Z")
_LABEL = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


_ED25519_PUBLIC_KEY = bytes([0x08, 0x01, 0x12, 0x20])
"""libp2p's protobuf PublicKey header for an Ed25519 key: Type = 1 (Ed25519), Data of 32 bytes."""


def libp2p_id_of(public_key_hex: str) -> str:
    """The libp2p peer id of an Ed25519 public key (64 hex digits): the identity multihash of the
    key's protobuf encoding, in base58btc ("12D3KooW..."). A peer's libp2p identity is its
    Barnraise signing key (``peer/swarm.py``), so a record's ``p2p_id`` follows from its ``peer_key``."""
    raw = bytes([_IDENTITY, len(_ED25519_PUBLIC_KEY) + 32]) + _ED25519_PUBLIC_KEY + bytes.fromhex(public_key_hex)
    number, text = int.from_bytes(raw, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = _BASE58[digit] + text
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + text


def valid_peer_id(text: object) -> bool:
    """True for a base58btc libp2p peer id: a sha2-256 multihash, or an identity multihash of at
    most 42 bytes."""
    if not isinstance(text, str) or not 0 < len(text) <= _MAX_PEER_ID_CHARS:
        return False
    if any(char not in _BASE58_VALUE for char in text):
        return False
    number = 0
    for char in text:
        number = number * 58 + _BASE58_VALUE[char]
    zeros = len(text) - len(text.lstrip("1"))  # each leading "1" is a zero byte
    raw = bytes(zeros) + number.to_bytes((number.bit_length() + 7) // 8, "big")
    if len(raw) < 2:
        return False
    code, length, digest = raw[0], raw[1], raw[2:]  # both varints are one byte for these codes
    if length != len(digest):
        return False
    return (code == _SHA2_256 and length == 32) or (code == _IDENTITY and 0 < length <= _MAX_INLINE_KEY)


def _valid_ip4(text: str) -> bool:
    octets = text.split(".")
    return len(octets) == 4 and all(_OCTET.match(o) and int(o) <= 255 for o in octets)


def _valid_ip6(text: str) -> bool:
    if not _IPV6_CHARS.match(text):  # ipaddress would also take a "%zone" suffix
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _valid_host_name(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and all(_LABEL.match(label) and label[2:4] != "--" for label in labels)


_HOSTS = {"ip4": _valid_ip4, "ip6": _valid_ip6, "dns": _valid_host_name, "dns4": _valid_host_name,
          "dns6": _valid_host_name}


def valid_multiaddr(text: object, *, require_p2p: bool = True) -> bool:
    """True for ``/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<peer id>`` as the module docstring
    describes it (``/p2p/<peer id>`` may be left out when ``require_p2p`` is False)."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_MULTIADDR_CHARS or not text.isascii():
        return False
    parts = text.split("/")  # "/ip4/h/tcp/p/p2p/id" -> ["", "ip4", "h", "tcp", "p", "p2p", "id"]
    if len(parts) == 7:
        if parts[5] != "p2p" or not valid_peer_id(parts[6]):
            return False
    elif len(parts) != 5 or require_p2p:
        return False
    check_host = _HOSTS.get(parts[1])
    return (parts[0] == "" and check_host is not None and check_host(parts[2])
            and parts[3] == "tcp" and bool(_PORT.match(parts[4])) and int(parts[4]) <= 65535)


def multiaddr_problem(text: str) -> str | None:
    """Why ``text`` is not a multiaddr a node may bootstrap from (``valid_multiaddr``), in a few
    words for a user's one-line error; None when it is one."""
    if valid_multiaddr(text):
        return None
    if not 0 < len(text) <= MAX_MULTIADDR_CHARS or not text.isascii():
        return f"not 1 to {MAX_MULTIADDR_CHARS} ASCII characters"
    parts = text.split("/")
    if parts[0] != "" or parts[1] not in _HOSTS:
        return "it must start with /ip4/, /ip6/, /dns/, /dns4/ or /dns6/"
    if len(parts) < 3 or not _HOSTS[parts[1]](parts[2]):
        return f"/{parts[1]} must be followed by a valid host"
    if len(parts) < 5 or parts[3] != "tcp" or not _PORT.match(parts[4]) or int(parts[4]) > 65535:
        return "the host must be followed by /tcp/PORT (1 to 65535)"
    if len(parts) == 5:
        return "it has no /p2p/<peer id> part"
    if len(parts) != 7 or parts[5] != "p2p":
        return "only /p2p/<peer id> may follow the port"
    return f"{parts[6]!r} is not a libp2p peer id"


def peer_id_of(text: str) -> str | None:
    """The ``/p2p/`` peer id of a valid multiaddr; None when it has none or is not valid."""
    if not valid_multiaddr(text, require_p2p=False):
        return None
    parts = text.split("/")
    return parts[6] if len(parts) == 7 else None


@dataclass(frozen=True)
class CheckedMultiaddrs:
    """What ``checked_multiaddrs`` kept, in the order given, and a short line for each one it
    left out (the address as ``ascii()`` shows it, cut to 80 characters: safe to print)."""

    kept: tuple[str, ...]
    left_out: tuple[str, ...]


def _shown(value: object) -> str:
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checked_multiaddrs(maddrs: Iterable[object], *, limit: int, per_peer: int = MAX_PER_PEER,
                       p2p_id: str | None = None) -> CheckedMultiaddrs:
    """The valid multiaddrs of ``maddrs`` (each with ``/p2p/<id>``), duplicates once, at most
    ``per_peer`` of one peer id and ``limit`` in all, in their order; with ``p2p_id``, only those
    of that peer (a peer's own record may list only its own addresses)."""
    kept: list[str] = []
    left_out: list[str] = []
    per_id: dict[str, int] = {}
    for maddr in maddrs:
        peer = peer_id_of(maddr) if isinstance(maddr, str) else None
        if peer is None:
            left_out.append(f"{_shown(maddr)} (not /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT/p2p/ID)")
        elif p2p_id is not None and peer != p2p_id:
            left_out.append(f"{_shown(maddr)} (not an address of peer {_shown(p2p_id)})")
        elif maddr in kept:
            left_out.append(f"{_shown(maddr)} (listed twice)")
        elif per_id.get(peer, 0) >= per_peer:
            left_out.append(f"{_shown(maddr)} (more than {per_peer} addresses of one peer)")
        elif len(kept) >= limit:
            left_out.append(f"{_shown(maddr)} (more than {limit} addresses in all)")
        else:
            kept.append(maddr)
            per_id[peer] = per_id.get(peer, 0) + 1
    return CheckedMultiaddrs(tuple(kept), tuple(left_out))

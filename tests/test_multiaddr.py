"""Multiaddrs checked before they reach ``/bootstrap``, ``swarm.json`` or a joiner's DHT.

Known answers pin the accepted forms and the hostile ones refused; hypothesis checks that every
address the check accepts is one hivemind parses (the check is pure and does not import it),
and that the coordinator serves and remembers only those.

    pytest -q tests/test_multiaddr.py
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.http import HttpView, build_app
from coordinator.swarm import SwarmMemory
from protocol.multiaddr import (
    BOOTSTRAP_MAX_ADDRESSES,
    MAX_MULTIADDR_CHARS,
    checked_multiaddrs,
    peer_id_of,
    valid_multiaddr,
    valid_peer_id,
)

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58(raw: bytes) -> str:
    number, text = int.from_bytes(raw, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        text = BASE58[digit] + text
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + text


def sha256_id(seed: bytes) -> str:
    return base58(bytes([0x12, 0x20]) + hashlib.sha256(seed).digest())


RSA_ID = "QmSGygx5JKs2aEv7bKvbdSRfrYtXBW5MXjAT5ZV3knkPoe"  # sha2-256 multihash of a key
ED25519_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"  # identity multihash (inlined key)
OTHER_ID = sha256_id(b"other")


@pytest.mark.parametrize("maddr", [
    f"/ip4/203.0.113.5/tcp/41337/p2p/{RSA_ID}",
    f"/ip4/127.0.0.1/tcp/1/p2p/{ED25519_ID}",
    f"/ip4/0.0.0.0/tcp/65535/p2p/{RSA_ID}",
    f"/ip6/::1/tcp/8470/p2p/{RSA_ID}",
    f"/ip6/2001:db8::7/tcp/8470/p2p/{ED25519_ID}",
    f"/ip6/::ffff:192.0.2.1/tcp/8470/p2p/{RSA_ID}",
    f"/dns/coordinator.example.org/tcp/8470/p2p/{RSA_ID}",
    f"/dns4/a-b.example/tcp/8470/p2p/{RSA_ID}",
    f"/dns6/localhost/tcp/8470/p2p/{RSA_ID}",
])
def test_the_accepted_forms(maddr):
    assert valid_multiaddr(maddr)
    assert peer_id_of(maddr) == maddr.rsplit("/", 1)[1]


@pytest.mark.parametrize("maddr", [
    "", "x", "/", f"/p2p/{RSA_ID}", f" /ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}", f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID} ",
    f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}/", f"/ip4/1.2.3.4//tcp/5/p2p/{RSA_ID}", f"ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}\n", f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}\x00",
    "/ip4/1.2.3.4/tcp/5",  # no /p2p: hivemind's DHT needs the id of every bootstrap peer
    f"/ip4/1.2.3.4/udp/5/p2p/{RSA_ID}", f"/ip4/1.2.3.4/udp/5/quic/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4/tcp/5/ws/p2p/{RSA_ID}", f"/dnsaddr/example.org/p2p/{RSA_ID}",
    f"/dnsaddr/example.org/tcp/5/p2p/{RSA_ID}", f"/ip6zone/eth0/ip6/fe80::1/tcp/5/p2p/{RSA_ID}",
    f"/unix/var/run/p2pd.sock/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}/p2p-circuit/p2p/{ED25519_ID}",  # hivemind would take the relay's id
    f"/ip4/1.2.3.4/tcp/5/p2p-circuit/p2p/{ED25519_ID}",
    f"/ip4/1.2.3.4/tcp/0/p2p/{RSA_ID}", f"/ip4/1.2.3.4/tcp/65536/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4/tcp/05/p2p/{RSA_ID}", f"/ip4/1.2.3.4/tcp/+5/p2p/{RSA_ID}", f"/ip4/1.2.3.4/tcp/5_0/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4/tcp/٥/p2p/{RSA_ID}",  # an Arabic-Indic digit: int() would take it
    f"/ip4/01.2.3.4/tcp/5/p2p/{RSA_ID}", f"/ip4/256.2.3.4/tcp/5/p2p/{RSA_ID}", f"/ip4/1.2.3/tcp/5/p2p/{RSA_ID}",
    f"/ip4/1.2.3.4.5/tcp/5/p2p/{RSA_ID}", f"/ip4/::1/tcp/5/p2p/{RSA_ID}", f"/ip6/1.2.3.4/tcp/5/p2p/{RSA_ID}",
    f"/ip6/fe80::1%eth0/tcp/5/p2p/{RSA_ID}", f"/ip6/:::/tcp/5/p2p/{RSA_ID}",
    f"/dns/a_b.example/tcp/5/p2p/{RSA_ID}", f"/dns/-a.example/tcp/5/p2p/{RSA_ID}", f"/dns/a-.example/tcp/5/p2p/{RSA_ID}",
    f"/dns/a..example/tcp/5/p2p/{RSA_ID}", f"/dns/example.org./tcp/5/p2p/{RSA_ID}", f"/dns/{'a' * 64}/tcp/5/p2p/{RSA_ID}",
    f"/dns/xn--bcher-kva.example/tcp/5/p2p/{RSA_ID}", f"/dns/bücher.example/tcp/5/p2p/{RSA_ID}",
    f"/dns/{'.'.join(['a' * 63] * 4)}/tcp/5/p2p/{RSA_ID}",
    "/ip4/1.2.3.4/tcp/5/p2p/", "/ip4/1.2.3.4/tcp/5/p2p/1111", "/ip4/1.2.3.4/tcp/5/p2p/2",
    f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID[:-1]}", f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}1",
    f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID[:-1]}0",  # 0 is not base58
    "/ip4/1.2.3.4/tcp/5/p2p/" + base58(bytes([0x12, 0x20]) + bytes(31)),  # one digest byte short
    "/ip4/1.2.3.4/tcp/5/p2p/" + base58(bytes([0x11, 0x14]) + bytes(20)),  # sha1: not a peer id
    "/ip4/1.2.3.4/tcp/5/p2p/" + base58(bytes([0x00, 43]) + bytes(range(1, 44))),  # too long to be inlined
])
def test_hostile_and_malformed_ones_are_refused(maddr):
    assert not valid_multiaddr(maddr)
    assert peer_id_of(maddr) is None


def test_the_length_cap_and_other_types():
    host = ".".join(["a" * 60] * 3)  # 182 characters, then a last label that reaches the cap
    longest = f"/dns/{host}.{'b' * 11}/tcp/5/p2p/{RSA_ID}"
    assert len(longest) == MAX_MULTIADDR_CHARS and valid_multiaddr(longest)
    assert not valid_multiaddr(f"/dns/{host}.{'b' * 12}/tcp/5/p2p/{RSA_ID}")
    for value in (None, 5, b"/ip4/1.2.3.4/tcp/5", ["/ip4/1.2.3.4/tcp/5"]):
        assert not valid_multiaddr(value)
        assert not valid_multiaddr(value, require_p2p=False)
    assert not valid_peer_id(None) and not valid_peer_id("") and not valid_peer_id("1" * 65)


def test_a_node_s_own_listen_address_may_leave_out_its_id():
    assert valid_multiaddr("/ip4/127.0.0.1/tcp/41337", require_p2p=False)
    assert valid_multiaddr(f"/ip4/127.0.0.1/tcp/41337/p2p/{RSA_ID}", require_p2p=False)
    assert not valid_multiaddr("/ip4/127.0.0.1/tcp/0", require_p2p=False)
    assert not valid_multiaddr("/ip4/127.0.0.1/tcp/41337/p2p", require_p2p=False)
    assert peer_id_of("/ip4/127.0.0.1/tcp/41337") is None


def _hivemind_peer_id(maddr: str) -> str:
    """What hivemind's DHT does with a bootstrap address (``DHTNode.create``)."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    return PeerID.from_base58(Multiaddr(maddr)["p2p"]).to_base58()


_label = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z").filter(lambda label: label[2:4] != "--")
_hosts = st.one_of(
    st.tuples(st.just("ip4"), st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))),
    st.tuples(st.just("ip6"), st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))),
    st.tuples(st.sampled_from(["dns", "dns4", "dns6"]), st.lists(_label, min_size=1, max_size=4).map(".".join)),
)
_peer_ids = st.one_of(
    st.binary(min_size=1, max_size=16).map(sha256_id),
    st.binary(min_size=1, max_size=42).map(lambda key: base58(bytes([0x00, len(key)]) + key)),
)
_maddrs = st.builds(lambda host, port, peer: f"/{host[0]}/{host[1]}/tcp/{port}/p2p/{peer}",
                    _hosts, st.integers(1, 65535), _peer_ids)


@settings(max_examples=300, deadline=None)
@given(_maddrs)
def test_every_generated_well_formed_address_is_accepted_and_hivemind_parses_it(maddr):
    assert valid_multiaddr(maddr)
    assert _hivemind_peer_id(maddr) == peer_id_of(maddr)


@settings(max_examples=400, deadline=None)
@given(_maddrs, st.integers(0, 300), st.characters(codec="utf-8"))
def test_whatever_a_changed_character_makes_the_check_accepts_hivemind_parses(maddr, position, char):
    """Soundness: one character replaced or inserted, anywhere; if the check still passes, hivemind
    takes it (it is never the check that lets an unparsable address through)."""
    position %= len(maddr) + 1
    for changed in (maddr[:position] + char + maddr[position + 1:], maddr[:position] + char + maddr[position:]):
        if valid_multiaddr(changed):
            assert _hivemind_peer_id(changed) == peer_id_of(changed)


def test_checked_multiaddrs_keeps_a_few_per_peer_and_names_each_left_out():
    own = [f"/ip4/10.0.0.{k}/tcp/8470/p2p/{RSA_ID}" for k in range(1, 4)]
    sybil = [f"/ip4/198.51.100.{k}/tcp/1/p2p/{OTHER_ID}" for k in range(1, 9)]
    junk = ["x", None, 7, "/ip4/1.2.3.4/tcp/5", "\x1b[2J" + "y" * 500]
    checked = checked_multiaddrs([*own, junk[0], *sybil, *junk[1:], own[0]], limit=6, per_peer=2)
    assert checked.kept == (own[0], own[1], sybil[0], sybil[1])
    lines = checked.left_out
    assert len(lines) == 1 + 6 + 4 + 1 + 1
    assert sum("more than 2 addresses of one peer" in line for line in lines) == 1 + 6
    assert sum("not /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT/p2p/ID" in line for line in lines) == 5
    assert sum("listed twice" in line for line in lines) == 1
    assert all(line.isascii() and line.isprintable() and len(line) < 160 for line in lines)  # safe to print
    many = [f"/ip4/192.0.2.{k}/tcp/1/p2p/{sha256_id(bytes([k]))}" for k in range(1, 40)]
    capped = checked_multiaddrs(many, limit=BOOTSTRAP_MAX_ADDRESSES)
    assert capped.kept == tuple(many[:BOOTSTRAP_MAX_ADDRESSES])
    assert all("more than 32 addresses in all" in line for line in capped.left_out)
    mine = checked_multiaddrs([own[0], sybil[0]], limit=8, p2p_id=OTHER_ID)
    assert mine.kept == (sybil[0],) and "not an address of peer" in mine.left_out[0]


def _view(bootstrap: list) -> HttpView:
    return HttpView(manifest_bytes=b"", manifest_json={}, public_key_pem=b"", checkpoints=None,
                    ledger_jsonl=lambda: "", status=dict, bootstrap=lambda: bootstrap)


def test_the_coordinator_serves_only_well_formed_bootstrap_addresses():
    own = [f"/ip4/127.0.0.1/tcp/8470/p2p/{RSA_ID}"]
    good = [f"/ip4/192.0.2.{k}/tcp/1/p2p/{sha256_id(bytes([k]))}" for k in range(1, 50)]
    poisoned = own + ["x", f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}/p2p-circuit/p2p/{OTHER_ID}", "/ip4/1.2.3.4/tcp/5"] + good

    async def fetch() -> dict:
        async with TestClient(TestServer(build_app(_view(poisoned)), host="127.0.0.1")) as client:
            response = await client.get("/bootstrap")
            assert response.status == 200
            return await response.json()

    served = asyncio.run(fetch())["maddrs"]
    assert served == own + good[: BOOTSTRAP_MAX_ADDRESSES - 1]
    assert all(_hivemind_peer_id(maddr) for maddr in served)


def test_swarm_json_keeps_only_well_formed_addresses_and_reads_a_poisoned_file(tmp_path):
    path = tmp_path / "swarm.json"
    good = [f"/ip4/192.0.2.{k}/tcp/1/p2p/{sha256_id(bytes([k]))}" for k in range(1, 80)]
    memory = SwarmMemory(path)
    assert (memory.dht_port, memory.peer_maddrs) == (0, [])
    memory.dht_port = 41337
    memory.peer_maddrs = ["x", *good, f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID} "]
    memory.save()
    saved = json.loads(path.read_text())
    assert saved == {"dht_port": 41337, "peer_maddrs": good[:64]}
    assert SwarmMemory(path).peer_maddrs == good[:64]
    # written by hand, an older version, or a disk error: read without what is not well formed
    for content, port in [
        ({"dht_port": 41337, "peer_maddrs": ["x", good[0], 5, None, {"a": 1}]}, 41337),
        ({"dht_port": "41337", "peer_maddrs": good[:1]}, 0),
        ({"dht_port": True, "peer_maddrs": good[:1]}, 0),
        ({"dht_port": 70000, "peer_maddrs": good[:1]}, 0),
        ({"dht_port": -1, "peer_maddrs": good[:1]}, 0),
    ]:
        path.write_text(json.dumps(content))
        memory = SwarmMemory(path)
        assert (memory.dht_port, memory.peer_maddrs) == (port, [good[0]])
    for content in ('{"dht_port": 1, "peer_maddrs": "x"}', "[1, 2]", "not json", "\xff"):
        path.write_text(content)
        assert SwarmMemory(path).peer_maddrs == []

"""The coordinator's adapter to the swarm: a bootstrap DHT node with a stable identity and
port, and a client-mode averager that fetches rounds' payloads (to follow the swarm by replay)
and, as a fallback only, downloads a peer's state."""

from __future__ import annotations

import json
from pathlib import Path

from peer.progress import MANIFEST_KEY, MANIFEST_TTL
from peer.swarm import SwarmNode
from peer.workdir import write_atomic
from protocol.codecs import parse_codec, payload_size
from protocol.errors import TransportError
from protocol.manifest import SignedManifest
from protocol.multiaddr import checked_multiaddrs
from protocol.policy import Admission
from protocol.signing import SigningKey

__all__ = ["start_bootstrap_node", "SwarmMemory", "SWARM_MEMORY_MAX_ADDRESSES"]

SWARM_MEMORY_MAX_ADDRESSES = 64
"""``swarm.json`` keeps at most this many peers' multiaddrs."""


class SwarmMemory:
    """``swarm.json``: the DHT port and the peers last seen, so a relaunch rejoins the swarm.

    The peers' addresses come from records anyone can sign, and a relaunch hands them to hivemind,
    which fails on one it cannot parse: only well-formed multiaddrs (``protocol.multiaddr``), a few
    per peer, are written, and a file holding anything else is read without it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            saved = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            saved = {}
        if not isinstance(saved, dict):
            saved = {}
        port = saved.get("dht_port", 0)
        self.dht_port = port if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535 else 0
        peers = saved.get("peer_maddrs", [])
        self.peer_maddrs = _remembered(peers if isinstance(peers, list) else [])

    def save(self) -> None:
        data = {"dht_port": self.dht_port, "peer_maddrs": _remembered(self.peer_maddrs)}
        write_atomic(self.path, json.dumps(data, indent=1).encode())


def _remembered(maddrs: list) -> list[str]:
    return list(checked_multiaddrs(maddrs, limit=SWARM_MEMORY_MAX_ADDRESSES).kept)


def start_bootstrap_node(workdir: Path, host: str, signed: SignedManifest, vector_size: int,
                         key: SigningKey) -> tuple[SwarmNode, SwarmMemory]:
    """Start the DHT node peers bootstrap from (same identity and port as last time). Its libp2p
    identity is the coordinator's key, so a private run's peers serve it without a join token."""
    memory = SwarmMemory(workdir / "swarm.json")
    host_maddrs = [f"/ip4/{host}/tcp/{memory.dht_port}"]
    admission = Admission.of(signed.manifest)
    try:
        node = SwarmNode(initial_peers=memory.peer_maddrs, host_maddrs=host_maddrs, identity=key, admission=admission)
    except TransportError:
        if not memory.peer_maddrs:
            raise
        # none of the peers seen last time answers: start a fresh swarm on the same identity and port
        node = SwarmNode(initial_peers=[], host_maddrs=host_maddrs, identity=key, admission=admission)
    try:
        manifest = signed.manifest
        node.start_averager(
            prefix=f"{manifest.run_id}_avg",
            payload_limit=payload_size(parse_codec(manifest.config.averaging.codec), vector_size),
            averaging=manifest.config.averaging,
            client_mode=True,
        )
        node.store(MANIFEST_KEY, signed.to_bytes(), ttl=MANIFEST_TTL)
    except BaseException:
        node.shutdown()
        raise
    for maddr in node.maddrs:
        if "/tcp/" in maddr:
            memory.dht_port = int(maddr.split("/tcp/")[1].split("/")[0])
            break
    memory.save()
    return node, memory

"""A private run on loopback: admitted volunteers average; one without a token is refused in one
line; an outsider that goes around the CLI is refused by the DHT and by every peer's RPCs.

    pytest -q tests/test_private_swarm.py        # ~2 minutes on 2 cores
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import SMALL_RUN, http_get, read_rounds, serve_coordinator, wait_until

from peer.progress import progress_key
from peer.rounds import clock_of
from peer.swarm import SwarmNode
from peer.workdir import load_or_create_key
from protocol.manifest import SignedManifest
from protocol.multiaddr import libp2p_id_of
from protocol.policy import Admission
from protocol.records import PeerProgress
from protocol.signing import key_id

pytestmark = pytest.mark.swarm

PRIVATE_RUN = SMALL_RUN + '\n[access]\nmode = "private"\n'


def test_a_private_run_admits_its_volunteers_and_refuses_everyone_else(procs, tmp_path):
    coordinator, url = serve_coordinator(procs, tmp_path, PRIVATE_RUN)
    keys = []
    for name in ("a", "b", "insider"):
        shown = procs.run("peer.cli", "key", "--workdir", tmp_path / name)
        assert shown.returncode == 0 and "barnraise-coordinator admit" in shown.stderr, shown.stderr
        keys.append(shown.stdout.strip())
        admitted = procs.run("coordinator.cli", "admit", keys[-1], "--workdir", tmp_path / "coord")
        assert admitted.returncode == 0 and f"admitted key {key_id(keys[-1])}" in admitted.stdout, admitted.stderr
    peers = [procs.peer(name, url, tmp_path / name) for name in ("a", "b")]

    refused = procs.run("peer.cli", "join", "--coordinator", url, "--workdir", tmp_path / "stranger",
                        "--host", "127.0.0.1", timeout=120)
    refused.assert_one_line_error(2, "is private", "barnraise-coordinator admit")
    assert not (tmp_path / "stranger" / "rounds.jsonl").exists()

    def averaged() -> bool:
        logs = [read_rounds(tmp_path / name) for name in ("a", "b")]
        return all(any(r["failure"] is None and r["contributors"] == 2 for r in log) for log in logs)

    wait_until(averaged, 150, "the admitted peers to average a round", must_run=[coordinator, *peers])

    # an outsider goes around the CLI: its own DHT node, its own averager on the run's prefix
    signed = SignedManifest.from_bytes(http_get(f"{url}/manifest"))
    manifest = signed.verify()
    admission = Admission.of(manifest)
    bootstrap = json.loads(http_get(f"{url}/bootstrap"))["maddrs"]
    outsider_key = load_or_create_key(tmp_path / "outsider.key")
    insider_key = load_or_create_key(tmp_path / "insider" / "peer.key")
    insider_token = http_get(f"{url}/token/{key_id(insider_key.public_key_hex)}")
    nodes = []
    try:
        outsider = SwarmNode(initial_peers=bootstrap, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=outsider_key)
        insider = SwarmNode(initial_peers=bootstrap, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=insider_key,
                            admission=admission, token=insider_token)
        nodes += [outsider, insider]
        for node in nodes:
            node.start_averager(prefix=f"{manifest.run_id}_avg", payload_limit=1 << 20,
                                averaging=manifest.config.averaging)
        targets = [libp2p_id_of(k) for k in keys[:2]]
        assert len(insider.state_records(targets, timeout=10)) == 2, "an admitted caller is served"
        assert outsider.state_records(targets, timeout=10) == {}, "a caller without a token is not"

        clock = clock_of(manifest)
        forged = PeerProgress.signed(
            outsider_key, run_id=manifest.run_id, round=clock.round_at(time.time()), samples=10, loss=1.0,
            samples_per_second=1.0, averaged_with=1, averaged=False, network_seconds=0.0,
            state_root="a" * 64, p2p_id=outsider.p2p_id, maddrs=[], time=time.time())
        outsider.store(progress_key(manifest.run_id), forged.to_bytes(), ttl=60, subkey=forged.peer_id)
        time.sleep(2)
        seen = insider.fetch(progress_key(manifest.run_id)) or {}
        assert forged.peer_id not in seen, "an admitted reader does not see an outsider's record"
        assert {key_id(k) for k in keys[:2]} <= set(seen), f"the admitted peers' records are there: {sorted(seen)}"
        status = json.loads(http_get(f"{url}/status"))
        assert forged.peer_id not in json.dumps(status), "the coordinator does not count the outsider"

        blob = manifest.config.data.index or ""
        assert b"private" in _forbidden(f"{url}/checkpoints/r000000/model.safetensors"), "weights are not served"
        if blob:
            assert b"private" in _forbidden(f"{url}/blobs/{blob.split(':')[1]}")
    finally:
        for node in nodes:
            node.shutdown()


def _forbidden(url: str) -> bytes:
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 403, error.code
        return error.read()
    raise AssertionError(f"{url} was served without a token")

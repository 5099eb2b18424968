"""Spot checks on a live loopback run: two honest peers and one that sends 1.5 times another
member's payload of the round before instead of its own work (``bench.hostile_peer --behaviour
copy``). With ``spot_check_every = 1`` the coordinator replays every member of every round: the
honest peers' rounds pass bitwise, the cheater's copied rounds fail, its credit for them is
withdrawn, the ledger lists the checks (signed), and a kept check reruns to the same verdict."""

from __future__ import annotations

import json
import re

import pytest
from conftest import SMALL_RUN, http_get, serve_coordinator, wait_until

from peer.workdir import load_or_create_key
from protocol.ledger import entries_from_jsonl, verify_chain
from protocol.manifest import SignedManifest
from protocol.signing import key_id

pytestmark = pytest.mark.swarm

RUN = SMALL_RUN + """
[checks]
spot_check_every = 1
"""
RUN = RUN.replace("[averaging]\n", "[averaging]\noverlap = false\n")


def test_a_peer_sending_a_copy_of_anothers_payload_fails_its_spot_checks_and_loses_that_credit(tmp_path, procs):
    coordinator, url = serve_coordinator(procs, tmp_path, RUN)
    manifest = SignedManifest.from_bytes(http_get(f"{url}/manifest")).manifest
    honest = [procs.peer(f"p{i}", url, tmp_path / f"p{i}") for i in (1, 2)]
    cheater = procs.start("cheat", "bench.hostile_peer", "--behaviour", "copy", "join", "--coordinator", url,
                          "--workdir", tmp_path / "cheat", "--host", "127.0.0.1", "--threads", "1")
    everyone = [coordinator, *honest, cheater]

    def ledger():
        entries = entries_from_jsonl(http_get(f"{url}/ledger.jsonl").decode())
        verify_chain(entries, manifest.coordinator_key, run_id=manifest.run_id)
        return entries

    def checks():
        return [c for e in ledger() for c in e.checks]

    wait_until(lambda: {c.verdict for c in checks()} >= {"passed", "failed"}, 240,
               "a ledger entry with a passed and a failed spot check", must_run=everyone)
    cheat_id = key_id(load_or_create_key(tmp_path / "cheat" / "peer.key").public_key_hex)
    lines = coordinator.output()
    failed = [c for c in checks() if c.verdict == "failed"]
    passed = [c for c in checks() if c.verdict == "passed"]
    assert {c.peer_id for c in failed} == {cheat_id}, (failed, cheat_id)  # only the copier fails
    assert {c.peer_id for c in passed} - {cheat_id}, passed  # honest peers' checks pass
    assert all(c.samples > 0 and c.evidence_sha256 for c in failed), failed
    # every honest check passed bitwise (same torch, same CPU), and the failures are far from the line
    assert re.search(r"spot check of round \d+, peer [0-9a-f]{16}: passed \(bitwise\)", lines), lines[-3000:]
    assert re.search(rf"spot check of round \d+, peer {cheat_id}: FAILED \(cosine 0\.[0-8]", lines), lines[-3000:]
    assert not re.search(rf"peer (?!{cheat_id})[0-9a-f]{{16}}: (FAILED|UNANSWERED)", lines), lines[-3000:]
    metrics = http_get(f"{url}/metrics").decode()
    assert re.search(r'barnraise_spot_checks_total\{verdict="failed"\} [1-9]', metrics)

    # the withdrawn samples are not in the cheater's credit: it has less than an honest peer
    head = ledger()[-1]
    credit = {c.peer_id: c.samples for c in head.contributors}
    honest_credit = [s for p, s in credit.items() if p != cheat_id]
    assert honest_credit and credit.get(cheat_id, 0) < min(honest_credit), credit

    # anyone with the files reruns a kept check and reaches the ledger's verdict
    folder = tmp_path / "coord" / "checks" / f"r{failed[0].round:06d}-{failed[0].peer_id}"
    rerun = procs.run("coordinator.cli", "spot-check", "--workdir", tmp_path / "coord", folder, "--format", "json",
                      timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["passed"] is False and result["ledger_verdict"] == "failed" and result["agrees"] is True
    procs.stop(*honest, cheater, coordinator)

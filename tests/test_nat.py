"""Volunteers behind NAT: two peers, each behind its own home router (a network namespace with
iptables MASQUERADE and nothing forwarded inbound), train with a coordinator and a third peer on
the public side and average with all of them every round; each peer says at start whether others
can dial it. First, the reachability line's logic without a network.

    .venv/bin/python -m pytest -q tests/test_nat.py      # ~2 minutes on 2 cores; the swarm part as root
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN, Child, Processes, child_env, close_or_fail, endpoint, read_rounds, wait_until

from peer.reachability import DialBack, judge, listen_port, observed_address

ROUNDS = 7
"""Rounds every peer logs before the swarm is checked."""

PEER_ID = "12D3KooWFJ43qSFydipgza2xW7ujaAjS27RDKBvmMzMkLdFdsBWG"
RELAY_ID = "12D3KooWNfTdUbrhZgevyiSS3JPiJhknf6LwYKxJFydVBsZQ8mHP"
NATED = [f"/ip4/127.0.0.1/tcp/46251/p2p/{PEER_ID}", f"/ip4/192.168.1.2/tcp/46251/p2p/{PEER_ID}"]


def test_a_dial_back_that_got_through_means_reachable_directly():
    backs = [DialBack(asked="a", observed="/ip4/10.78.0.3/tcp/40001", connected=False),
             DialBack(asked="b", observed="/ip4/203.0.113.7/tcp/46251", connected=True)]
    found = judge(addresses=NATED, dial_backs=backs)
    assert found.verdict == "direct"
    assert found.line == "reachable directly at /ip4/203.0.113.7/tcp/46251: other peers can dial this machine"


def test_refused_dial_backs_mean_outbound_only_with_what_to_forward():
    backs = [DialBack(asked="a", observed="/ip4/10.78.0.11/tcp/46251", connected=False),
             DialBack(asked="b", observed="/ip4/10.78.0.11/tcp/46251", connected=False)]
    found = judge(addresses=NATED, dial_backs=backs)
    assert found.verdict == "outbound"
    assert found.line.startswith("outbound only: other peers cannot dial this machine "
                                 "(seen from outside as /ip4/10.78.0.11/tcp/46251); it trains over the connections it opens")
    assert "forward TCP port 46251 of your router to this machine (192.168.1.2:46251)" in found.line
    assert "--port 46251" in found.line and "\n" not in found.line


def test_a_relay_reservation_means_reachable_through_the_relay():
    relayed = [*NATED, f"/ip4/10.78.0.2/tcp/44477/p2p/{RELAY_ID}/p2p-circuit/p2p/{PEER_ID}"]
    refused = [DialBack(asked="a", observed="/ip4/10.78.0.11/tcp/46251", connected=False)]
    for backs in (refused, []):
        found = judge(addresses=relayed, dial_backs=backs)
        assert found.verdict == "relay"
        assert found.line.startswith(f"reachable through a relay ({RELAY_ID[-8:]}): fine for training; "
                                     "to save the relay hop, forward TCP port 46251")


def test_no_answer_is_unknown_and_hostile_answers_are_not_believed_blindly():
    assert judge(addresses=NATED, dial_backs=[]).verdict == "unknown"
    # an answer that names no parseable address cannot make the peer "reachable"
    odd = [DialBack(asked="a", observed="/ip4/999.1.1.1/tcp/5", connected=True),
           DialBack(asked="b", observed="/ip6/::1/tcp/5", connected=True),
           DialBack(asked="c", observed=None, connected=True)]
    found = judge(addresses=NATED, dial_backs=odd)
    assert found.verdict == "outbound" and "seen from outside" not in found.line
    assert judge(addresses=[], dial_backs=odd).line.count("start with --port N") == 1


def test_address_parsing():
    assert observed_address("/ip4/10.0.0.1/tcp/80") == ("10.0.0.1", 80)
    assert observed_address(f"/ip4/10.0.0.1/tcp/80/p2p/{PEER_ID}") == ("10.0.0.1", 80)
    for bad in ("/ip4/10.0.0.1/tcp/0", "/ip4/10.0.0.1/tcp/70000", "/ip4/10.0.0.1/udp/80/quic",
                "/ip4/10.0.0.256/tcp/80", f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY_ID}/p2p-circuit", " /ip4/1.2.3.4/tcp/1"):
        assert observed_address(bad) is None, bad
    assert listen_port(["/ip4/1.2.3.4/udp/9/quic", *NATED]) == 46251
    assert listen_port([]) is None


class NsChild(Child):
    """A child started inside a network namespace (``ip netns exec`` execs it in place, so its pid
    and process group are the Python process's, as for ``Child``)."""

    def __init__(self, name: str, argv: list[str], folder: Path):
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self.killed_on_purpose = False
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder,
                                            env=child_env(), start_new_session=True)
        self.pid = self.process.pid


def _start(processes: Processes, name: str, argv: list[str]) -> Child:
    child = NsChild(name, [str(a) for a in argv], processes.folder)
    processes.children.append(child)
    return child


def _reachability_line(child: Child) -> str:
    found = [line for line in child.output().splitlines()
             if re.search(r"\] (reachable directly|reachable through a relay|outbound only|reachability unknown)", line)]
    assert len(found) == 1, f"{child.name} printed {len(found)} reachability lines\n{child.tail()}"
    return found[0]


@pytest.mark.swarm
def test_peers_behind_nat_average_every_round(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces, veth pairs and iptables NAT rules")
    from bench.nat import NatLab, leftovers, missing_tools, running_inside

    if missing := missing_tools():
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install iproute2 iptables)")
    lab = NatLab(public=2, nated=2)
    processes = Processes(tmp_path)
    try:
        with lab:
            lab.verify()
            (tmp_path / "RUN.toml").write_text(SMALL_RUN)
            coordinator = _start(processes, "coord", lab.launcher_public(0)([
                sys.executable, "-m", "coordinator.cli", "launch", tmp_path / "RUN.toml", "--workdir",
                tmp_path / "coord", "--http-port", "0", "--host", lab.public_ips[0]]))
            url = endpoint(coordinator, tmp_path / "coord")["url"]
            join = [sys.executable, "-m", "peer.cli", "join", "--coordinator", url, "--threads", "1"]
            peers = {"public": _start(processes, "public", lab.launcher_public(1)([
                *join, "--workdir", tmp_path / "public", "--host", lab.public_ips[1]]))}
            for i in range(2):  # listening on every address, as a volunteer's peer does by default
                peers[f"nat{i}"] = _start(processes, f"nat{i}", lab.launcher_nated(i)([
                    *join, "--workdir", tmp_path / f"nat{i}"]))
            wait_until(lambda: all(len(read_rounds(tmp_path / name)) >= ROUNDS for name in peers), 150,
                       f"{ROUNDS} rounds on every peer", must_run=[coordinator, *peers.values()])

            line = _reachability_line(peers["public"])
            assert re.search(rf"\] reachable directly at /ip4/{re.escape(lab.public_ips[1])}/tcp/\d+: ", line), line
            for i in range(2):
                line = _reachability_line(peers[f"nat{i}"])
                router = re.escape(lab.router_ips[i])
                assert re.search(rf"\] (outbound only: .*seen from outside as /ip4/{router}/tcp/\d+|"
                                 r"reachable through a relay)", line), line
            logs = {name: read_rounds(tmp_path / name) for name in peers}
            for name, log in logs.items():
                # every round a peer took part in holds all 3 payloads, its own included (its first
                # round may close before the others joined)
                later = log[1:]
                full = [r for r in later if r["failure"] is None and r["entered"] and r["contributors"] == 3]
                assert full == later, f"{name}: {len(full)} of {len(later)} rounds with all 3: {later}"
            roots: dict[int, set[str]] = {}
            for log in logs.values():
                for r in log:
                    roots.setdefault(r["state_round"], set()).add(r["state_root"])
            assert all(len(found) == 1 for found in roots.values()), f"the consensus forked: {roots}"
            codes = processes.stop(*peers.values(), coordinator, grace=60)
            assert all(code == 0 for code in codes), [c.tail() for c in processes.children]
            deadline = time.monotonic() + 15.0  # torch's shared-memory manager leaves once its clients did
            while (left := running_inside(lab)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not left, f"processes left in the lab's namespaces after every child stopped: {left}"
    finally:
        close_or_fail(processes)
    assert leftovers(os.getpid()) == [], "the NAT lab left namespaces or links behind"

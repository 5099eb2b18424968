"""A hostile volunteer for ``scripts/bench_hostile.py``: a real peer with one behaviour changed.

    python -m bench.hostile_peer --behaviour flip join --coordinator URL --workdir DIR ...

It is ``barnraise-peer`` (same arguments after the behaviour) with one part of it patched, as a
volunteer who edited the code would run it. It signs everything with its own key: what it forges
is content, never another peer's signature.

    flip         sends −Δ (honest norm, wrong sign)
    scale        sends 1000·Δ
    noise        sends Gaussian noise of Δ's norm
    nan          sends a payload of the right size whose content is not finite
    replay       re-sends its first payload in every round
    round        also publishes progress records claiming round 10**9
    future       also publishes progress records signed a year ahead
    base_root    announces its payloads on a consensus root of its own
    equivocate   re-announces another payload (−Δ·1000) for the same round just before the
                 round's last moment, so that readers may see two versions
    spoof        announces with another (honest) peer's libp2p id, notifying no keeper
    poison       serves NaN parameters to joiners, under a record naming the honest root
    endless      serves joiners an endless state stream and payload fetchers an endless stream
    flood        every round stores 500 junk values and 200 sybil-signed progress records
    copy         sends 1.5 times another member's payload of the round before instead of its own Δ
                 (work it did not do: a spot check catches it, docs/protocol.md §10.6)
"""

from __future__ import annotations

import random
import sys
import threading
import time
from typing import AsyncIterator  # noqa: UP035  (hivemind reads typing's name to find stream handlers)

import torch
from hivemind.p2p import P2PContext  # the endless handlers' annotations are read by hivemind
from hivemind.proto import averaging_pb2

BEHAVIOURS = ("flip", "scale", "noise", "nan", "replay", "round", "future", "base_root", "equivocate", "spoof",
              "poison", "endless", "flood", "copy")


def _patch_payloads(behaviour: str) -> None:
    from peer import rounds

    original = rounds.RoundExchanger.announce
    copied: list[torch.Tensor] = []

    if behaviour == "copy":
        original_settle = rounds.RoundExchanger.settle

        def settle(self, round_, state_root, own=None, *args, **kwargs):
            settled = original_settle(self, round_, state_root, own, *args, **kwargs)
            others = [m for m in (settled.decision.members if settled.decision else ()) if m.peer_id != self.peer_id]
            if others:
                got = self.node.fetch_payloads([(others[0].payload_sha256, others[0].payload_size,
                                                 [others[0].p2p_id])], 5.0)
                if others[0].payload_sha256 in got:
                    copied[:] = [rounds.decode(got[others[0].payload_sha256], self.codec, self.numel)]
            return settled

        rounds.RoundExchanger.settle = settle

    def announce(self, work, delta, *, base_root):
        if behaviour == "copy" and copied:
            delta = copied[0] * 1.5
        if behaviour == "flip":
            delta = -delta
        elif behaviour == "scale":
            delta = delta * 1000.0
        elif behaviour == "noise":
            delta = torch.randn_like(delta) * (delta.norm() / max(1.0, delta.numel() ** 0.5))
        elif behaviour == "base_root":
            base_root = f"{random.getrandbits(256):064x}"
        announced = original(self, work, delta, base_root=base_root)
        if behaviour == "equivocate":
            threading.Thread(target=_equivocate, args=(self, work, -delta * 1000.0, base_root), daemon=True).start()
        return announced

    rounds.RoundExchanger.announce = announce


def _equivocate(exchanger, work, other_delta, base_root) -> None:
    """A second announcement of the same round, stored just before its last moment."""
    from peer import rounds
    from protocol.codecs import encode
    from protocol.consensus import announcement_key
    from protocol.records import RoundAnnouncement

    time.sleep(max(0.0, exchanger.clock.latest_announcement(work.round) - 0.3 - time.time()))
    payload = encode(exchanger.codec, other_delta)
    digest = exchanger.node.hold_payload(payload)
    record = RoundAnnouncement.signed(
        exchanger.key, run_id=exchanger.run_id, round=work.round, weight=float(work.samples),
        codec=exchanger.codec.name, payload_size=len(payload), payload_sha256=digest, base_root=base_root,
        loss=work.loss, p2p_id=exchanger.node.p2p_id, time=time.time())
    # a later expiry than the first announcement's (hivemind keeps the entry that expires last)
    ttl = rounds.ANNOUNCE_ROUNDS * exchanger.clock.seconds + 65.0
    if not exchanger.node.store(announcement_key(exchanger.run_id, work.round), record.to_bytes(), ttl=ttl,
                                subkey=exchanger.peer_id):
        print(f"[hostile] round {work.round}: the second announcement was not stored", flush=True)


def _patch_compressed(behaviour: str) -> None:
    """nan, replay, spoof: the payload bytes or the announcement itself."""
    from peer import rounds
    from protocol.codecs import parse_payload
    from protocol.errors import PayloadError

    original_compress = rounds.compress_with_feedback
    first: list[bytes] = []

    def compress(codec, delta, residual, *, decay):
        payload, residual = original_compress(codec, delta, residual, decay=decay)
        if behaviour == "replay":
            first[:] = first or [payload]
            return first[0], residual
        if behaviour == "nan":
            return _not_finite(payload, codec, delta.numel(), parse_payload, PayloadError), residual
        return payload, residual

    rounds.compress_with_feedback = compress
    if behaviour == "nan":
        rounds.decode = lambda payload, codec, numel: torch.zeros(numel)  # its own view of what it sent
    if behaviour == "spoof":
        original_hold = rounds.SwarmNode.hold_payload

        def hold(node, payload, notify=()):
            return original_hold(node, payload, notify=())  # no keeper: only this node holds it

        rounds.SwarmNode.hold_payload = hold
        original_signed = rounds.RoundAnnouncement.signed.__func__

        def signed(cls, key, **fields):
            victims = [h for h in _victims if h != fields.get("p2p_id")]
            if victims:
                fields["p2p_id"] = victims[0]
            return original_signed(cls, key, **fields)

        rounds.RoundAnnouncement.signed = classmethod(signed)


_victims: list[str] = []


def _not_finite(payload: bytes, codec, numel: int, parse, error_type) -> bytes:
    """The payload with a float32 NaN written over 4 of its bytes, from the end back, at the first
    place where the codec's content check refuses it."""
    nan = bytes.fromhex("0000c07f")
    for offset in range(len(payload) - 4, 0, -1):
        candidate = payload[:offset] + nan + payload[offset + 4 :]
        try:
            parse(candidate, codec, numel)
        except error_type:
            return candidate
    return payload


def _patch_progress(behaviour: str) -> None:
    from peer import runner
    from peer.progress import PROGRESS_TTL, progress_key
    from protocol.records import PeerProgress
    from protocol.signing import SigningKey, key_id

    original = runner.PeerProcess._publish
    sybils = [SigningKey.generate() for _ in range(200)] if behaviour == "flood" else []

    def publish(self, *, store=False):
        record = original(self, store=store)
        _victims[:] = [r.p2p_id for r in runner.read_progress(self.node, self.run_id, clock=self.clock).alive()
                       if r.p2p_id != self.node.p2p_id] if behaviour == "spoof" else []
        key = progress_key(self.run_id)
        fields = {f: getattr(record, f) for f in ("run_id", "round", "samples", "loss", "samples_per_second",
                                                  "averaged_with", "averaged", "network_seconds", "state_root",
                                                  "p2p_id", "maddrs", "time")}
        if behaviour == "round":
            forged = PeerProgress.signed(self.key, **fields | {"round": 10**9, "samples": 2**63})
            self.node.store(key, forged.to_bytes(), ttl=PROGRESS_TTL, subkey=self.peer_id)
        elif behaviour == "future":
            forged = PeerProgress.signed(self.key, **fields | {"time": time.time() + 3.2e7})
            self.node.store(key, forged.to_bytes(), ttl=PROGRESS_TTL, subkey=self.peer_id)
        elif behaviour == "flood":
            for index in range(500):
                self.node.store(key, random.randbytes(200), ttl=PROGRESS_TTL, subkey=f"{index:016x}")
            for sybil in sybils:
                forged = PeerProgress.signed(sybil, **fields | {"round": 10**6})
                self.node.store(key, forged.to_bytes(), ttl=PROGRESS_TTL, subkey=key_id(sybil.public_key_hex))
        return record

    runner.PeerProcess._publish = publish


def _patch_state(behaviour: str) -> None:
    from peer import runner, state_rpc

    if behaviour == "poison":
        original = runner.PeerProcess._serve

        def serve(self):
            record, tensors = original(self)
            if not tensors:
                return record, tensors
            poisoned = tensors[0].clone()
            poisoned[::7] = float("nan")
            return record, [poisoned, tensors[1]]

        runner.PeerProcess._serve = serve
    if behaviour == "endless":
        async def endless_state(self, request: averaging_pb2.AveragingData,
                                context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
            chunk = bytes(1 << 20)
            yield averaging_pb2.DownloadData(metadata=self._state_record or b"\x00")
            for _ in range(1 << 16):
                yield averaging_pb2.DownloadData(metadata=chunk)

        state_rpc.StateServing.rpc_state = endless_state
        from peer import swarm

        async def endless_payload(self, request: averaging_pb2.AveragingData,
                                  context: P2PContext) -> AsyncIterator[averaging_pb2.DownloadData]:
            for _ in range(1 << 16):
                yield averaging_pb2.DownloadData(metadata=bytes(1 << 20))

        swarm._PayloadAverager.rpc_payload = endless_payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--behaviour" or argv[1] not in BEHAVIOURS:
        print(f"usage: python -m bench.hostile_peer --behaviour {{{','.join(BEHAVIOURS)}}} join ...", file=sys.stderr)
        return 2
    behaviour = argv[1]
    if behaviour in ("flip", "scale", "noise", "base_root", "equivocate", "copy"):
        _patch_payloads(behaviour)
    if behaviour in ("nan", "replay", "spoof"):
        _patch_compressed(behaviour)
    if behaviour in ("round", "future", "flood", "spoof"):
        _patch_progress(behaviour)
    if behaviour in ("poison", "endless"):
        _patch_state(behaviour)
    from peer.cli import main as peer_main

    return peer_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main())

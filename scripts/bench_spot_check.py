"""Benchmark 9: what a spot check costs the coordinator, against the round it checks.

    PYTHONPATH=. python scripts/bench_spot_check.py --quick    # the default byte GPT-2, 2 rounds
    PYTHONPATH=. python scripts/bench_spot_check.py            # also a 4-layer 256-wide GPT-2, 4 rounds each

For each model: a peer runs synchronous rounds as the runner does (evidence, H inner steps,
compress with feedback), then the coordinator's ``SpotChecker`` replays each round from the
evidence. Prints, per model, the seconds of the peer's round and of the replay (same machine,
one thread each, alternating), the evidence's and the payload's bytes, whether every replay was
bitwise, and one JSON line ``{"bench": "spot_check", ...}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from coordinator.spotcheck import SpotChecker  # noqa: E402
from peer.data import load_corpus  # noqa: E402
from peer.evidence import evidence_bytes  # noqa: E402
from peer.trainer import Trainer  # noqa: E402
from protocol.codecs import compress_with_feedback, parse_codec  # noqa: E402
from protocol.manifest import AveragingConfig, ChecksConfig, ModelConfig, RunConfig, RunManifest  # noqa: E402
from protocol.records import RoundAnnouncement  # noqa: E402
from protocol.signing import SigningKey, key_id  # noqa: E402

MODELS = {"default": ModelConfig(), "wider": ModelConfig(n_embd=256, n_layer=4, n_head=4)}


def measure(name: str, model: ModelConfig, rounds: int) -> dict:
    config = RunConfig(name="bench", model=model, averaging=AveragingConfig(overlap=False),
                       checks=ChecksConfig(spot_check_every=1))
    manifest = RunManifest(config=config, coordinator_key="0" * 64, genesis_root="0" * 64, created_at=0.0)
    corpus = load_corpus(config.data)
    codec = parse_codec(config.averaging.codec)
    key = SigningKey.generate()
    peer = Trainer(manifest, corpus, peer_id=key_id(key.public_key_hex))  # its windows: the announcer's
    checker = SpotChecker(manifest, corpus, None)
    residual = torch.zeros(peer.layout.size)
    round_seconds, replay_seconds, bitwise, sizes = [], [], [], []
    for round_ in range(rounds):
        state = peer.state.copy()
        started = time.perf_counter()
        evidence = evidence_bytes(peer, residual)
        peer.inner_steps(round_)
        payload, residual = compress_with_feedback(codec, peer.outer_gradient(), residual,
                                                   decay=config.averaging.error_feedback_decay)
        round_seconds.append(time.perf_counter() - started)
        announcement = RoundAnnouncement.signed(
            key, run_id="cd" * 8, round=round_, weight=float(config.training.inner_steps * config.training.batch_size),
            codec=codec.name, payload_size=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest(),
            base_root=state.root(peer.layout), loss=1.0, p2p_id="12D3KooWbench", time=1.0)
        started = time.perf_counter()
        replayed = checker.replay(state, announcement, checker.evidence(evidence))
        judgement = checker.judge(replayed, payload, announcement, 0.0)
        replay_seconds.append(time.perf_counter() - started)
        bitwise.append(judgement.bitwise)
        sizes.append((len(evidence), len(payload)))
        peer.advance(None)  # the next round starts at the consensus (an empty round: θ unchanged)
    return {"model": name, "parameters": peer.layout.size, "inner_steps": config.training.inner_steps,
            "round_seconds": statistics.median(round_seconds), "replay_seconds": statistics.median(replay_seconds),
            "replay_over_round": statistics.median(replay_seconds) / statistics.median(round_seconds),
            "evidence_bytes": sizes[-1][0], "payload_bytes": sizes[-1][1], "all_bitwise": all(bitwise),
            "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default model only, 2 rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure("default", MODELS["default"], 2)] if args.quick else [
        measure(name, model, 4) for name, model in MODELS.items()]
    print(f"{'model':8} {'params':>9} {'round s':>8} {'replay s':>9} {'ratio':>6} {'evidence':>10} {'payload':>8} bitwise")
    for r in rows:
        print(f"{r['model']:8} {r['parameters']:>9,} {r['round_seconds']:>8.2f} {r['replay_seconds']:>9.2f} "
              f"{r['replay_over_round']:>6.2f} {r['evidence_bytes']:>10,} {r['payload_bytes']:>8,} {r['all_bitwise']}")
    print(json.dumps({"bench": "spot_check", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

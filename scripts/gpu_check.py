"""Check a peer's training path on a GPU: H inner steps, outer step, state hashing, held-out loss.

    python scripts/gpu_check.py --device cuda --rounds 3

No swarm: each round applies the peer's own outer gradient (a local round), which is the
code path a volunteer's GPU runs between averages. Prints one line per round and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from peer.data import heldout_windows, load_corpus
from peer.model import heldout_loss
from peer.trainer import Trainer
from protocol.manifest import ModelConfig, RunConfig, RunManifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    args = parser.parse_args()
    config = RunConfig(name="gpu-check", model=ModelConfig(n_embd=args.n_embd, n_layer=args.n_layer))
    manifest = RunManifest(config=config, coordinator_key="0" * 64, genesis_root="0" * 64, created_at=0.0)
    corpus = load_corpus(config.data)
    trainer = Trainer(manifest, corpus, peer_id="0" * 16, device=args.device)
    windows = heldout_windows(corpus, config.data)
    start_loss = heldout_loss(trainer.model, windows)
    rounds = []
    for _ in range(args.rounds):
        started = time.monotonic()
        inner = trainer.inner_steps(trainer.state.round)
        trainer.apply_outer(trainer.outer_gradient())
        root = trainer.state.root(trainer.layout)
        rounds.append({"round": trainer.state.round, "loss": inner.loss, "seconds": time.monotonic() - started})
        print(f"round {trainer.state.round}: loss {inner.loss:.3f}, {inner.samples / inner.seconds:.0f} samples/s, root {root[:16]}")
    end_loss = heldout_loss(trainer.model, windows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(json.dumps({"bench": "gpu_check", "device": device_name, "heldout_start": start_loss,
                      "heldout_end": end_loss, "parameters": trainer.layout.size, "rounds": rounds}))


if __name__ == "__main__":
    main()

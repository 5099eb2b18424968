"""Benchmark 7: the bytes per parameter a running peer holds (CPU), measured as a slope.

    PYTHONPATH=. python scripts/bench_peer_memory.py --quick     # Llamas of 2 and 4 layers
    PYTHONPATH=. python scripts/bench_peer_memory.py             # Llamas of 4 and 12 layers (10M, 24M)

For each of two model sizes, a coordinator and one peer run a real run on loopback; after the
peer has settled ``--rounds`` rounds, the proportional set size (PSS, so pages shared between
the peer and its forked helpers count once) of every process in the peer's group is summed.
The difference between the two sizes over the difference in parameters is what the peer holds
per parameter; the fixed part (Python, torch, hivemind, the corpus) cancels. Prints a table and
one JSON line ``{"bench": "peer_memory", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.children import Child  # noqa: E402

_DEADLINE = 600.0


def _pss(pgid: int) -> int:
    """Bytes of PSS summed over the processes of group ``pgid``."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def _rounds(workdir: Path) -> int:
    path = workdir / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _measure(folder: Path, layers: int, rounds: int) -> dict:
    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 384, "intermediate_size": 1024,
              "num_hidden_layers": layers, "num_attention_heads": 6, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": True}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "RUN.toml").write_text(f"""[run]\nname = "memory-{layers}"\n[model]\nfamily = "llama"\n
config = "config.json"\n[data]\nseq_len = 128\n[training]\ninner_steps = 4\nbatch_size = 8\n
[averaging]\nround_seconds = 10.0\nround_deadline_seconds = 30.0\n[checkpoints]\nevery_rounds = 1000\n""")
    coordinator = Child("coordinator", "coordinator.cli", ["launch", str(folder / "RUN.toml"), "--workdir",
                        str(folder / "coord"), "--http-port", "0"], folder / "coordinator.log", echo=False)
    peer = None
    try:
        deadline = time.monotonic() + _DEADLINE
        while not (folder / "coord" / "endpoint.json").exists():
            if time.monotonic() > deadline or not coordinator.running:
                raise RuntimeError(f"the coordinator did not start; see {folder / 'coordinator.log'}")
            time.sleep(0.5)
        url = json.loads((folder / "coord" / "endpoint.json").read_text())["url"]
        peer = Child("peer", "peer.cli", ["join", "--coordinator", url, "--workdir", str(folder / "peer"),
                     "--host", "127.0.0.1", "--threads", "2"], folder / "peer.log", echo=False)
        while _rounds(folder / "peer") < rounds:
            if time.monotonic() > deadline or not peer.running:
                raise RuntimeError(f"the peer did not settle {rounds} rounds; see {folder / 'peer.log'}")
            time.sleep(1.0)
        return {"layers": layers, "parameters": _parameters(config), "pss_bytes": _pss(peer.process.pid)}
    finally:
        if peer is not None:
            peer.stop(grace=60)
        coordinator.stop(grace=30)


def _parameters(config: dict) -> int:
    from peer.model import count_parameters
    from protocol.manifest import ModelConfig

    model = ModelConfig(family="llama", config="sha256:" + "0" * 64, parameters=1)
    return count_parameters(model, json.dumps(config).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llamas of 2 and 4 layers, 2 rounds each")
    parser.add_argument("--layers", type=int, nargs=2, help="the two depths (default 4 12; --quick 2 4)")
    parser.add_argument("--rounds", type=int, help="rounds settled before measuring (default 4; --quick 2)")
    args = parser.parse_args(argv)
    small, large = args.layers or ((2, 4) if args.quick else (4, 12))
    rounds = args.rounds or (2 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        points = [_measure(Path(tmp) / f"l{layers}", layers, rounds) for layers in (small, large)]
    slope = (points[1]["pss_bytes"] - points[0]["pss_bytes"]) / (points[1]["parameters"] - points[0]["parameters"])
    print("| model | parameters | peer PSS |\n|---|---|---|")
    for point in points:
        print(f"| Llama, {point['layers']} layers | {point['parameters']:,} | {point['pss_bytes'] / 2**20:,.0f} MiB |")
    print(f"bytes per parameter a CPU peer holds (slope): {slope:.1f}")
    print(json.dumps({"bench": "peer_memory", "points": points, "bytes_per_parameter": slope}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

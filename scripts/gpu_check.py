"""The prepared check for a lent GPU machine: a real swarm on a ~100M Llama in bf16, against a plain loop.

    python scripts/gpu_check.py                    # on the GPU machine: ~100M Llama, 2 peers, 4 minutes
    python scripts/gpu_check.py --quick --device cpu   # the same steps on a small model, anywhere

1. Checks what it needs (torch with CUDA, transformers, hivemind) and installs the project in
   place (``pip install --no-deps --no-build-isolation -e .``) when ``barnraise`` is not importable.
2. The plain loop: the same Llama, the same batch, bf16 autocast, AdamW, a clip, on the same GPU
   (transformers + torch, nothing else); its samples per second.
3. The swarm: a coordinator and 2 peers with ``--device DEVICE`` on loopback for ``--minutes``;
   each peer's samples per second from its ``rounds.jsonl`` (compute time only), the held-out
   loss by checkpoint, and the audit of the ledger and every checkpoint.

Prints one line per step and one JSON line ``{"bench": "gpu_check", ...}``; exits 1 if the swarm
or the audit failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama shapes on the byte vocabulary (the demo corpus: no tokenizer to ship)
    "full": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14, "num_attention_heads": 12,
             "num_key_value_heads": 4},  # about 100M parameters
    "quick": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},
}


def _ensure_installed() -> None:
    missing = [m for m in ("torch", "transformers", "hivemind", "safetensors", "aiohttp") if not _importable(m)]
    if missing:
        raise SystemExit(f"gpu_check: missing Python packages: {', '.join(missing)} (install them first)")
    if not _importable("coordinator.cli"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "-e", str(ROOT)], check=True, timeout=600)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _plain(config: dict, device: str, batch: int, seq_len: int, steps: int) -> float:
    """Samples per second of a plain transformers + torch loop (bf16 autocast on CUDA)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(keys.pop("model_type"), **keys)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = torch.randint(0, config["vocab_size"], (steps + 3, batch, seq_len + 1), device=device)
    times = []
    for step in range(steps + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=data[step, :, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                     data[step, :, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        if step >= 3:  # the first steps allocate and tune kernels
            times.append(time.perf_counter() - started)
    del model, optimizer
    return batch / statistics.median(times)


def _swarm(folder: Path, config: dict, device: str, batch: int, seq_len: int, minutes: float) -> dict:
    from coordinator.children import Child

    (folder / "config.json").write_text(json.dumps(config))
    (folder / "RUN.toml").write_text(f"""[run]\nname = "gpu-check"\n[model]\nfamily = "llama"\nconfig = "config.json"\n
[data]\nseq_len = {seq_len}\n[training]\ninner_steps = 30\nbatch_size = {batch}\ninner_lr = 3e-4\n
[averaging]\nround_seconds = 20.0\nsettle_seconds = 2.0\nround_deadline_seconds = 60.0\n
[checkpoints]\nevery_rounds = 3\n""")
    coordinator = Child("coordinator", "coordinator.cli", ["launch", str(folder / "RUN.toml"), "--workdir",
                        str(folder / "coord"), "--http-port", "0", "--start-in", "60"], folder / "coordinator.log")
    peers = []
    try:
        deadline = time.monotonic() + 600
        while not (folder / "coord" / "endpoint.json").exists():
            if time.monotonic() > deadline or not coordinator.running:
                raise SystemExit(f"gpu_check: the coordinator did not start; see {folder / 'coordinator.log'}")
            time.sleep(1.0)
        url = json.loads((folder / "coord" / "endpoint.json").read_text())["url"]
        for index in (1, 2):
            peers.append(Child(f"peer-{index}", "peer.cli", ["join", "--coordinator", url, "--workdir",
                               str(folder / f"peer-{index}"), "--host", "127.0.0.1", "--device", device],
                               folder / f"peer-{index}.log"))
        started = time.monotonic()
        while time.monotonic() - started < 60 + minutes * 60:
            if not all(p.running for p in peers):
                break
            time.sleep(2.0)
    finally:
        for peer in peers:
            peer.interrupt()
        for peer in peers:
            peer.stop(grace=120)
        coordinator.stop(grace=60)
    out = {"peers": {}}
    for index in (1, 2):
        log = folder / f"peer-{index}" / "rounds.jsonl"
        rounds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        trained = [r for r in rounds if r["samples"] > 0 and r["compute_seconds"] > 0]
        out["peers"][f"peer-{index}"] = {
            "rounds": len(rounds),
            "averaged": sum(1 for r in rounds if r["failure"] is None and r["contributors"] >= 2),
            "samples_per_second": sum(r["samples"] for r in trained) / max(1e-9, sum(r["compute_seconds"] for r in trained)),
        }
    ledger = folder / "coord" / "ledger.jsonl"
    out["heldout"] = [json.loads(line)["heldout_loss"] for line in ledger.read_text().splitlines()] if ledger.exists() else []
    audit = subprocess.run([sys.executable, "-m", "coordinator.audit", "verify", "--ledger", str(ledger),
                            "--public-key", str(folder / "coord" / "coordinator.pub"), "--checkpoints",
                            str(folder / "coord" / "checkpoints")], capture_output=True, text=True, timeout=600)
    out["audit"] = {"code": audit.returncode, "output": (audit.stdout + audit.stderr).strip()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a small model and 1 minute")
    parser.add_argument("--minutes", type=float, help="swarm minutes after round 0 opens (default 4; --quick 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    _ensure_installed()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (give --device cpu to try it here)")
    from peer.model import count_parameters
    from protocol.manifest import ModelConfig

    config = dict(model_type="llama", vocab_size=256, max_position_embeddings=max(512, args.seq_len),
                  tie_word_embeddings=False, **SIZES["quick" if args.quick else "full"])
    parameters = count_parameters(ModelConfig(family="llama", config="sha256:" + "0" * 64, parameters=1),
                                  json.dumps(config).encode())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"device {name}; Llama with {parameters:,} parameters; batch {args.batch} × {args.seq_len} tokens", flush=True)
    plain = _plain(config, args.device, args.batch, args.seq_len, steps=5 if args.quick else 20)
    print(f"plain transformers + torch loop: {plain:.1f} samples/s", flush=True)
    minutes = args.minutes or (1.0 if args.quick else 4.0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        swarm = _swarm(Path(tmp), config, args.device, args.batch, args.seq_len, minutes)
    for peer, figures in swarm["peers"].items():
        print(f"{peer}: {figures['samples_per_second']:.1f} samples/s while computing, {figures['averaged']} of "
              f"{figures['rounds']} rounds averaged", flush=True)
    together = sum(p["samples_per_second"] for p in swarm["peers"].values())
    swarm["peers_together_vs_plain"] = together / plain
    print(f"the 2 peers together (one device): {together:.1f} samples/s, {together / plain:.1%} of the plain loop",
          flush=True)
    print(f"held-out loss by checkpoint: {swarm['heldout']}")
    print(f"audit: exit {swarm['audit']['code']}: {swarm['audit']['output']}")
    print(json.dumps({"bench": "gpu_check", "device": name, "parameters": parameters, "batch": args.batch,
                      "seq_len": args.seq_len, "plain_samples_per_second": plain, **swarm}))
    ok = swarm["audit"]["code"] == 0 and all(p["averaged"] > 0 for p in swarm["peers"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark 6: one peer's inner loop against a plain transformers + torch loop, same model and batch.

    PYTHONPATH=. python scripts/bench_inner_loop.py --quick      # a 1M Llama, 2 × 4 steps each
    PYTHONPATH=. python scripts/bench_inner_loop.py              # a 12M Llama, 5 × 10 steps each

Both train the same Llama (built from the same config and seed) with AdamW and the same gradient
clip, on the same windows: the plain loop gets them as ready tensors, Barnraise's ``Trainer`` draws
them from a real run's token shards (each shard re-hashed when loaded) and sets the scheduled
learning rate every step. The two alternate, block by block, so both see the same machine; the
ratio of their tokens per second is the inner loop's overhead. Prints a table and one JSON line
``{"bench": "inner_loop", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from coordinator.assets import resolve_run  # noqa: E402
from peer.blobs import BlobCache, BlobStore  # noqa: E402
from peer.data import ShardCorpus  # noqa: E402
from peer.model import transformers_config  # noqa: E402
from peer.trainer import Trainer  # noqa: E402
from protocol.data_index import SignedDataIndex  # noqa: E402
from protocol.manifest import RunConfig, RunManifest, blob_digest  # noqa: E402
from protocol.signing import SigningKey  # noqa: E402

SIZES = {
    "quick": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "full": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
             "num_key_value_heads": 2},
}


def _run(folder: Path, size: dict, seq_len: int, batch: int, steps: int) -> tuple[RunManifest, ShardCorpus, bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tinyrun import stdlib_texts, train_tokenizer

    texts = stdlib_texts(3_000_000)
    (folder / "corpus").mkdir(parents=True)
    (folder / "corpus" / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(texts, folder / "tokenizer.json", vocab=4096)
    config = dict(model_type="llama", vocab_size=4096, max_position_embeddings=max(256, seq_len),
                  tie_word_embeddings=True, **size)
    (folder / "config.json").write_text(json.dumps(config))
    run = RunConfig.from_toml(f"""[run]\nname = "bench"\n[model]\nfamily = "llama"\nconfig = "config.json"\n
[data]\nfiles = ["corpus/*.jsonl"]\ntokenizer = "tokenizer.json"\nseq_len = {seq_len}\nshard_tokens = 262144\n
[training]\ninner_steps = {steps}\nbatch_size = {batch}\nlr_schedule = "cosine"\nwarmup_steps = 10\ntotal_steps = 10000\n""")
    key = SigningKey.generate()
    store = BlobStore(folder / "blobs")
    resolved = resolve_run(run, folder, store, key)
    manifest = RunManifest(config=resolved, coordinator_key=key.public_key_hex, genesis_root="0" * 64, created_at=0.0)
    index = SignedDataIndex.from_bytes(store.read(blob_digest(resolved.data.index), "index")).verify(key.public_key_hex)
    corpus = ShardCorpus(index, BlobCache(store.folder), resolved.data)
    return manifest, corpus, store.read(blob_digest(resolved.model.config), "config")


def _plain(manifest: RunManifest, config_json: bytes, windows: list[torch.Tensor], *, same_loss: bool = False):
    """A plain transformers + torch loop: from_config, AdamW, ``labels=input_ids`` (transformers' own
    shifted loss), clip, step. ``same_loss``: the loss as Barnraise computes it (the logits of the
    first T tokens against the next T), to tell the loop's overhead from the loss's."""
    training = manifest.config.training
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers_config(manifest.config.model, config_json))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.inner_lr, betas=training.inner_betas,
                                  weight_decay=training.inner_weight_decay)

    def block() -> float:
        started = time.perf_counter()
        for batch in windows:
            if same_loss:
                logits = model(input_ids=batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
            else:
                loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
            optimizer.step()
            loss.item()
        return time.perf_counter() - started

    return block


def _barnraise(manifest: RunManifest, corpus: ShardCorpus, config_json: bytes):
    trainer = Trainer(manifest, corpus, "bench-peer", config_json=config_json)
    rounds = iter(range(10**6))

    def block() -> float:
        round_ = next(rounds)
        started = time.perf_counter()
        trainer.inner_steps(round_)
        return time.perf_counter() - started

    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1M model, 2 blocks of 4 steps")
    parser.add_argument("--blocks", type=int, help="measured blocks per contender (default 5; --quick 2)")
    parser.add_argument("--steps", type=int, help="inner steps per block (default 10; --quick 4)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = args.blocks or (2 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="bench-inner-") as tmp:
        manifest, corpus, config_json = _run(Path(tmp), SIZES["quick" if args.quick else "full"], args.seq_len,
                                             args.batch, steps)
        peer = "bench-peer"
        windows = [corpus.batch(manifest.config.data, args.batch, peer_id=peer, round=0, step=k) for k in range(steps)]
        contenders = {"plain transformers + torch": _plain(manifest, config_json, windows),
                      "plain, Barnraise's loss": _plain(manifest, config_json, windows, same_loss=True),
                      "barnraise Trainer.inner_steps": _barnraise(manifest, corpus, config_json)}
        for block in contenders.values():
            block()  # warm-up: allocations, AdamW state, first shard loads
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(blocks):
            for name, block in contenders.items():
                times[name].append(block())
    tokens = steps * args.batch * args.seq_len
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    plain, same, ours = (rates[k] for k in ("plain transformers + torch", "plain, Barnraise's loss",
                                            "barnraise Trainer.inner_steps"))
    parameters = manifest.config.model.parameters
    print(f"Llama, {parameters:,} parameters; batch {args.batch} × {args.seq_len} tokens; {steps} steps a block, "
          f"median of {blocks} blocks; {args.threads} threads")
    print("| loop | tokens/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")
    print(f"barnraise / plain: {ours / plain:.3f}; barnraise / plain with the same loss: {ours / same:.3f} "
          f"(the inner loop's overhead: {1 - ours / same:+.1%})")
    print(json.dumps({"bench": "inner_loop", "parameters": parameters, "batch": args.batch, "seq_len": args.seq_len,
                      "steps": steps, "blocks": blocks, "tokens_per_second": rates, "ratio": ours / plain, "ratio_same_loss": ours / same,
                      "seconds": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

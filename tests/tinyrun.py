"""Tiny real runs for tests: a transformers config, a BPE tokenizer trained here, a JSON Lines corpus.

Everything is made from the standard library's own source text, so nothing is downloaded.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                "sliding_window": None, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
}
VOCAB = 512


def stdlib_texts(limit: int = 1_500_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= limit:
            break
    return texts


def train_tokenizer(texts: list[str], path: Path, vocab: int = VOCAB) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def make_run(folder: Path, family: str = "llama", *, name: str | None = None, extra: str = "",
             limit: int = 1_500_000) -> Path:
    """``folder/RUN.toml`` of a tiny ``family`` run on a 3-file corpus with its own BPE; returns its path."""
    texts = stdlib_texts(limit)
    (folder / "corpus").mkdir(parents=True, exist_ok=True)
    for part in range(3):
        with (folder / "corpus" / f"part-{part}.jsonl").open("w", encoding="utf-8") as out:
            for text in texts[part::3]:
                out.write(json.dumps({"text": text}) + "\n")
    train_tokenizer(texts, folder / "tok" / "tokenizer.json")
    config = dict(TINY_CONFIGS[family], vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    (folder / "model").mkdir(exist_ok=True)
    (folder / "model" / "config.json").write_text(json.dumps(config, indent=2))
    run = folder / "RUN.toml"
    run.write_text(f"""\
[run]
name = "{name or 'tiny-' + family}"

[model]
family = "{family}"
config = "model/config.json"

[data]
files = ["corpus/*.jsonl"]
tokenizer = "tok/tokenizer.json"
seq_len = 64
shard_tokens = 65536
eval_windows = 32

[training]
inner_steps = 10
batch_size = 8

[averaging]
round_seconds = 6.0
round_deadline_seconds = 20.0

[checkpoints]
every_rounds = 3
{extra}""")
    return run

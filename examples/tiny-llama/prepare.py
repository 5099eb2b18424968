"""Build the tiny Llama example's corpus and BPE tokenizer from text this machine already has.

    python examples/tiny-llama/prepare.py            # writes corpus/ and tokenizer/ next to this file
    python examples/tiny-llama/prepare.py --source DIR --vocab 2048

The corpus is the Python standard library's own source text (or any folder of text files given
with ``--source``), one JSON Lines record per file, split into a few files; the tokenizer is a
byte-level BPE trained on that text with Hugging Face ``tokenizers``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent


def _texts(source: Path, suffixes: tuple[str, ...], limit: int) -> list[tuple[str, str]]:
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}
    out, total = [], 0
    for path in sorted(source.rglob("*"), key=lambda p: p.relative_to(source).as_posix()):
        if not path.is_file() or path.suffix not in suffixes or skip.intersection(path.relative_to(source).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append((path.relative_to(source).as_posix(), text))
        total += len(text)
        if total >= limit:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="folder of text files (default: the Python standard library)")
    parser.add_argument("--suffix", action="append", help="file suffixes to take (default: .py)")
    parser.add_argument("--megabytes", type=float, default=6.0, help="text to take (default 6 MB)")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (default 2048)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for corpus/ and tokenizer/")
    args = parser.parse_args(argv)
    texts = _texts(args.source, tuple(args.suffix or [".py"]), int(args.megabytes * 1e6))
    if not texts:
        parser.error(f"no text files under {args.source}")
    corpus = args.out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    parts = 4
    for part in range(parts):
        with (corpus / f"part-{part}.jsonl").open("w", encoding="utf-8") as out:
            for name, text in texts[part::parts]:
                out.write(json.dumps({"text": text, "source": name}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((text for _, text in texts), trainer=trainer)
    (args.out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer" / "tokenizer.json"))
    size = sum(len(t) for _, t in texts)
    print(f"wrote {len(texts)} documents ({size / 1e6:.1f} MB) to {corpus} and a {tokenizer.get_vocab_size()}-token "
          f"BPE tokenizer to {args.out / 'tokenizer' / 'tokenizer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``barnraise-coordinator export``: a recorded checkpoint as a Hugging Face model folder.

    barnraise-coordinator export --workdir barnraise-run [--round N] OUT

OUT gets ``config.json``, ``model.safetensors`` (the checkpoint's own tensors, by their
transformers names, so its canonical root is the one the ledger signed), ``generation_config.json``,
the tokenizer (``tokenizer.json`` and ``tokenizer_config.json``), ``README.md`` (a model card: the
run, the ledger entry, the root, the held-out loss, the contributors, and the audit command) and
``barnraise.json`` (the same facts for tools). ``AutoModelForCausalLM.from_pretrained(OUT)`` and
``AutoTokenizer.from_pretrained(OUT)`` load it; ``barnraise-audit verify --export OUT`` checks it.

Before anything is written, the ledger's chain and signatures and the checkpoint's files are
verified; the folder is written under a temporary name and renamed into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from coordinator.audit import hash_safetensors_file, verify_checkpoint_files
from peer.blobs import BlobStore
from peer.model import transformers_config
from protocol.data_index import SignedDataIndex
from protocol.errors import HashMismatch, InputError
from protocol.ledger import checkpoint_dir_name, entries_from_jsonl, verify_chain
from protocol.manifest import RunManifest, SignedManifest, blob_digest, is_blob_ref
from protocol.records import LedgerEntry
from protocol.signing import key_id

__all__ = ["ExportSummary", "export_checkpoint", "byte_tokenizer_json", "EXPORT_RECORD", "read_run"]

EXPORT_RECORD = "barnraise.json"
"""The export's record of where its weights come from (read by ``barnraise-audit verify --export``)."""


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    entry: LedgerEntry
    run_name: str


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (what the ``ByteLevel`` pre-tokenizer maps bytes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> bytes:
    """A ``tokenizers`` file whose token id is the byte's value: the byte vocabulary as a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str().encode()


def read_run(workdir: Path) -> tuple[RunManifest, list[LedgerEntry]]:
    """A coordinator workdir's manifest and ledger, both verified under the manifest's key."""
    path = workdir / "manifest.msgpack"
    if not path.is_file():
        raise InputError(f"{workdir} holds no launched run (no manifest.msgpack)")
    manifest = SignedManifest.from_bytes(path.read_bytes())
    manifest = manifest.verify(manifest.manifest.coordinator_key)
    ledger_path = workdir / "ledger.jsonl"
    if not ledger_path.is_file():
        raise InputError(f"{workdir} has no ledger.jsonl")
    entries = entries_from_jsonl(ledger_path.read_text(encoding="utf-8"))
    verify_chain(entries, manifest.coordinator_key, run_id=manifest.run_id)
    return manifest, entries


def _pick(entries: list[LedgerEntry], round: int | None) -> LedgerEntry:
    if round is None:
        return entries[-1]
    for entry in entries:
        if entry.round == round:
            return entry
    rounds = ", ".join(str(e.round) for e in entries[-8:])
    raise InputError(f"the ledger has no checkpoint of round {round} (latest rounds: {rounds})")


def _tokenizer_files(manifest: RunManifest, blobs: BlobStore, context: int) -> tuple[bytes, dict, int | None]:
    """tokenizer.json, tokenizer_config.json's keys, and the documents' separator id (None: none)."""
    data = manifest.config.data
    special: dict[str, str] = {}
    separator = None
    if data.tokenizer == "bytes":
        tokenizer_json = byte_tokenizer_json()
    else:
        tokenizer_json = blobs.read(blob_digest(data.tokenizer), "the tokenizer")
        if data.index:
            index = SignedDataIndex.from_bytes(blobs.read(blob_digest(data.index), "the data index"))
            index = index.verify(manifest.coordinator_key)
            if index.separator >= 0:
                from tokenizers import Tokenizer

                token = Tokenizer.from_str(tokenizer_json.decode()).id_to_token(index.separator)
                special = {"eos_token": token, "bos_token": token, "pad_token": token}
                separator = index.separator
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context, **special}
    return tokenizer_json, config, separator


def _model_card(manifest: RunManifest, entry: LedgerEntry, record: dict) -> str:
    config, loss = manifest.config, entry.heldout_loss
    unit = "nats per byte" if config.data.tokenizer == "bytes" else "nats per token"
    return f"""---
library_name: transformers
tags: [barnraise, causal-lm, {config.model.family}]
---

# {config.name}

A {config.model.family} causal language model with {config.model.parameters or record['parameters']:,} parameters,
trained together by the volunteers of a Barnraise run.

| | |
|---|---|
| run | `{config.name}` (id `{manifest.run_id}`) |
| ledger entry | {entry.seq}, round {entry.round}, entry hash `{record['entry_hash']}` |
| checkpoint root | `{entry.checkpoint_root}` |
| held-out loss | {'not finite' if loss is None else f'{loss:.4f} {unit}'} |
| contributors | {len(entry.contributors)} volunteers' keys credited, {entry.total_samples:,} training samples |
| coordinator key | `{manifest.coordinator_key}` (key id `{key_id(manifest.coordinator_key)}`, as `barnraise-audit` prints it) |

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

## Verify it

The weights in `model.safetensors` hash (canonical root, see Barnraise's docs/protocol.md) to the
root the run's coordinator signed into its ledger. With the run's `ledger.jsonl` and
`coordinator.pub`:

```
barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --export PATH
```

It exits 0 only if the chain of signed entries holds and this folder's weights are entry {entry.seq}'s.
"""


def export_checkpoint(workdir: Path, out: Path, round: int | None = None) -> ExportSummary:
    """Write the ledger's checkpoint of ``round`` (default: the latest) of the run in ``workdir`` to ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder")
    manifest, entries = read_run(workdir)
    entry = _pick(entries, round)
    checkpoints = workdir / "checkpoints"
    verify_checkpoint_files(entry, checkpoints)
    blobs = BlobStore(workdir / "blobs")
    model = manifest.config.model
    config_json = blobs.read(blob_digest(model.config), "the model config") if is_blob_ref(model.config) else None
    hf_config = transformers_config(model, config_json)
    tensors = load_file(str(checkpoints / checkpoint_dir_name(entry) / "model.safetensors"))
    context = next((getattr(hf_config, k) for k in ("max_position_embeddings", "n_positions") if hasattr(hf_config, k)),
                   manifest.config.data.seq_len)
    tokenizer_json, tokenizer_config, separator = _tokenizer_files(manifest, blobs, context)
    record = {
        "run_name": manifest.config.name, "run_id": manifest.run_id, "coordinator_key": manifest.coordinator_key,
        "entry_seq": entry.seq, "entry_hash": entry.entry_hash, "round": entry.round,
        "checkpoint_root": entry.checkpoint_root, "heldout_loss": entry.heldout_loss,
        "total_samples": entry.total_samples, "parameters": sum(t.numel() for t in tensors.values()),
    }
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with torch.device("meta"):  # the class transformers picks for this config, without its weights
            hf_config.architectures = [type(AutoModelForCausalLM.from_config(hf_config)).__name__]
        hf_config.save_pretrained(partial)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(partial / "model.safetensors"),
                  metadata={"format": "pt", "barnraise_run": manifest.run_id, "barnraise_entry": str(entry.seq)})
        ends = separator if separator is not None else hf_config.eos_token_id  # documents end with it
        generation = GenerationConfig(bos_token_id=ends if separator is not None else hf_config.bos_token_id,
                                      eos_token_id=ends, pad_token_id=ends)
        generation.save_pretrained(partial)
        (partial / "tokenizer.json").write_bytes(tokenizer_json)
        (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (partial / "README.md").write_text(_model_card(manifest, entry, record))
        (partial / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if hash_safetensors_file(partial / "model.safetensors").root != entry.checkpoint_root:
            raise HashMismatch(f"the exported weights do not hash to ledger entry {entry.seq}'s root")
        for written in partial.iterdir():  # safetensors writes 0600; a model folder is for sharing
            written.chmod(0o644)
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ExportSummary(out, entry, manifest.config.name)

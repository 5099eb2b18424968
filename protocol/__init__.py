"""Barnraise's protocol: what travels between peers and what is signed. Pure: no I/O.

Modules: ``errors`` (the exception tree), ``wire`` (the msgpack codec), ``signing``
(Ed25519), ``manifest`` (the run manifest), ``records`` (peer progress, ledger entries),
``hashing`` (canonical checkpoint hash), ``ledger`` (chain rules).

The names below are imported on first use, not when ``protocol`` is: ``hashing`` and
``manifest`` need torch, and ``barnraise-audit``, which imports ``protocol.ledger`` and
``protocol.signing``, runs without it (the light install, docs/auditor.md).
"""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives, so that ``from protocol import X`` imports X's module alone.
_SOURCES = {
    "protocol.errors": ("BarnraiseError", "ChainError", "ConfigError", "DeadlineExceeded", "HashMismatch",
                        "InputError", "MalformedRecord", "SignatureError", "TransportError", "VerificationError"),
    "protocol.hashing": ("CHECKPOINT_DIGEST", "checkpoint_root", "tensor_digest", "tensor_digests"),
    "protocol.ledger": ("entries_from_jsonl", "entry_to_json", "next_entry", "verify_chain"),
    "protocol.manifest": ("RunConfig", "RunManifest", "SignedManifest"),
    "protocol.records": ("Contribution", "FileRecord", "LedgerEntry", "PeerProgress"),
    "protocol.signing": ("SigningKey", "key_id"),
    "protocol.wire": ("PROTOCOL_VERSION",),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [name for names in _SOURCES.values() for name in names]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""Barnraise's protocol: what travels between peers and what is signed. Pure: no I/O.

Modules: ``errors`` (the exception tree), ``wire`` (the msgpack codec), ``signing``
(Ed25519), ``manifest`` (the run manifest), ``records`` (peer progress, ledger entries),
``hashing`` (canonical checkpoint hash), ``ledger`` (chain rules).
"""

from protocol.errors import (
    BarnraiseError,
    ChainError,
    ConfigError,
    DeadlineExceeded,
    HashMismatch,
    InputError,
    MalformedRecord,
    SignatureError,
    TransportError,
    VerificationError,
)
from protocol.hashing import CHECKPOINT_DIGEST, checkpoint_root, tensor_digest, tensor_digests
from protocol.ledger import entries_from_jsonl, entry_to_json, next_entry, verify_chain
from protocol.manifest import RunConfig, RunManifest, SignedManifest
from protocol.records import Contribution, FileRecord, LedgerEntry, PeerProgress
from protocol.signing import SigningKey, key_id
from protocol.wire import PROTOCOL_VERSION

__all__ = [
    "BarnraiseError",
    "ChainError",
    "ConfigError",
    "DeadlineExceeded",
    "HashMismatch",
    "InputError",
    "MalformedRecord",
    "SignatureError",
    "TransportError",
    "VerificationError",
    "CHECKPOINT_DIGEST",
    "checkpoint_root",
    "tensor_digest",
    "tensor_digests",
    "entries_from_jsonl",
    "entry_to_json",
    "next_entry",
    "verify_chain",
    "RunConfig",
    "RunManifest",
    "SignedManifest",
    "Contribution",
    "FileRecord",
    "LedgerEntry",
    "PeerProgress",
    "SigningKey",
    "key_id",
    "PROTOCOL_VERSION",
]

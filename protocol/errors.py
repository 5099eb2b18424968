"""One exception tree for all of Barnraise.

    BarnraiseError
    ├── InputError              bad input from a user or a file: fix the input
    │   ├── ConfigError         a run config (TOML) or a command-line value is invalid
    │   └── MalformedRecord     wire bytes that do not decode under the strict schema
    ├── VerificationError       something was checked and did not hold
    │   ├── SignatureError      an Ed25519 signature does not verify
    │   ├── ChainError          a ledger entry does not follow from the one before it
    │   └── HashMismatch        a checkpoint, file or tensor does not match its recorded hash
    ├── TransportError          a peer, the DHT or the coordinator could not be reached
    └── DeadlineExceeded        a wait ran past its deadline (also a ``TimeoutError``)

Every message is one line that names what was wrong, so a command-line tool can print
``str(error)`` and exit non-zero.
"""

from __future__ import annotations

__all__ = [
    "BarnraiseError",
    "InputError",
    "ConfigError",
    "MalformedRecord",
    "VerificationError",
    "SignatureError",
    "ChainError",
    "HashMismatch",
    "TransportError",
    "DeadlineExceeded",
]


class BarnraiseError(Exception):
    """Root of every error Barnraise raises on purpose."""


class InputError(BarnraiseError):
    """Input from a user, a file or a flag is not acceptable."""


class ConfigError(InputError):
    """A run configuration or command-line value is invalid."""


class MalformedRecord(InputError):
    """Wire bytes do not decode under the strict schema (size, type, field or version)."""


class VerificationError(BarnraiseError):
    """A signature, chain link or hash was checked and did not hold."""


class SignatureError(VerificationError):
    """An Ed25519 signature does not verify under the expected key."""


class ChainError(VerificationError):
    """A ledger entry does not link to, or is not consistent with, the entry before it."""


class HashMismatch(VerificationError):
    """A checkpoint, file or tensor does not match the hash that was recorded for it."""


class TransportError(BarnraiseError):
    """The swarm, a peer or the coordinator could not be reached or answered badly."""


class DeadlineExceeded(BarnraiseError, TimeoutError):
    """A wait ran past its deadline."""

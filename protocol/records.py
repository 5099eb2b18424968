"""Wire records: signed peer progress and signed ledger entries (frozen, keyword-only).

Each record has ``to_wire()`` (a map in the wire data model), ``from_wire(map)`` (strict:
exact fields, types, ranges) and ``to_bytes()``/``from_bytes()`` (canonical msgpack, size
limit). A record's signature covers the canonical bytes of its map without ``signature``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from protocol.errors import MalformedRecord, SignatureError
from protocol.signing import SigningKey, key_id, verify_signature
from protocol.wire import MAX_RECORD_BYTES, PROTOCOL_VERSION, Field, canonical_bytes, check_fields, decode_map, is_hex

__all__ = ["PeerProgress", "RoundAnnouncement", "PayloadReceipt", "JoinToken", "FileRecord", "Contribution",
           "LedgerEntry", "SpotCheck", "SPOT_VERDICTS", "MAX_CHECKS", "GENESIS_PREV", "seal", "unseal"]

GENESIS_PREV = "0" * 64
"""The ``prev`` of the genesis entry."""

R = TypeVar("R", bound="_Signed")
P = TypeVar("P", bound="_PeerSigned")


def _hex64(value: Any) -> bool:
    return is_hex(value, 64)


def _non_negative(value: Any) -> bool:
    return value >= 0


def _short_str(limit: int):
    return lambda value: 0 < len(value) <= limit


_VERSION = Field("version", int, lambda v: v == PROTOCOL_VERSION, f"must be {PROTOCOL_VERSION}")
_RUN_ID = Field("run_id", str, lambda v: is_hex(v, 16), "16 hex digits")
_SIGNATURE = Field("signature", str, lambda v: is_hex(v, 128), "128 hex digits")
_PEER_ID = Field("peer_id", str, lambda v: is_hex(v, 16), "key id: 16 hex digits")
_PEER_KEY = Field("peer_key", str, _hex64, "64 hex digits")


class _Signed:
    """Shared signing, encoding and strict decoding for signed records."""

    FIELDS: ClassVar[tuple[Field, ...]]
    WHAT: ClassVar[str]
    DOMAIN: ClassVar[bytes] = b""
    """Signed before the canonical bytes: a signature made for one record kind never verifies as
    another. The kinds of protocol version 1 before receipts (progress, announcement, ledger entry,
    manifest) sign no prefix: their exact field sets already tell them apart (docs/protocol.md §3)."""
    signature: str

    def unsigned_wire(self) -> dict[str, Any]:
        wire = self.to_wire()
        del wire["signature"]
        return wire

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: _to_wire_value(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        # A float field built from an int must still sign as float64, the form from_wire yields.
        for field in self.FIELDS:
            kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
            value = wire[field.name]
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                wire[field.name] = float(value)
        return wire

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_wire())

    @classmethod
    def from_bytes(cls: type[R], raw: bytes) -> R:
        return cls.from_wire(decode_map(raw, what=cls.WHAT))

    @classmethod
    def from_wire(cls: type[R], mapping: Any) -> R:
        if not isinstance(mapping, Mapping):
            raise MalformedRecord(f"{cls.WHAT}: expected a map")
        values = check_fields(mapping, cls.FIELDS, what=cls.WHAT)
        return cls(**cls._nested_from_wire(values))

    @classmethod
    def _nested_from_wire(cls, values: dict[str, Any]) -> dict[str, Any]:
        return values


class _PeerSigned(_Signed):
    """A record a peer signs with its own key: ``peer_key`` in the record, ``peer_id`` its key id."""

    peer_id: str
    peer_key: str

    def _check_peer_key(self) -> None:
        if key_id(self.peer_key) != self.peer_id:
            raise MalformedRecord(f"{self.WHAT}: peer_id is not the key id of peer_key")

    @classmethod
    def signed(cls: type[P], key: SigningKey, **fields: Any) -> P:
        draft = cls(peer_key=key.public_key_hex, peer_id=key_id(key.public_key_hex), **fields)
        return dataclasses.replace(draft, signature=key.sign(draft.DOMAIN + canonical_bytes(draft.unsigned_wire())))

    def verify(self: P) -> P:
        verify_signature(self.peer_key, self.DOMAIN + canonical_bytes(self.unsigned_wire()), self.signature,
                         what=self.WHAT)
        return self


def _to_wire_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_wire_value(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class PeerProgress(_PeerSigned):
    """What a peer publishes to the DHT after each round, signed with its own Ed25519 key."""

    WHAT: ClassVar[str] = "peer progress"
    FIELDS: ClassVar[tuple[Field, ...]] = (
        _VERSION,
        _RUN_ID,
        _PEER_ID,
        _PEER_KEY,
        Field("round", int, _non_negative),
        Field("samples", int, _non_negative),
        Field("loss", float, _non_negative),
        Field("samples_per_second", float, _non_negative),
        Field("averaged_with", int, lambda v: 1 <= v <= 4096),
        Field("averaged", bool),
        Field("network_seconds", float, _non_negative),
        Field("state_root", str, _hex64, "64 hex digits"),
        Field("p2p_id", str, _short_str(128)),
        Field("maddrs", list, lambda v: len(v) <= 16 and all(isinstance(a, str) and 0 < len(a) <= 256 for a in v)),
        Field("time", float, _non_negative),
        _SIGNATURE,
    )

    version: int = PROTOCOL_VERSION
    run_id: str
    peer_id: str
    """Key id (first 16 hex digits of sha256 of ``peer_key``)."""
    peer_key: str
    """The peer's Ed25519 public key (hex)."""
    round: int
    """The round whose starting state is ``state_root`` (the peer's current round)."""
    samples: int
    """Training samples this peer has contributed in all, up to this round."""
    loss: float
    """Mean training loss (nats/byte) over the last round's inner steps."""
    samples_per_second: float
    averaged_with: int
    """Peers in the last round's averaging group, this peer included; 1 means local only."""
    averaged: bool
    """Whether the last round's average really arrived (False: fell back to local values)."""
    network_seconds: float
    """Seconds the last round spent waiting on averaging."""
    state_root: str
    """Canonical root of the state this peer serves to joiners (parameters + outer state)."""
    p2p_id: str
    """The libp2p peer id this peer is reachable at."""
    maddrs: list[str]
    """Multiaddrs of this peer's DHT node, for bootstrapping."""
    time: float
    signature: str = ""

    def __post_init__(self) -> None:
        self._check_peer_key()
        if self.averaged != (self.averaged_with >= 2):
            raise MalformedRecord("peer progress: 'averaged' must be true exactly when averaged_with >= 2")


@dataclass(frozen=True, kw_only=True)
class RoundAnnouncement(_PeerSigned):
    """A peer's contribution to one round, stored in the DHT under the round's key at its close.

    It names the payload by sha256 (payloads are content-addressed: any peer holding them serves
    them), the averaging weight, and the consensus root the outer gradient was computed against.
    The round's contributor set is decided from these records alone (``protocol.consensus``)."""

    WHAT: ClassVar[str] = "round announcement"
    FIELDS: ClassVar[tuple[Field, ...]] = (
        _VERSION,
        _RUN_ID,
        _PEER_ID,
        _PEER_KEY,
        Field("round", int, lambda v: 0 <= v < 2**40, "0 to 2**40"),
        Field("weight", float, lambda v: 0 < v < 2**53, "positive samples"),
        Field("codec", str, _short_str(64)),
        Field("payload_size", int, lambda v: 0 < v < 2**40, "positive"),
        Field("payload_sha256", str, _hex64, "64 hex digits"),
        Field("base_root", str, _hex64, "64 hex digits"),
        Field("loss", float, lambda v: 0 <= v < 1e6, "0 to 1e6"),
        Field("p2p_id", str, _short_str(128)),
        Field("time", float, _non_negative),
        _SIGNATURE,
    )

    version: int = PROTOCOL_VERSION
    run_id: str
    peer_id: str
    peer_key: str
    round: int
    weight: float
    """Samples of this round's inner steps (the averaging weight)."""
    codec: str
    payload_size: int
    payload_sha256: str
    base_root: str
    """Root of the consensus state θ_r the outer gradient was measured from."""
    loss: float
    """Mean training loss of the round's inner steps (nats/byte)."""
    p2p_id: str
    """The libp2p id the author serves its payload at."""
    time: float
    signature: str = ""

    def __post_init__(self) -> None:
        self._check_peer_key()


MAX_HELD = 1024
"""Payloads one receipt may name: a round holds at most ``averaging.max_contributors`` (≤ 1024)."""


@dataclass(frozen=True, kw_only=True)
class PayloadReceipt(_PeerSigned):
    """A peer's signed word that it holds these payloads of a round (and serves them by sha256).

    Stored under the round's receipt key once the peer has fetched the round's payloads. A round
    keeps a member's payload only if a peer other than its author names it here
    (``protocol.consensus.available``): a payload announced but served to nobody is left out by
    every peer alike, so withholding cannot void the round."""

    WHAT: ClassVar[str] = "payload receipt"
    DOMAIN: ClassVar[bytes] = b"barnraise/payload-receipt\x00"
    FIELDS: ClassVar[tuple[Field, ...]] = (
        _VERSION,
        _RUN_ID,
        _PEER_ID,
        _PEER_KEY,
        Field("round", int, lambda v: 0 <= v < 2**40, "0 to 2**40"),
        Field("base_root", str, _hex64, "64 hex digits"),
        Field("held", list, lambda v: len(v) <= MAX_HELD and all(_hex64(d) for d in v) and v == sorted(set(v)),
              f"at most {MAX_HELD} distinct sha256 digests, sorted"),
        Field("p2p_id", str, _short_str(128)),
        Field("time", float, _non_negative),
        _SIGNATURE,
    )

    version: int = PROTOCOL_VERSION
    run_id: str
    peer_id: str
    peer_key: str
    round: int
    base_root: str
    """The consensus the round built on (the decision's base root)."""
    held: list[str]
    """sha256 of every payload of the round this peer holds, sorted."""
    p2p_id: str
    """The libp2p id the peer serves them at."""
    time: float
    signature: str = ""

    def __post_init__(self) -> None:
        self._check_peer_key()


@dataclass(frozen=True, kw_only=True)
class JoinToken(_Signed):
    """The coordinator's signed word that the holder of ``peer_key`` may take part in a private run
    until ``expires`` (``barnraise-coordinator admit KEY``). Useless to anyone without the private
    half of ``peer_key``: a peer's libp2p identity is its key, and libp2p authenticates callers."""

    WHAT: ClassVar[str] = "join token"
    DOMAIN: ClassVar[bytes] = b"barnraise/join-token\x00"
    FIELDS: ClassVar[tuple[Field, ...]] = (
        _VERSION,
        _RUN_ID,
        _PEER_KEY,
        Field("expires", float, _non_negative),
        Field("signer", str, _hex64, "64 hex digits"),
        _SIGNATURE,
    )

    version: int = PROTOCOL_VERSION
    run_id: str
    peer_key: str
    """The admitted volunteer's Ed25519 public key (hex)."""
    expires: float
    """Unix time after which the token no longer admits."""
    signer: str
    """The coordinator's public key (hex): the run manifest's ``coordinator_key``."""
    signature: str = ""

    @property
    def peer_id(self) -> str:
        return key_id(self.peer_key)

    @classmethod
    def issue(cls, key: SigningKey, *, run_id: str, peer_key: str, expires: float) -> JoinToken:
        draft = cls(run_id=run_id, peer_key=peer_key, expires=float(expires), signer=key.public_key_hex)
        return dataclasses.replace(draft, signature=key.sign(cls.DOMAIN + canonical_bytes(draft.unsigned_wire())))

    def verify(self, coordinator_key: str) -> JoinToken:
        if self.signer != coordinator_key:
            raise SignatureError(f"join token: issued by key {key_id(self.signer)}, not the run's coordinator "
                                 f"{key_id(coordinator_key)}")
        verify_signature(self.signer, self.DOMAIN + canonical_bytes(self.unsigned_wire()), self.signature,
                         what=self.WHAT)
        return self


_SEAL_MAGIC = b"BRSEAL1"
MAX_TOKEN_BYTES = 1024
"""A join token's canonical bytes are about 250 bytes; more is not a token."""
SEALED_BYTES = len(_SEAL_MAGIC) + 2 + MAX_TOKEN_BYTES + MAX_RECORD_BYTES


def seal(record: bytes, token: bytes) -> bytes:
    """A DHT value of a private run: a peer's signed record with its join token in front (the
    magic, the token's length in two bytes, the token, the record)."""
    if len(token) > MAX_TOKEN_BYTES or len(record) > MAX_RECORD_BYTES:
        raise MalformedRecord("sealed record: the token or the record is too large")
    return _SEAL_MAGIC + len(token).to_bytes(2, "big") + token + record


def unseal(raw: object) -> tuple[bytes, bytes]:
    """(record bytes, token bytes) of a sealed value; ``MalformedRecord`` if it is not one."""
    if not isinstance(raw, bytes) or len(raw) > SEALED_BYTES or not raw.startswith(_SEAL_MAGIC):
        raise MalformedRecord("not a sealed record (a private run's records carry their join token)")
    at = len(_SEAL_MAGIC)
    length = int.from_bytes(raw[at : at + 2], "big")
    if length > MAX_TOKEN_BYTES or len(raw) < at + 2 + length:
        raise MalformedRecord("sealed record: its token's length is wrong")
    return raw[at + 2 + length :], raw[at + 2 : at + 2 + length]


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """One checkpoint file: its plain sha256, size, canonical root and per-tensor digests."""

    name: str
    sha256: str
    size: int
    root: str
    tensors: dict[str, str]

    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("name", str, lambda v: 0 < len(v) <= 128 and "/" not in v and "\\" not in v and v not in (".", "..")),
        Field("sha256", str, _hex64, "64 hex digits"),
        Field("size", int, _non_negative),
        Field("root", str, _hex64, "64 hex digits"),
        Field("tensors", dict, lambda v: all(isinstance(k, str) and _hex64(d) for k, d in v.items())),
    )


@dataclass(frozen=True, kw_only=True)
class Contribution:
    """Samples one peer contributed in all, as of the entry."""

    peer_id: str
    samples: int

    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("peer_id", str, lambda v: is_hex(v, 16)),
        Field("samples", int, _non_negative),
    )


SPOT_VERDICTS = ("passed", "failed", "unanswered")
"""A spot check's outcome (docs/protocol.md §10.6): the replay matched; it did not (the round's
credit is withdrawn); the peer did not serve its evidence in time (withdrawn too: no evidence, no credit)."""
MAX_CHECKS = 256
"""Spot checks one ledger entry lists."""


@dataclass(frozen=True)
class SpotCheck:
    """One spot check of a member's round, as a ledger entry records it."""

    peer_id: str
    round: int
    verdict: str
    """One of ``SPOT_VERDICTS``."""
    samples: int
    """The round's samples by this peer (its announced weight): withdrawn from its credit unless passed."""
    payload_sha256: str
    evidence_sha256: str
    """sha256 of the evidence file the replay started from ("" when unanswered)."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("peer_id", str, lambda v: is_hex(v, 16)),
        Field("round", int, _non_negative),
        Field("verdict", str, lambda v: v in SPOT_VERDICTS, "passed, failed or unanswered"),
        Field("samples", int, _non_negative),
        Field("payload_sha256", str, _hex64, "64 hex digits"),
        Field("evidence_sha256", str, lambda v: v == "" or is_hex(v, 64), "64 hex digits or empty"),
    )


_CHECKS = Field("checks", list, lambda v: 0 < len(v) <= MAX_CHECKS, f"1 to {MAX_CHECKS} spot checks")


@dataclass(frozen=True, kw_only=True)
class LedgerEntry(_Signed):
    """One link of the ledger: a genesis or checkpoint record, chained by ``prev``, signed."""

    WHAT: ClassVar[str] = "ledger entry"
    FIELDS: ClassVar[tuple[Field, ...]] = (
        _VERSION,
        _RUN_ID,
        Field("seq", int, _non_negative),
        Field("kind", str, lambda v: v in ("genesis", "checkpoint"), "'genesis' or 'checkpoint'"),
        Field("prev", str, _hex64, "64 hex digits"),
        Field("round", int, _non_negative),
        Field("created_at", float, _non_negative),
        Field("checkpoint_root", str, _hex64, "64 hex digits"),
        Field("files", list, lambda v: 0 < len(v) <= 64),
        Field("contributors", list),
        Field("total_samples", int, _non_negative),
        Field("heldout_loss", (float, type(None))),
        Field("signer", str, _hex64, "64 hex digits"),
        _SIGNATURE,
    )

    version: int = PROTOCOL_VERSION
    run_id: str
    seq: int
    """Position in the ledger, from 0 (genesis)."""
    kind: Literal["genesis", "checkpoint"]
    prev: str
    """``entry_hash`` of the entry before (``GENESIS_PREV`` for seq 0)."""
    round: int
    """The swarm round whose state the checkpoint holds."""
    created_at: float
    checkpoint_root: str
    """Canonical root of the model file (the first of ``files``)."""
    files: list[FileRecord]
    contributors: list[Contribution]
    """Per-peer sample totals as of this entry, sorted by peer id."""
    total_samples: int
    heldout_loss: float | None
    """Held-out loss (nats/byte) the coordinator measured on this checkpoint, if any."""
    signer: str
    checks: list[SpotCheck] = dataclasses.field(default_factory=list)
    """Spot checks since the entry before (``SpotCheck``). Written only when there are any, so an
    entry without checks has the same bytes, hash and signature as before checks existed."""
    signature: str = ""

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if not wire["checks"]:
            del wire["checks"]
        return wire

    @classmethod
    def from_wire(cls, mapping: Any) -> LedgerEntry:
        if not isinstance(mapping, Mapping):
            raise MalformedRecord(f"{cls.WHAT}: expected a map")
        fields = (*cls.FIELDS, _CHECKS) if "checks" in mapping else cls.FIELDS
        return cls(**cls._nested_from_wire(check_fields(mapping, fields, what=cls.WHAT)))

    @classmethod
    def _nested_from_wire(cls, values: dict[str, Any]) -> dict[str, Any]:
        values["files"] = [_nested(FileRecord, f, "ledger entry file") for f in values["files"]]
        values["contributors"] = [_nested(Contribution, c, "ledger entry contributor") for c in values["contributors"]]
        if "checks" in values:
            values["checks"] = [_nested(SpotCheck, c, "ledger entry spot check") for c in values["checks"]]
        return values

    @property
    def entry_hash(self) -> str:
        """sha256 of the signed entry's canonical bytes; the next entry's ``prev``."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def signed(cls, key: SigningKey, **fields: Any) -> LedgerEntry:
        draft = cls(signer=key.public_key_hex, **fields)
        return dataclasses.replace(draft, signature=key.sign(canonical_bytes(draft.unsigned_wire())))

    def verify_signature(self, public_key_hex: str) -> None:
        what = f"ledger entry {self.seq}"
        if self.signer != public_key_hex:
            raise SignatureError(f"{what}: signed by key {key_id(self.signer)}, expected {key_id(public_key_hex)}")
        verify_signature(self.signer, canonical_bytes(self.unsigned_wire()), self.signature, what=what)


def _nested(cls: type, mapping: Any, what: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise MalformedRecord(f"{what}: expected a map")
    return cls(**check_fields(mapping, cls.FIELDS, what=what))

"""Which untrusted records to believe, and what to do with them: every such decision, pure.

Volunteers are strangers. A peer, the coordinator and any follower take the same decisions over
the same records here, with no I/O and no hivemind, so each hostile input is a unit test:

    binding_problem    a record names a libp2p id that is not its signing key's
    progress_problem   a progress record is not believed: bound to another libp2p id, signed in the future (beyond
                       ``CLOCK_SKEW``), or at a round the run's clock has not reached
    plausible_samples  the samples a record can honestly claim (clamped, never beyond 2**53)
    swarm_round        the round the live peers are at: the median of distinct peers, not the max
    quorum_state       the (round, state root) a strict majority of the peers asked vouches for, and
                       whom to download it from (only the peers whose signed records name it)
    state_problem      a state is refused: not finite, or a value beyond ``MAX_PARAMETER``
    dht_record_problem a value is refused by a DHT node: not one of our signed records, under
                       another peer's subkey, too large, or kept longer than its kind allows
    clip_scales        the robust rule of ``combine``: each payload clipped to ``CLIP_RATIO``
                       times the group's median norm
    token_problem      a private run's join token does not admit a caller (another run or
                       coordinator, expired, or bound to another key or libp2p id)
    request_problem    a private run's HTTP request for weights or data is not signed by an
                       admitted key (``request_signature`` makes the header)

The run's clock is the trusted anchor for rounds: round r opens at ``created_at + r·W`` in the
signed manifest, so no record can make a peer believe the swarm is ahead of it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol.consensus import RoundClock
from protocol.errors import BarnraiseError
from protocol.manifest import SignedManifest
from protocol.multiaddr import libp2p_id_of
from protocol.records import JoinToken, PayloadReceipt, PeerProgress, RoundAnnouncement, unseal
from protocol.signing import verify_signature

__all__ = [
    "Admission",
    "CLOCK_SKEW",
    "CLIP_RATIO",
    "MAX_PARAMETER",
    "MAX_SAMPLES",
    "QuorumState",
    "binding_problem",
    "clip_scales",
    "dht_record_problem",
    "plausible_samples",
    "progress_problem",
    "quorum_size",
    "quorum_state",
    "round_bound",
    "state_problem",
    "swarm_round",
    "request_problem",
    "request_signature",
    "token_problem",
]

CLOCK_SKEW = 30.0
"""Seconds a record's signed time may lie ahead of the reader's clock (clocks drift; more is a lie)."""
ROUND_SLACK = 1
"""Rounds a record may claim beyond the one the run's clock is in (a peer settles at the boundary)."""
MAX_SAMPLES = 2**53
"""Any sample count is clamped here: exact in a float64 and far inside the wire's 64-bit range."""
MAX_PARAMETER = 1.0e4
"""No value of a state (parameters or outer momentum) may exceed this in magnitude: a model's
weights are O(1); a state beyond it is poisoned or diverged, and is refused, never adopted."""
CLIP_RATIO = 1.0
"""``combine`` clips every payload to this many times the median norm of the round's payloads
(docs/protocol.md, "Robust aggregation"; chosen by ``scripts/bench_robust.py``)."""
SCALE_BITS = 20
"""Clip factors are rounded down to multiples of 2**-20, so that peers whose norms differ in the
last bits (another BLAS, another CPU) still scale by the same factor almost always."""


def round_bound(clock: RoundClock, now: float) -> int:
    """The largest round a record read at ``now`` may claim."""
    return clock.round_at(now + CLOCK_SKEW) + ROUND_SLACK


def progress_problem(record: PeerProgress, *, now: float, clock: RoundClock) -> str | None:
    """Why a verified progress record is not believed, or None."""
    if (problem := binding_problem(record)) is not None:
        return problem
    if record.time > now + CLOCK_SKEW:
        return f"peer {record.peer_id}: record signed {record.time - now:.0f} s in the future"
    bound = round_bound(clock, now)
    if record.round > bound:
        return f"peer {record.peer_id}: claims round {record.round}; the run's clock allows {bound}"
    return None


def binding_problem(record: PeerProgress | RoundAnnouncement) -> str | None:
    """Why a signed record's ``p2p_id`` is not its signer's: a peer's libp2p identity is its signing
    key, so the libp2p id follows from ``peer_key``, and no peer can name another's."""
    own = libp2p_id_of(record.peer_key)
    if record.p2p_id != own:
        return f"peer {record.peer_id}: names libp2p id {record.p2p_id[:60]!r}, its key's is {own}"
    return None


def plausible_samples(record: PeerProgress, samples_per_round: int) -> int:
    """The samples a record may count: at most one full round's for each round it has reached."""
    return max(0, min(record.samples, (record.round + 1) * samples_per_round, MAX_SAMPLES))


def swarm_round(records: Sequence[PeerProgress]) -> int:
    """The round the swarm is at: the lower median over distinct peers (-1 if none), so that no
    minority of records, however high their rounds, moves it."""
    latest: dict[str, int] = {}
    for record in records:
        latest[record.peer_id] = max(latest.get(record.peer_id, -1), record.round)
    if not latest:
        return -1
    rounds = sorted(latest.values())
    return rounds[(len(rounds) - 1) // 2]


def quorum_size(peers: int) -> int:
    """Distinct peers that must vouch for a state: a strict majority of those heard from."""
    return peers // 2 + 1


@dataclass(frozen=True)
class QuorumState:
    """A consensus state a quorum vouches for, and the peers that can serve it."""

    round: int
    root: str
    donors: tuple[str, ...]
    """libp2p ids of the vouchers (each named in its own signed record), by peer id."""
    vouchers: int


def quorum_state(records: Sequence[PeerProgress], *, exclude: str = "", asked: int = 0) -> QuorumState | None:
    """The (round, state root) that a strict majority of the peers asked names in their signed
    records; None when no state has one. ``asked``: how many peers were asked (a peer that did not
    answer does not vouch; at least the distinct peers in ``records``). ``records`` must be
    verified and believed (``progress_problem``); ``exclude`` is the reader's own peer id.

    One record per peer id counts (its latest round), and one per libp2p id, so a peer cannot
    vouch twice. Two states cannot both hold a strict majority, so there is no tie."""
    by_peer: dict[str, PeerProgress] = {}
    for record in records:
        if record.peer_id == exclude:
            continue
        known = by_peer.get(record.peer_id)
        if known is None or (record.round, record.time) > (known.round, known.time):
            by_peer[record.peer_id] = record
    seen_p2p: set[str] = set()
    vouching: dict[tuple[int, str], list[PeerProgress]] = defaultdict(list)
    for peer_id in sorted(by_peer):
        record = by_peer[peer_id]
        if record.p2p_id in seen_p2p:
            continue
        seen_p2p.add(record.p2p_id)
        vouching[(record.round, record.state_root)].append(record)
    need = quorum_size(max(asked, len(seen_p2p)))
    held = [(key, voters) for key, voters in vouching.items() if len(voters) >= need]
    if not held:
        return None
    (round_, root), voters = held[0]
    return QuorumState(round_, root, tuple(v.p2p_id for v in voters), len(voters))


def state_problem(parameters: torch.Tensor, momentum: torch.Tensor) -> str | None:
    """Why a state (flat float32 parameters and outer momentum) must not be adopted, or None."""
    for name, tensor in (("parameters", parameters), ("outer momentum", momentum)):
        if not bool(torch.isfinite(tensor).all()):
            return f"its {name} hold values that are not finite"
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > MAX_PARAMETER:
            return f"its {name} hold a value of magnitude {largest:.3g}, beyond {MAX_PARAMETER:g}"
    return None


def clip_scales(norms: Sequence[float], ratio: float = CLIP_RATIO) -> list[float]:
    """The factor each payload is scaled by before the mean: 1, or for a payload whose norm is
    above ``ratio`` times the lower median of ``norms``, that ceiling over its norm rounded down
    to a multiple of 2**-``SCALE_BITS``. ``ratio`` 0 turns clipping off. Pure and order-free: every
    peer holding the same payloads computes the same factors."""
    if ratio <= 0 or not norms:
        return [1.0] * len(norms)
    ordered = sorted(norms)
    ceiling = ratio * ordered[(len(ordered) - 1) // 2]
    grid = float(2**SCALE_BITS)
    scales = []
    for norm in norms:
        if not math.isfinite(norm):
            scales.append(0.0)
        elif norm <= ceiling or norm == 0.0:
            scales.append(1.0)
        else:
            scales.append(math.floor(ceiling / norm * grid) / grid)
    return scales


MAX_TTL = {"manifest": 600.0, "progress": 120.0, "announcement": 12 * 86400.0 + 60.0,
           "receipt": 12 * 86400.0 + 60.0}
"""The longest a record of each kind may be stored for in the DHT (seconds from its signing, plus
``CLOCK_SKEW``): a hostile store cannot pin a record for longer. An announcement lives 12 rounds
plus a minute (``peer.rounds.ANNOUNCE_ROUNDS``), and a round may last up to a day; a receipt as long."""

_PEER_KINDS = (("progress", PeerProgress), ("announcement", RoundAnnouncement), ("receipt", PayloadReceipt))


@dataclass(frozen=True)
class Admission:
    """A private run's gate: join tokens for ``run_id`` signed by ``coordinator_key`` admit."""

    run_id: str
    coordinator_key: str

    @classmethod
    def of(cls, manifest) -> Admission | None:
        """The gate of a run manifest (None: a public run, open to anyone)."""
        if manifest.config.access.mode != "private":
            return None
        return cls(manifest.run_id, manifest.coordinator_key)


def token_problem(raw: object, admission: Admission, *, now: float, peer_key: str | None = None,
                  p2p_id: str | None = None) -> str | None:
    """Why ``raw`` is not a join token admitting to ``admission``'s run (the holder of ``peer_key``,
    or the caller ``p2p_id``), or None. The coordinator itself needs no token."""
    if p2p_id is not None and p2p_id == libp2p_id_of(admission.coordinator_key):
        return None
    if not isinstance(raw, bytes) or not raw:
        return "no join token (this run is private)"
    try:
        token = JoinToken.from_bytes(raw).verify(admission.coordinator_key)
    except BarnraiseError as error:
        return f"not a valid join token: {error}"
    if token.run_id != admission.run_id:
        return f"a join token for run {token.run_id}, not {admission.run_id}"
    if token.expires < now - CLOCK_SKEW:
        return f"a join token that expired at {token.expires:.0f}"
    if peer_key is not None and token.peer_key != peer_key:
        return f"a join token for key {token.peer_id}, not the record's signer"
    if p2p_id is not None and libp2p_id_of(token.peer_key) != p2p_id:
        return f"a join token for key {token.peer_id}, not the caller {p2p_id[:20]}"
    return None


_REQUEST_DOMAIN = b"barnraise/http-request\x00"
AUTH_HEADER = "X-Barnraise-Auth"
"""The header of a private run's HTTP requests: join token (hex), time, signature (hex)."""


def request_signature(key, token: bytes, path: str, now: float) -> str:
    """``AUTH_HEADER``'s value for ``GET path`` at ``now``, signed with the peer's ``key``."""
    message = _REQUEST_DOMAIN + f"GET {path} {now!r}".encode()
    return f"{token.hex()} {now!r} {key.sign(message)}"


def request_problem(header: str | None, path: str, admission: Admission, *, now: float) -> str | None:
    """Why a private run's ``GET path`` is refused (no header, a token that does not admit, a
    signature by another key, a time beyond ``CLOCK_SKEW``), or None."""
    if not header:
        return "this run is private: the request carries no join token"
    parts = header.split(" ")
    if len(parts) != 3 or len(parts[0]) > 2 * 1024:
        return "the request's authorization header is malformed"
    try:
        token, signed_at = bytes.fromhex(parts[0]), float(parts[1])
    except ValueError:
        return "the request's authorization header is malformed"
    if not math.isfinite(signed_at) or abs(signed_at - now) > CLOCK_SKEW:
        return "the request's signed time is off by more than the clock skew allowed"
    if (problem := token_problem(token, admission, now=now)) is not None:
        return problem
    peer_key = JoinToken.from_bytes(token).peer_key
    try:
        verify_signature(peer_key, _REQUEST_DOMAIN + f"GET {path} {parts[1]}".encode(), parts[2], what="request")
    except BarnraiseError as error:
        return str(error)
    return None


def _peer_record(raw: bytes) -> tuple[str, PeerProgress | RoundAnnouncement | PayloadReceipt]:
    """(kind, verified record) of a peer's record; each kind has its exact field set, so at most
    one decodes. Raises the last kind's error when none does."""
    for kind, cls in _PEER_KINDS[:-1]:
        try:
            return kind, cls.from_bytes(raw).verify()
        except BarnraiseError:
            continue
    kind, cls = _PEER_KINDS[-1]
    return kind, cls.from_bytes(raw).verify()


def dht_record_problem(subkey: str | None, raw: object, expiration: float, now: float,
                       admission: Admission | None = None) -> str | None:
    """Why a value offered to this node's DHT storage (or returned by another node) is refused,
    or None. Values are Barnraise's signed records only: a signed manifest (no subkey), or a
    peer's progress record, round announcement or payload receipt stored under its own peer id as subkey, naming
    its own libp2p id, verified, within ``wire.MAX_RECORD_BYTES``. A record's expiry may lie at
    most ``MAX_TTL`` of its kind plus ``CLOCK_SKEW`` after the time it was signed at (the storer's
    clock on both sides, so readers whose clocks differ agree), and no value's at most that plus
    ``10 × CLOCK_SKEW`` after this node's ``now`` (a loose bound: hivemind refuses a whole
    dictionary of records when one of them fails, so a tight clock-dependent check would let one
    peer hide a round's records from readers whose clocks run behind). In a private run
    (``admission``), the manifest must be its coordinator's and a peer's record must be sealed with
    a join token admitting its signer (``records.seal``)."""
    if not isinstance(raw, bytes):
        return "not bytes"
    signed_at = None
    try:
        if subkey is None:
            SignedManifest.from_bytes(raw).verify(admission.coordinator_key if admission is not None else None)
            kind = "manifest"
        else:
            token = b""
            if admission is not None:
                raw, token = unseal(raw)
            kind, record = _peer_record(raw)
            if admission is not None:
                # judged at the record's signed time, which every reader sees alike (a check against
                # each reader's clock would drop whole dictionaries for some readers and not others)
                if (problem := token_problem(token, admission, now=record.time, peer_key=record.peer_key)) is not None:
                    return problem
                expires = JoinToken.from_bytes(token).expires
                if expiration > expires + MAX_TTL[kind] + CLOCK_SKEW:
                    return f"{kind} asks to be kept {expiration - expires:.0f} s past its join token's expiry"
            if record.peer_id != subkey:
                return f"stored under subkey {subkey[:16]!r}, signed by {record.peer_id}"
            if (problem := binding_problem(record)) is not None:
                return problem
            signed_at = record.time
    except BarnraiseError as error:
        return f"not a valid signed record: {error}"
    if signed_at is not None and expiration - signed_at > MAX_TTL[kind] + CLOCK_SKEW:
        return f"{kind} signed at {signed_at:.0f} asks to be kept until {expiration:.0f}, more than {MAX_TTL[kind]:.0f} s"
    if expiration - now > MAX_TTL[kind] + 10 * CLOCK_SKEW:
        return f"{kind} asks to be kept {expiration - now:.0f} s, more than {MAX_TTL[kind]:.0f} s"
    return None

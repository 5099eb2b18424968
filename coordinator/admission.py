"""Private runs: join tokens the coordinator issues (``barnraise-coordinator admit KEY``).

    WORKDIR/admitted/<peer id>.token   one signed ``JoinToken`` per admitted volunteer key

The coordinator serves each at ``GET /token/<peer id>``: a token admits only the holder of the
private key it names (a peer's libp2p identity is its key, and every request it makes carries
its libp2p id, authenticated), so it is no secret. A peer of a private run fetches its own at
join. Its records in the DHT carry it, every peer checks it on every payload, notice and state
request (``peer.rpc_gate``), and the coordinator on every request for checkpoint files or the
run's files (``protocol.policy.request_problem``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from peer.workdir import write_atomic
from protocol.errors import InputError
from protocol.manifest import SignedManifest
from protocol.records import JoinToken
from protocol.signing import SigningKey, key_id, public_key_from_pem

__all__ = ["admit", "issued_token", "ADMITTED", "DEFAULT_DAYS"]

ADMITTED = "admitted"
DEFAULT_DAYS = 365.0
_PEER_ID = re.compile(r"\A[0-9a-f]{16}\Z")


def _public_key(text: str) -> str:
    """A volunteer's public key from hex, or a PEM file (``barnraise-peer key`` prints the hex)."""
    path = Path(text)
    try:
        raw = path.read_bytes() if len(text) < 4096 and path.is_file() else text.encode()
        return public_key_from_pem(raw)
    except InputError:
        raise InputError(f"KEY {text[:80]!r} is neither 64 hex digits nor a PEM public key file "
                         "(the volunteer's `barnraise-peer key` prints it)") from None


def admit(workdir: Path, key_text: str, *, days: float = DEFAULT_DAYS) -> tuple[JoinToken, Path]:
    """Issue (or renew) the join token of the volunteer key ``key_text`` for the run in ``workdir``."""
    manifest_path = workdir / "manifest.msgpack"
    if not manifest_path.is_file():
        raise InputError(f"--workdir {workdir}: no run here (launch it first: barnraise-coordinator launch RUN.toml)")
    if not 0 < days <= 36500:
        raise InputError(f"--days {days:g} must lie in (0, 36500]")
    try:
        key = SigningKey.from_pem((workdir / "coordinator.key").read_bytes())
    except OSError as error:
        raise InputError(f"--workdir {workdir}: cannot read coordinator.key ({error.strerror})") from None
    manifest = SignedManifest.from_bytes(manifest_path.read_bytes()).verify(key.public_key_hex)
    if manifest.config.access.mode != "private":
        raise InputError(f"run {manifest.config.name} is public: anyone may join it; admission is for runs "
                         'launched with [access] mode = "private"')
    peer_key = _public_key(key_text)
    token = JoinToken.issue(key, run_id=manifest.run_id, peer_key=peer_key, expires=time.time() + days * 86400)
    path = workdir / ADMITTED / f"{key_id(peer_key)}.token"
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, token.to_bytes())
    return token, path


def issued_token(workdir: Path, peer_id: str) -> bytes | None:
    """The token issued for ``peer_id`` (16 hex digits), or None."""
    if not _PEER_ID.match(peer_id):
        return None
    try:
        return (workdir / ADMITTED / f"{peer_id}.token").read_bytes()
    except OSError:
        return None

"""A volunteer's side of a private run: its join token, checked at join and renewed while it trains
(the coordinator's side is ``coordinator/admission.py``; the checks are ``protocol.policy``'s)."""

from __future__ import annotations

import time
from collections.abc import Callable

from peer.coordinator_client import CoordinatorClient
from protocol.errors import DeadlineExceeded, InputError, MalformedRecord, TransportError
from protocol.manifest import SignedManifest
from protocol.policy import Admission, token_problem
from protocol.records import JoinToken
from protocol.signing import SigningKey, key_id

__all__ = ["TokenKeeper", "join_token", "token_signer"]

RENEW_SECONDS = 3600.0
"""A private run's peer asks for a newer join token in the last this many seconds of its own."""
_RETRY_SECONDS = 300.0


def join_token(signed: SignedManifest, key: SigningKey, client: CoordinatorClient | None,
               given: bytes | None) -> tuple[Admission | None, bytes]:
    """A private run's gate and this peer's join token for it (given, or fetched from the
    coordinator), checked; (None, b"") for a public run. Refuses in one line without a valid one."""
    manifest = signed.manifest
    admission = Admission.of(manifest)
    if admission is None:
        return None, b""
    token = given if given is not None else client.token(key_id(key.public_key_hex)) if client is not None else None
    ask = f"ask its coordinator to run: barnraise-coordinator admit {key.public_key_hex}"
    if token is None:
        raise InputError(f"run {manifest.config.name} is private and this peer's key is not admitted: {ask}")
    if (problem := token_problem(token, admission, now=time.time(), peer_key=key.public_key_hex)) is not None:
        raise InputError(f"run {manifest.config.name} is private and this peer's join token does not admit it "
                         f"({problem}): {ask}")
    return admission, token


def token_signer(token: bytes | None) -> str | None:
    """The coordinator key a given join token names: without --coordinator-key, the run to accept."""
    if token is None:
        return None
    try:
        return JoinToken.from_bytes(token).signer
    except MalformedRecord as error:
        raise InputError(f"--token: not a join token ({error})") from None


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment)) + " UTC"


class TokenKeeper:
    """Keeps a running peer's join token (the one its ``node`` presents) from lapsing."""

    def __init__(self, node, client: CoordinatorClient | None, key: SigningKey, say: Callable[[str], None]):
        self.node, self.client, self.key, self.say = node, client, key, say
        self.checked = -float("inf")

    def keep(self) -> None:
        """In the token's last hour, ask the coordinator for a newer one (every 5 minutes); once it
        has expired and none came, stop with one line saying what to ask for. Public runs: nothing."""
        if self.node.admission is None:
            return
        now, expires = time.time(), JoinToken.from_bytes(self.node.token).expires
        if now < expires - RENEW_SECONDS or (now - self.checked < _RETRY_SECONDS and now < expires):
            return
        self.checked = now
        fresh = None
        if self.client is not None:
            try:
                fresh = self.client.token(key_id(self.key.public_key_hex))
            except (TransportError, DeadlineExceeded):
                fresh = None
        if fresh is not None and token_problem(fresh, self.node.admission, now=now,
                                               peer_key=self.key.public_key_hex) is None:
            renewed = JoinToken.from_bytes(fresh).expires
            if renewed > expires:
                self.node.present(fresh)
                self.say(f"join token renewed: admitted until {_utc(renewed)}")
                return
        if now > expires:
            raise InputError(f"this peer's join token expired at {_utc(expires)}: ask the run's coordinator to run: "
                             f"barnraise-coordinator admit {self.key.public_key_hex}")

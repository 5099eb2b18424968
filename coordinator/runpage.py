"""The run page: what ``GET /`` shows, as one JSON document (``GET /api/run``).

The page itself is three files in ``coordinator/static/`` (HTML, CSS, JS; no CDN, no build
step: it works offline). Its script polls ``/api/run`` every few seconds and redraws:

- the held-out loss of every ledger checkpoint, and the training loss by round (the members'
  announced losses, weighted by their samples, of every round this coordinator replayed);
- throughput: the samples in each round's update over the round's seconds, and each live peer's
  own samples per second (from its progress record);
- the live peers (short id, round, samples/s, group size, network seconds, direct or relayed,
  seconds since its last record);
- the ledger (entries, roots) and the ``barnraise-audit`` command that checks it;
- the leaderboard: verified samples per volunteer key (``coordinator.follower``: samples of
  payloads in replayed rounds' updates that another peer signed it held);
- the join commands, with the coordinator key pinned.

``run_page`` is a pure function of what the coordinator holds, so it is tested without a swarm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocol.records import LedgerEntry

__all__ = ["JoinCommands", "join_commands", "run_page", "leaderboard", "RoundPoint", "round_point", "STATIC_FILES",
           "HISTORY"]

STATIC_FILES = {"index.html": "text/html", "run.css": "text/css", "run.js": "text/javascript"}
"""Every file the page is built from (``coordinator/static/``); nothing else is served from there."""
_LEDGER_ROWS = 50
"""Latest ledger entries listed on the page (``/ledger.jsonl`` has them all)."""
HISTORY = 4096
"""Replayed rounds the coordinator keeps for the page's curves."""


@dataclass(frozen=True)
class RoundPoint:
    """One replayed round, from the signed announcements of the payloads its update holds."""

    round: int
    loss: float | None
    """Mean training loss the members announced, weighted by their samples (None: nobody contributed)."""
    samples: int
    samples_per_second: float
    """The members' samples over the round's seconds: the swarm's throughput that round."""
    members: int


def round_point(round_: int, members, round_seconds: float) -> RoundPoint:
    """``members``: the round's ``RoundAnnouncement``s whose payloads its update holds."""
    samples = sum(m.weight for m in members)
    loss = sum(m.loss * m.weight for m in members) / samples if samples > 0 else None
    return RoundPoint(round_, loss, int(samples), samples / round_seconds, len(members))


@dataclass(frozen=True)
class JoinCommands:
    url: str
    """``barnraise-peer join --coordinator URL --coordinator-key HEX``."""
    multiaddr: str | None
    """``barnraise-peer join --initial-peers MULTIADDR --coordinator-key HEX`` (None: no address yet)."""
    audit: str
    """The ``barnraise-audit`` command that checks this run's ledger from its URL."""


def join_commands(url: str, maddrs: Iterable[str], coordinator_key: str, *, private: bool) -> JoinCommands:
    """The exact commands a volunteer or auditor copies: the key is pinned in each, so a joiner
    refuses a run that another key signed."""
    pin = f"--coordinator-key {coordinator_key}"
    token = " --token TOKEN_FILE" if private else ""
    routable = [a for a in maddrs if "/ip4/127." not in a and "/ip6/::1/" not in a] or list(maddrs)
    return JoinCommands(
        url=f"barnraise-peer join --coordinator {url} {pin}",
        multiaddr=f"barnraise-peer join --initial-peers {routable[0]} {pin}{token}" if routable else None,
        audit=f"barnraise-audit verify --ledger {url}/ledger.jsonl --public-key {coordinator_key}",
    )


def leaderboard(credit: Mapping[str, int], limit: int = 100) -> list[dict]:
    """Volunteer keys by verified samples, largest first (ties by key id, so the order is stable)."""
    ranked = sorted(((s, p) for p, s in credit.items() if s > 0), key=lambda item: (-item[0], item[1]))
    total = sum(s for s, _ in ranked) or 1
    ranked = ranked[:limit]
    return [{"rank": i + 1, "peer_id": p, "samples": s, "share": s / total} for i, (s, p) in enumerate(ranked)]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run_page(*, name: str, status: dict, history: Iterable[RoundPoint],
             entries: list[LedgerEntry], credit: Mapping[str, int], commands: JoinCommands,
             private: bool, recent: Mapping[str, tuple[int, float, int]] = {}) -> dict:
    """The page's whole document: every number it draws, already computed here. ``recent``: for a
    peer whose payload was in a replayed round's update, (that round, its samples over the round's
    seconds, the round's members), fresher than its progress record (stored every 40 s)."""

    def peer(p: dict) -> dict:
        round_, rate, group = recent.get(p["peer_id"], (-1, 0.0, 0))
        fresher = round_ >= p["round"]
        return {"short_id": p["peer_id"][:8], "peer_id": p["peer_id"],
                "round": round_ + 1 if fresher else p["round"],
                "samples_per_second": rate if fresher else p["samples_per_second"],
                "group": group if fresher else p["averaged_with"],
                "network_seconds": p["network_seconds"], "relayed": p["relayed"],
                "last_seen": p["seconds_since_report"], "loss": _finite(p["loss"])}

    return {
        "name": name,
        "run_id": status["run_id"],
        "private": private,
        "status": {k: v for k, v in status.items() if k != "peers"},
        "peers": [peer(p) for p in status["peers"]],
        "training_loss": [[p.round, p.loss] for p in history if _finite(p.loss) is not None],
        "throughput": [[p.round, p.samples_per_second, p.members] for p in history],
        "heldout_loss": [[e.round, e.heldout_loss, e.seq] for e in entries if _finite(e.heldout_loss) is not None],
        "ledger": [
            {"seq": e.seq, "round": e.round, "root": e.checkpoint_root, "heldout_loss": _finite(e.heldout_loss),
             "samples": e.total_samples, "contributors": len(e.contributors), "created_at": e.created_at}
            for e in reversed(entries[-_LEDGER_ROWS:])
        ],
        "ledger_entries": len(entries),
        "leaderboard": leaderboard(credit),
        "verified_samples": sum(credit.values()),
        "join": {"url": commands.url, "multiaddr": commands.multiaddr},
        "audit": commands.audit,
    }

"""The coordinator's Prometheus metrics (``GET /metrics``).

Counters move as the coordinator works (rounds replayed, members per round, payloads left out,
checkpoints, progress records rejected by reason); gauges are read from the tracker and the
ledger when Prometheus scrapes, so they cannot drift from what ``/status`` says. Every series
lives in the coordinator's own registry, not the process-wide default, so two coordinators in
one test process do not collide.

    barnraise_rounds_replayed_total{outcome}     applied | empty | void
    barnraise_round_members                      histogram: payloads in each applied round's update
    barnraise_payloads_left_out_total            members announced and held by nobody else
    barnraise_checkpoints_total                  ledger entries written by this process
    barnraise_spot_checks_total{verdict}         passed | failed | unanswered (``coordinator.spotcheck``)
    barnraise_spot_check_seconds                 histogram: seconds of each check's replay
    barnraise_rejected_records{reason}           progress records not believed at the last read:
                                                 malformed | foreign | policy
    barnraise_global_round, barnraise_live_peers, barnraise_verified_samples,
    barnraise_swarm_samples_per_second, barnraise_heldout_loss, barnraise_ledger_entries
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["RunMetrics", "CONTENT_TYPE", "REJECTION_KINDS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REJECTION_KINDS = ("malformed", "foreign", "policy")
"""Why a progress record was not believed (``peer.progress.SwarmView.kinds``)."""
_MEMBER_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)


class RunMetrics:
    """One coordinator's series; ``gauges`` is called at every scrape for the current values."""

    def __init__(self, gauges: Callable[[], dict[str, object]]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.rounds = Counter("barnraise_rounds_replayed", "Rounds the coordinator replayed, by outcome",
                              ["outcome"], registry=self.registry)
        for outcome in ("applied", "empty", "void"):
            self.rounds.labels(outcome)
        self.members = Histogram("barnraise_round_members", "Payloads in each applied round's update",
                                 buckets=_MEMBER_BUCKETS, registry=self.registry)
        self.left_out = Counter("barnraise_payloads_left_out", "Members left out: held by nobody but their author",
                                registry=self.registry)
        self.spot_checks = Counter("barnraise_spot_checks", "Spot checks of members' rounds, by verdict",
                                   ["verdict"], registry=self.registry)
        for verdict in ("passed", "failed", "unanswered"):
            self.spot_checks.labels(verdict)
        self.spot_check_seconds = Histogram("barnraise_spot_check_seconds", "Seconds one spot check's replay took",
                                            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
                                            registry=self.registry)
        self.checkpoints = Counter("barnraise_checkpoints", "Ledger entries written by this coordinator process",
                                   registry=self.registry)
        self.registry.register(_Gauges(gauges))

    def round_replayed(self, *, members: int, void: bool, dropped: int) -> None:
        outcome = "void" if void else "empty" if members == 0 else "applied"
        self.rounds.labels(outcome).inc()
        if outcome == "applied":
            self.members.observe(members)
        self.left_out.inc(dropped)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_GAUGE_HELP = {
    "global_round": "Median round of the live peers",
    "live_peers": "Peers whose progress record arrived within its lifetime",
    "verified_samples": "Samples of payloads in replayed rounds' updates, held by another peer, in all",
    "swarm_samples_per_second": "Sum of the live peers' reported samples per second",
    "heldout_loss": "Held-out loss of the ledger's latest checkpoint (nats/byte)",
    "ledger_entries": "Entries in the ledger, genesis included",
    "replayed_round": "The round the coordinator's copy of the consensus has reached",
}


_REJECTED_HELP = "Progress records not believed at the coordinator's last read, by reason"


class _Gauges(Collector):
    """Gauges read at scrape time: ``read()`` gives each name of ``_GAUGE_HELP`` (None: no value
    yet, the series is left out) and ``rejected_records``, a count per ``REJECTION_KINDS``."""

    def __init__(self, read: Callable[[], dict[str, object]]):
        self.read = read

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(f"barnraise_{name}", text) for name, text in _GAUGE_HELP.items()] + [
            GaugeMetricFamily("barnraise_rejected_records", _REJECTED_HELP, labels=["reason"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        values = self.read()
        for name, text in _GAUGE_HELP.items():
            if (value := values.get(name)) is not None:
                yield GaugeMetricFamily(f"barnraise_{name}", text, value=float(value))
        rejected = GaugeMetricFamily("barnraise_rejected_records", _REJECTED_HELP, labels=["reason"])
        kinds = values.get("rejected_records") or {}
        for kind in REJECTION_KINDS:
            rejected.add_metric([kind], float(kinds.get(kind, 0)))
        yield rejected

"""A peer's Prometheus metrics: ``barnraise-peer join --metrics-port N`` serves them at
``http://HOST:N/metrics`` (the peer's ``--host``; 127.0.0.1 unless it listens on a public one).

    barnraise_peer_rounds_total{outcome}            averaged | alone | left_for_later | not_in_round
                                                    | void | out_of_step
    barnraise_peer_group_size                       histogram: payloads in each round's update
    barnraise_peer_payload_bytes_sent_total         this peer's payloads (compressed), once each
    barnraise_peer_payload_bytes_received_total     the other members' payloads of rounds it applied
    barnraise_peer_samples_total                    samples trained (inner steps × batch)
    barnraise_peer_compute_seconds_total            seconds of inner steps
    barnraise_peer_wait_seconds_total               seconds idle, waiting on the network
    barnraise_peer_network_seconds_total            seconds from a round's read to its update in hand
    barnraise_peer_loss                             the last round's training loss

The server is prometheus_client's (a WSGI server on its own thread); ``close`` shuts it down
and joins that thread, so a stopped peer leaves nothing listening.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from peer.rounds import RoundOutcome
from protocol.errors import InputError

__all__ = ["PeerMetrics", "OUTCOMES", "outcome_of"]

OUTCOMES = ("averaged", "alone", "left_for_later", "not_in_round", "void", "out_of_step")
"""What a round was for this peer: averaged with others, or local (and why)."""
_GROUP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)
_CLOSE_SECONDS = 5.0


def outcome_of(outcome: RoundOutcome) -> str:
    """The ``outcome`` label of a round: the same order of causes as the peer's progress line."""
    if outcome.failure is not None:
        return "out_of_step"
    if outcome.void is not None:
        return "void"
    if outcome.waiting:
        return "left_for_later"
    if not outcome.entered:
        return "not_in_round"
    return "averaged" if outcome.contributors >= 2 else "alone"


class PeerMetrics:
    """This peer's series, in a registry of its own; ``serve`` starts the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter("barnraise_peer_rounds", "Rounds this peer took part in, by outcome", ["outcome"],
                              registry=r)
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)
        self.group = Histogram("barnraise_peer_group_size", "Payloads in each round's update",
                               buckets=_GROUP_BUCKETS, registry=r)
        self.sent = Counter("barnraise_peer_payload_bytes_sent", "Bytes of this peer's payloads", registry=r)
        self.received = Counter("barnraise_peer_payload_bytes_received",
                                "Bytes of other members' payloads in the rounds this peer applied", registry=r)
        self.samples = Counter("barnraise_peer_samples", "Samples trained", registry=r)
        self.compute = Counter("barnraise_peer_compute_seconds", "Seconds of inner steps", registry=r)
        self.wait = Counter("barnraise_peer_wait_seconds", "Seconds idle, waiting on the network", registry=r)
        self.network = Counter("barnraise_peer_network_seconds",
                               "Seconds from a round's read to its update in hand", registry=r)
        self.loss = Gauge("barnraise_peer_loss", "The last round's training loss (nats per token)", registry=r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def round(self, outcome: RoundOutcome, *, received_bytes: int = 0) -> None:
        self.rounds.labels(outcome_of(outcome)).inc()
        if outcome.failure is None and outcome.void is None:
            self.group.observe(max(1, outcome.contributors))
        self.sent.inc(outcome.payload_bytes)
        self.received.inc(received_bytes)
        self.samples.inc(outcome.samples)
        self.compute.inc(outcome.compute_seconds)
        self.wait.inc(outcome.wait_seconds)
        self.network.inc(outcome.network_seconds)
        self.loss.set(outcome.loss)

    def serve(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise InputError(f"--metrics-port {port}: cannot listen on {host}:{port}: {error.strerror or error}") from None
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=_CLOSE_SECONDS)
            self._server = self._thread = None

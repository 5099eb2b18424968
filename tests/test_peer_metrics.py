"""A peer's Prometheus metrics (``--metrics-port``): counters by round outcome, served over HTTP
on loopback, and nothing left listening after ``close``."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest

from peer.metrics import OUTCOMES, PeerMetrics, outcome_of
from peer.rounds import RoundOutcome
from protocol.errors import InputError


def _outcome(**overrides) -> RoundOutcome:
    fields = dict(round=3, loss=2.5, samples=160, samples_per_second=40.0, contributors=3, entered=True, waiting=False,
                  void=None, failure=None, compute_seconds=4.0, network_seconds=1.5, wait_seconds=0.5,
                  payload_bytes=7000)
    return RoundOutcome(**fields | overrides)


def _value(text: str, name: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(found) == 1, (name, text)
    return found[0]


def test_each_round_counts_under_the_cause_its_progress_line_names():
    assert [outcome_of(_outcome(**o)) for o in (
        {}, {"contributors": 1}, {"waiting": True, "entered": False}, {"entered": False},
        {"void": "1 of 3 payloads did not arrive"}, {"failure": "out of step"},
    )] == list(OUTCOMES)


def test_metrics_are_served_on_loopback_and_move_with_rounds_then_the_server_stops():
    metrics = PeerMetrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        before = urllib.request.urlopen(url, timeout=5).read().decode()
        assert _value(before, 'barnraise_peer_rounds_total{outcome="averaged"}') == 0
        metrics.round(_outcome(), received_bytes=14000)
        metrics.round(_outcome(void="gone", contributors=3))
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert _value(text, 'barnraise_peer_rounds_total{outcome="averaged"}') == 1
        assert _value(text, 'barnraise_peer_rounds_total{outcome="void"}') == 1
        assert _value(text, "barnraise_peer_group_size_count") == 1  # a void round has no group
        assert _value(text, "barnraise_peer_payload_bytes_sent_total") == 14000
        assert _value(text, "barnraise_peer_payload_bytes_received_total") == 14000
        assert _value(text, "barnraise_peer_samples_total") == 320
        assert _value(text, "barnraise_peer_wait_seconds_total") == 1.0
        assert _value(text, "barnraise_peer_loss") == 2.5
    finally:
        metrics.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not [t for t in threading.enumerate() if t.name != "MainThread" and "serve_forever" in repr(t)]


def test_a_port_in_use_is_one_line_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InputError, match=r"^--metrics-port \d+: cannot listen on 127.0.0.1:\d+"):
            PeerMetrics().serve("127.0.0.1", taken.getsockname()[1])

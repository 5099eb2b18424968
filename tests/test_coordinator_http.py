"""The coordinator's HTTP view, run page data, metrics and tracker, in process (aiohttp's test
client): no swarm, no subprocess. The live run page is tested in a browser in test_run_page.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_asyncio
import torch
from aiohttp.test_utils import TestClient, TestServer
from safetensors.torch import save_file

from coordinator.audit import file_record
from coordinator.cli import main as coordinator_main
from coordinator.http import HttpView, build_app
from coordinator.metrics import CONTENT_TYPE, RunMetrics
from coordinator.runpage import RoundPoint, join_commands, leaderboard, round_point, run_page
from coordinator.tracker import Tracker
from peer.progress import SwarmView
from protocol.ledger import entry_to_json, next_entry
from protocol.multiaddr import libp2p_id_of
from protocol.records import Contribution, LedgerEntry, PeerProgress
from protocol.signing import SigningKey, key_id, public_key_to_pem

RUN = "0123456789abcdef"
COORDINATOR = SigningKey.generate()
KEYS = [SigningKey.generate() for _ in range(3)]


def _progress(key: SigningKey, *, round_: int, loss: float = 3.0, rate: float = 10.0, maddrs=(), at: float | None = None,
              samples: int = 100) -> PeerProgress:
    return PeerProgress.signed(
        key, run_id=RUN, round=round_, samples=samples, loss=loss, samples_per_second=rate, averaged_with=3,
        averaged=True, network_seconds=0.25, state_root="ab" * 32, p2p_id=libp2p_id_of(key.public_key_hex),
        maddrs=list(maddrs), time=time.time() if at is None else at)


def _view(records: list[PeerProgress], **kinds: int) -> SwarmView:
    return SwarmView({r.peer_id: r for r in records}, sum(kinds.values()), time.time(), (), dict(kinds))


def _entries(tmp_path: Path, rounds=(0, 5, 10)) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for round_ in rounds:
        path = tmp_path / f"r{round_}.safetensors"
        save_file({"w": torch.full((2,), float(round_))}, str(path))
        entries.append(next_entry(COORDINATOR, entries[-1] if entries else None, run_id=RUN, round=round_,
                                  created_at=1_700_000_000.0 + round_, files=[file_record(path)],
                                  contributors=[Contribution(peer_id=key_id(KEYS[0].public_key_hex), samples=64 * round_)] if round_ else [],
                                  heldout_loss=None if round_ == 0 else 5.0 - round_ / 10))
    return entries


def _tracker() -> Tracker:
    tracker = Tracker(RUN, samples_per_round=1000)
    tracker.update(_view([_progress(KEYS[0], round_=3, loss=4.0), _progress(KEYS[1], round_=3, loss=4.2)]))
    tracker.update(_view([_progress(KEYS[0], round_=4, loss=3.5), _progress(KEYS[1], round_=4, loss=3.7),
                          _progress(KEYS[2], round_=4, maddrs=["/ip4/1.2.3.4/tcp/1/p2p/QmRelay/p2p-circuit"])],
                         malformed=2, policy=1))
    return tracker


COMMANDS = join_commands("http://127.0.0.1:8470", ["/ip4/127.0.0.1/tcp/4000/p2p/QmC", "/ip4/10.0.0.2/tcp/4000/p2p/QmC"],
                         COORDINATOR.public_key_hex, private=False)


def _page(tmp_path: Path, tracker: Tracker | None = None) -> dict:
    tracker = tracker or _tracker()
    entries = _entries(tmp_path)
    history = [round_point(3, [SimpleNamespace(weight=100.0, loss=4.1)], 5.0), round_point(4, (), 5.0),
               round_point(5, [SimpleNamespace(weight=100.0, loss=3.4)] * 2, 5.0)]
    return run_page(name="tiny", status=tracker.status(entries[-1]), history=history, entries=entries,
                    credit={key_id(KEYS[0].public_key_hex): 640, key_id(KEYS[1].public_key_hex): 320, key_id(KEYS[2].public_key_hex): 0}, commands=COMMANDS,
                    private=False)


# --- tracker and page data (pure)


def test_a_round_point_weights_the_members_losses_by_their_samples():
    members = [SimpleNamespace(weight=300.0, loss=3.0), SimpleNamespace(weight=100.0, loss=4.0)]
    assert round_point(7, members, 8.0) == RoundPoint(7, 3.25, 400, 50.0, 2)
    assert round_point(8, (), 8.0) == RoundPoint(8, None, 0, 0.0, 0)  # empty or void: no loss, no samples


def test_status_lists_every_record_field_and_whether_a_peer_is_relayed():
    status = _tracker().status(None)
    assert status["rejected_by_reason"] == {"malformed": 2, "policy": 1}
    assert status["samples_per_second"] == 30.0
    by_id = {p["peer_id"]: p for p in status["peers"]}
    assert [by_id[key_id(k.public_key_hex)]["relayed"] for k in KEYS] == [False, False, True]
    for field in PeerProgress.FIELDS:
        if field.name not in ("version", "run_id", "signature", "samples"):
            assert field.name in by_id[key_id(KEYS[0].public_key_hex)], field.name
    assert by_id[key_id(KEYS[0].public_key_hex)]["samples_reported"] == 100


def test_the_page_document_has_curves_peers_ledger_leaderboard_and_commands(tmp_path):
    page = _page(tmp_path)
    assert page["training_loss"] == [[3, 4.1], [5, 3.4]]  # the empty round 4 has no loss
    assert page["throughput"] == [[3, 20.0, 1], [4, 0.0, 0], [5, 40.0, 2]]
    assert page["heldout_loss"] == [[5, 4.5, 1], [10, 4.0, 2]]  # genesis has none: left off, not NaN
    assert [p["short_id"] for p in page["peers"]] == sorted(key_id(k.public_key_hex)[:8] for k in KEYS)
    assert [e["seq"] for e in page["ledger"]] == [2, 1, 0] and page["ledger_entries"] == 3
    assert [(r["rank"], r["peer_id"], r["samples"]) for r in page["leaderboard"]] == [
        (1, key_id(KEYS[0].public_key_hex), 640), (2, key_id(KEYS[1].public_key_hex), 320)]
    assert page["join"]["url"] == f"barnraise-peer join --coordinator http://127.0.0.1:8470 --coordinator-key {COORDINATOR.public_key_hex}"
    # the loopback address is not offered to other machines when a routable one exists
    assert page["join"]["multiaddr"].startswith("barnraise-peer join --initial-peers /ip4/10.0.0.2/tcp/4000/p2p/QmC ")
    assert page["audit"] == (f"barnraise-audit verify --ledger http://127.0.0.1:8470/ledger.jsonl "
                             f"--public-key {COORDINATOR.public_key_hex}")
    json.dumps(page, allow_nan=False)  # what the handler sends: no NaN, every value JSON


def test_a_peers_row_takes_its_latest_replayed_round_when_fresher_than_its_record(tmp_path):
    tracker = _tracker()  # records at round 4
    entries = _entries(tmp_path)
    fresh, stale = key_id(KEYS[0].public_key_hex), key_id(KEYS[1].public_key_hex)
    page = run_page(name="tiny", status=tracker.status(entries[-1]), history=[], entries=entries, credit={},
                    commands=COMMANDS, private=False, recent={fresh: (6, 25.0, 2), stale: (2, 99.0, 9)})
    rows = {p["peer_id"]: p for p in page["peers"]}
    assert (rows[fresh]["round"], rows[fresh]["samples_per_second"], rows[fresh]["group"]) == (7, 25.0, 2)
    assert (rows[stale]["round"], rows[stale]["samples_per_second"], rows[stale]["group"]) == (4, 10.0, 3)


def test_the_leaderboard_ranks_by_verified_samples_then_key_and_skips_zero():
    board = leaderboard({"b" * 16: 5, "a" * 16: 5, "c" * 16: 9, "d" * 16: 0})
    assert [(r["peer_id"][0], r["samples"]) for r in board] == [("c", 9), ("a", 5), ("b", 5)]
    assert sum(r["share"] for r in board) == pytest.approx(1.0)


def test_a_private_runs_swarm_join_command_asks_for_the_token():
    commands = join_commands("http://h:1", ["/ip4/10.0.0.2/tcp/1/p2p/Qm"], "ab" * 32, private=True)
    assert commands.multiaddr.endswith(" --token TOKEN_FILE")
    assert join_commands("http://h:1", [], "ab" * 32, private=False).multiaddr is None


def test_credit_prints_the_leaderboard_of_a_signed_ledger_as_text_or_json(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "ledger.jsonl").write_text("".join(entry_to_json(e) + "\n" for e in _entries(tmp_path)))
    (workdir / "coordinator.pub").write_bytes(public_key_to_pem(COORDINATOR.public_key_hex))
    assert coordinator_main(["credit", "--workdir", str(workdir), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ledger_entry"] == 2 and report["leaderboard"] == [
        {"rank": 1, "peer_id": key_id(KEYS[0].public_key_hex), "samples": 640, "share": 1.0}]
    assert coordinator_main(["credit", "--workdir", str(workdir)]) == 0
    assert key_id(KEYS[0].public_key_hex) in capsys.readouterr().out
    (workdir / "coordinator.pub").write_bytes(public_key_to_pem(KEYS[1].public_key_hex))  # not the ledger's signer
    assert coordinator_main(["credit", "--workdir", str(workdir)]) == 1
    assert coordinator_main(["credit", "--workdir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no run's ledger there" in err[1], err


# --- metrics


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, text)
    return values[0]


def test_metrics_counters_move_with_the_rounds_and_gauges_read_the_tracker():
    tracker = _tracker()
    metrics = RunMetrics(lambda: {"global_round": tracker.global_round, "live_peers": len(tracker.alive()),
                                  "heldout_loss": None, "rejected_records": tracker.rejected_kinds})
    before = metrics.render().decode()
    assert _metric(before, 'barnraise_rounds_replayed_total{outcome="applied"}') == 0
    metrics.round_replayed(members=3, void=False, dropped=1)
    metrics.round_replayed(members=0, void=False, dropped=0)
    metrics.round_replayed(members=2, void=True, dropped=0)
    metrics.checkpoints.inc()
    text = metrics.render().decode()
    assert _metric(text, 'barnraise_rounds_replayed_total{outcome="applied"}') == 1
    assert _metric(text, 'barnraise_rounds_replayed_total{outcome="empty"}') == 1
    assert _metric(text, 'barnraise_rounds_replayed_total{outcome="void"}') == 1
    assert _metric(text, "barnraise_round_members_sum") == 3
    assert _metric(text, "barnraise_payloads_left_out_total") == 1
    assert _metric(text, "barnraise_checkpoints_total") == 1
    assert _metric(text, "barnraise_global_round") == 4 and _metric(text, "barnraise_live_peers") == 3
    assert _metric(text, 'barnraise_rejected_records{reason="malformed"}') == 2
    assert _metric(text, 'barnraise_rejected_records{reason="foreign"}') == 0
    assert "barnraise_heldout_loss " not in text  # no value yet: the series is left out, not 0 or NaN


# --- the HTTP view, in process


@pytest_asyncio.fixture
async def client(tmp_path):
    tracker = _tracker()
    metrics = RunMetrics(lambda: {"global_round": tracker.global_round})
    pages: list[dict | None] = [None]
    view = HttpView(manifest_bytes=b"m", manifest_json={}, public_key_pem=b"pem", checkpoints=tmp_path,
                    ledger_jsonl=lambda: "", status=lambda: tracker.status(None), bootstrap=lambda: [],
                    page=lambda: pages[0], metrics=lambda: (metrics.render(), CONTENT_TYPE))
    async with TestClient(TestServer(build_app(view))) as test_client:
        test_client.pages = pages
        test_client.page_data = _page(tmp_path, tracker)
        yield test_client


@pytest.mark.asyncio
async def test_the_run_page_and_its_files_are_served_from_the_package_with_a_strict_policy(client):
    response = await client.get("/")
    assert response.status == 200 and response.content_type == "text/html"
    html = await response.text()
    assert '<script src="/static/run.js"' in html and "http" not in html.split("<body>")[0].replace(
        'name="viewport"', "")  # nothing fetched from elsewhere
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    for name, kind in (("run.js", "text/javascript"), ("run.css", "text/css")):
        response = await client.get(f"/static/{name}")
        assert response.status == 200 and response.content_type == kind
    for path in ("/static/../http.py", "/static/http.py", "/static/index.htm"):
        assert (await client.get(path)).status == 404, path


@pytest.mark.asyncio
async def test_the_page_data_is_503_until_the_coordinator_knows_its_url_then_json(client):
    response = await client.get("/api/run")
    assert response.status == 503
    client.pages[0] = client.page_data
    response = await client.get("/api/run")
    assert response.status == 200 and response.headers["Cache-Control"] == "no-cache"
    assert (await response.json())["peers"] == client.page_data["peers"]


@pytest.mark.asyncio
async def test_metrics_are_served_in_prometheus_text_format(client):
    response = await client.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    assert "# TYPE barnraise_rounds_replayed_total counter" in text and _metric(text, "barnraise_global_round") == 4


@pytest.mark.asyncio
async def test_status_is_json_with_the_live_peers(client):
    status = await (await client.get("/status")).json()
    assert status["alive_peers"] == 3 and len(status["peers"]) == 3


@pytest.mark.asyncio
async def test_a_view_without_page_or_metrics_answers_404(tmp_path):
    view = HttpView(manifest_bytes=b"m", manifest_json={}, public_key_pem=b"pem", checkpoints=tmp_path,
                    ledger_jsonl=lambda: "", status=lambda: {}, bootstrap=lambda: [])
    async with TestClient(TestServer(build_app(view))) as test_client:
        for path in ("/", "/api/run", "/metrics"):
            assert (await test_client.get(path)).status == 404, path


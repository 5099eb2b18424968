"""The run page in a real headless browser (Debian's Chromium, driven by Playwright) against a live
loopback run: the loss curve has points, the peers table lists the live peers, the page refreshes
itself, and the browser logs no error. The same run's ``/metrics`` counters move, on the
coordinator and on a peer (``--metrics-port``) whose traffic is capped at 0.5 Mbit/s each way
and which still averages every round: paced, not broken.

Set BARNRAISE_SCREENSHOT=path.png to keep a screenshot of the page (docs/run-page.png is one).
CI sets BARNRAISE_REQUIRE_BROWSER=1: there a missing Chromium fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import SMALL_RUN, http_get, read_rounds, serve_coordinator, wait_for_line, wait_until

pytestmark = pytest.mark.swarm

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium, as root in a closed network: no sandbox, and none of its own background connections
_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _browser_or_skip():
    missing = None if Path(CHROMIUM).exists() else f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "playwright is not installed (pip install -e '.[dev]')"
        sync_playwright = None
    if missing is not None:
        if os.environ.get("BARNRAISE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test cannot run: {missing}", pytrace=False)
        pytest.skip(missing)
    return sync_playwright


def _until(page, check, timeout: float, what: str) -> None:
    """Poll ``check()`` in Python: Playwright's ``wait_for_function`` evaluates a string, which the
    page's Content-Security-Policy (no 'unsafe-eval') rightly refuses."""
    for _ in range(int(timeout / 0.25)):
        if check():
            return
        page.wait_for_timeout(250)
    raise AssertionError(f"the page did not show {what} within {timeout:.0f} s")


def _metric(text: str, name: str) -> float:
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return found[0] if found else 0.0


def test_the_run_page_shows_a_live_run_in_a_browser_and_metrics_move(tmp_path, procs):
    sync_playwright = _browser_or_skip()
    coordinator, url = serve_coordinator(procs, tmp_path, SMALL_RUN)
    peers = [procs.peer("p1", url, tmp_path / "p1"),
             procs.peer("p2", url, tmp_path / "p2", "--max-upload-mbps", "0.5", "--max-download-mbps", "0.5",
                        "--metrics-port", "0")]
    status = lambda: json.loads(http_get(f"{url}/status"))  # noqa: E731
    wait_until(lambda: status()["alive_peers"] == 2 and status()["last_checkpoint"]["seq"] >= 1, 150,
               "two live peers and a checkpoint past genesis", must_run=[coordinator, *peers])
    applied = lambda: _metric(http_get(f"{url}/metrics").decode(), 'barnraise_rounds_replayed_total{outcome="applied"}')  # noqa: E731
    first = applied()
    assert first >= 1
    live = {p["peer_id"] for p in status()["peers"]}

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(f"{url}/", wait_until="load")
            _until(page, lambda: int(page.get_attribute("#loss-chart", "data-points") or 0) >= 2, 20,
                   "a loss curve with points")
            page.wait_for_selector("#loss-chart circle.heldout", timeout=10_000)  # a held-out point per checkpoint
            page.wait_for_selector("#loss-chart path.train", timeout=10_000)  # the training loss by round
            page.wait_for_selector("#rate-chart path.rate", timeout=10_000)
            shown = set(page.eval_on_selector_all("#peers tbody tr", "rows => rows.map(r => r.dataset.peerId)"))
            assert shown == live, (shown, live)
            assert page.inner_text("#join-url").startswith(f"barnraise-peer join --coordinator {url} --coordinator-key ")
            assert page.inner_text("#audit").startswith(f"barnraise-audit verify --ledger {url}/ledger.jsonl ")
            assert page.locator("#ledger tbody tr").count() >= 2
            before = page.inner_text("#updated")
            _until(page, lambda: page.inner_text("#updated") != before, 10, "a refresh by itself")
            page.click("button[data-copy=join-url]")
            _until(page, lambda: page.inner_text("button[data-copy=join-url]") != "copy", 5, "the copy acknowledged")
            if target := os.environ.get("BARNRAISE_SCREENSHOT"):
                page.wait_for_timeout(4000)
                page.screenshot(path=target, full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    wait_until(lambda: applied() > first, 60, "the replayed-rounds counter to move", must_run=[coordinator, *peers])

    # the capped peer's own metrics move too, and every round it took part in averaged with the other
    metrics_url = re.search(r"metrics at (http://\S+/metrics)", wait_for_line(peers[1], "metrics at", 5)).group(1)
    averaged = lambda: _metric(http_get(metrics_url).decode(), 'barnraise_peer_rounds_total{outcome="averaged"}')  # noqa: E731
    before = averaged()
    wait_until(lambda: averaged() > before, 60, "the capped peer's averaged-rounds counter to move", must_run=peers)
    assert _metric(http_get(metrics_url).decode(), "barnraise_peer_payload_bytes_received_total") > 0
    rounds = read_rounds(tmp_path / "p2")[1:]  # its first round may be alone: the other had not joined yet
    assert rounds and all(r["failure"] is None and r["void"] is None and r["contributors"] == 2 for r in rounds), rounds
    procs.stop(*peers, coordinator)

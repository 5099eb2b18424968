"""The bytes-to-loss table: ratios to data-parallel and the 2% equal-loss rule (pure, no runs)."""

from __future__ import annotations

import pytest

from bench.bytes_to_loss import DP, LOSS_TOLERANCE, table


def _result(name: str, loss: float, sent: float) -> dict:
    return {"contender": name, "heldout_loss": loss, "bytes_per_peer": sent, "seconds": 10.0,
            "compute_fraction": 0.5, "tokens": 1000}


def test_ratios_and_the_equal_loss_rule():
    text, rows = table([_result(DP, 2.0, 1e9), _result("barnraise-a", 2.0 * (1 + LOSS_TOLERANCE), 1e6),
                        _result("barnraise-b", 2.1, 1e5)])
    by_name = {row["contender"]: row for row in rows}
    assert by_name[DP]["ratio_to_dp"] == 1.0 and by_name[DP]["equal_loss"]
    assert by_name["barnraise-a"]["ratio_to_dp"] == pytest.approx(1000.0)
    assert by_name["barnraise-a"]["equal_loss"], "exactly 2% above is still equal loss"
    assert not by_name["barnraise-b"]["equal_loss"] and by_name["barnraise-b"]["loss_gap"] == pytest.approx(0.05)
    assert "1,000×" in text and "+5.0%" in text


def test_without_data_parallel_there_is_no_ratio():
    _, rows = table([_result("barnraise-a", 2.0, 1e6)])
    assert rows[0]["ratio_to_dp"] is None and not rows[0]["equal_loss"]

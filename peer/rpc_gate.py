"""Who a peer serves: the gate in front of its payload, notice and state RPCs.

libp2p authenticates every caller's libp2p id. In a private run a request carries the caller's
join token (in ``AveragingData.peer_id``, a free bytes field of hivemind's message), and the gate
serves it only if ``protocol.policy.token_problem`` finds the token admits that very id. In any
run, each caller gets at most ``RATE`` requests a second (a burst of ``BURST``): enough for a
round's payloads and a joiner's files, not for a flood.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from protocol.policy import Admission, token_problem

__all__ = ["RpcGate"]

RATE = 50.0
"""Requests a second one caller may make, sustained."""
BURST = 200.0
"""Requests one caller may make at once."""
MAX_CALLERS = 4096
"""Callers whose budget and token the gate remembers (the least recent are forgotten)."""
_TOKEN_RECHECK = 60.0
"""Seconds a verified token is trusted for before it is checked again (it may expire)."""


class RpcGate:
    def __init__(self, admission: Admission | None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.admission, self._clock, self._wall = admission, clock, wall
        self._callers: OrderedDict[str, list] = OrderedDict()
        """caller -> [tokens left, at, verified token bytes, verified until]."""
        self.refused: dict[str, int] = {}
        """Refusals by reason ("token", "rate"), for the peer's metrics."""

    def allows(self, caller: str, presented: bytes) -> bool:
        now = self._clock()
        entry = self._callers.get(caller)
        if entry is None:
            entry = [BURST, now, b"", -1.0]
            self._callers[caller] = entry
            while len(self._callers) > MAX_CALLERS:
                self._callers.popitem(last=False)
        self._callers.move_to_end(caller)
        entry[0] = min(BURST, entry[0] + (now - entry[1]) * RATE)
        entry[1] = now
        if entry[0] < 1.0:
            return self._refuse("rate")
        entry[0] -= 1.0
        if self.admission is None:
            return True
        if entry[2] == presented and now < entry[3]:
            return True
        if token_problem(presented, self.admission, now=self._wall(), p2p_id=caller) is not None:
            return self._refuse("token")
        entry[2], entry[3] = presented, now + _TOKEN_RECHECK
        return True

    def _refuse(self, reason: str) -> bool:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return False

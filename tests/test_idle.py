"""--only-when-idle: others' share of the CPU, a pause above the threshold, a resume after two calm readings."""

from __future__ import annotations

from peer.idle import INTERVAL, IdleWatch, read_proc_stat


class _Machine:
    def __init__(self):
        self.now, self.busy, self.total, self.mine = 0.0, 0.0, 0.0, 0.0

    def tick(self, *, others: float, mine: float = 0.0, cpus: int = 2) -> None:
        """``INTERVAL`` seconds pass; others use ``others`` of the machine, this peer ``mine`` (shares)."""
        self.now += INTERVAL
        self.total += INTERVAL * cpus
        self.busy += INTERVAL * cpus * (others + mine)
        self.mine += INTERVAL * cpus * mine


def _watch(machine: _Machine, percent: float = 25.0) -> IdleWatch:
    return IdleWatch(percent, clock=lambda: machine.now, stat=lambda: (machine.busy, machine.total),
                     own=lambda: machine.mine)


def test_its_own_training_does_not_count_and_others_above_the_threshold_pause_it():
    machine = _Machine()
    watch = _watch(machine)
    machine.tick(others=0.05, mine=0.9)  # the peer itself keeps the machine busy: still idle for others
    assert watch.reason() is None and round(watch.busy) == 5
    machine.tick(others=0.6, mine=0.3)
    assert "other programs use 60% of its CPU, above 25%" in watch.reason()


def test_it_resumes_after_two_calm_readings_and_keeps_its_verdict_between_readings():
    machine = _Machine()
    watch = _watch(machine)
    machine.tick(others=0.9)
    assert watch.reason() is not None
    machine.now += 1.0  # within the interval: the same verdict, no new reading
    assert watch.reason() is not None
    machine.tick(others=0.1)
    assert watch.reason() is not None  # one calm reading is not enough
    machine.tick(others=0.1)
    assert watch.reason() is None


def test_without_proc_stat_it_never_pauses():
    watch = IdleWatch(25.0, stat=lambda: None)
    assert watch.unsupported and watch.reason() is None


def test_proc_stat_reads_here():
    busy, total = read_proc_stat()
    assert 0 <= busy <= total

"""Child processes for the demo: started in their own session, output prefixed, always reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Child", "group_alive", "kill_group"]


class Child:
    """One ``python -m MODULE ...`` child; its output is echoed with a prefix and kept in a log."""

    def __init__(self, name: str, module: str, args: Sequence[str], log_path: Path, echo: bool = True):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # a signal to the group reaches hivemind's daemons too
        )
        self._echo = echo
        self._interrupted = False
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            if self._echo:
                print(line, end="", flush=True)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def interrupt(self) -> None:
        """Send one SIGINT (a second one would make a peer leave without finishing)."""
        if self.running and not self._interrupted:
            self.process.send_signal(signal.SIGINT)
            self._interrupted = True

    def stop(self, grace: float) -> int:
        """SIGINT, wait up to ``grace`` seconds, then SIGKILL the whole group; returns the exit code."""
        self.interrupt()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running:
            print(f"[demo] {self.name} did not stop within {grace:.0f} s: killing it", flush=True)
            kill_group(self.process.pid)
        code = self.process.wait(timeout=30)
        if group_alive(self.process.pid):
            print(f"[demo] {self.name} left processes behind: killing them", flush=True)
            kill_group(self.process.pid)
        self._reader.join(timeout=5)
        self._log.close()
        return code


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just not ours to signal
        return True
    return True


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` (none left is fine)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass

"""Children die with their parent: no DHT, averager or ``p2pd`` left behind by a killed peer.

A peer killed with SIGKILL (the OOM killer, a closed laptop lid) cannot shut anything down, and
its hivemind helpers -- the DHT process, the averager process and the DHT's ``p2pd`` -- used to
run on, adopted by init. ``bind_children_to_this_process()`` (called once, early, from the main
thread, before hivemind starts anything) makes every process later *forked* from this process, and
from those, get SIGKILL from the kernel when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

How it reaches each process, as measured on Linux with hivemind 1.1.12, Python 3.11, uvloop 0.23:

* hivemind's DHT (``mp.context.ForkProcess``) and averager (``mp.Process``, the fork start method
  on Linux before Python 3.14) are started with ``os.fork()``, which runs ``os.register_at_fork``
  hooks in the child: the hook arms the death signal there, before any hivemind code runs.
* ``p2pd`` is started by the DHT process on uvloop (hivemind's ``switch_to_uvloop``); uvloop's
  spawn runs the same at-fork hooks in the new child before ``exec``, and the death signal survives
  ``exec`` (``p2pd`` is not set-uid and has no file capabilities), so ``p2pd`` dies with the DHT
  process, which dies with the peer: the whole tree is gone within milliseconds.
* The death signal is tied to the parent *thread* that forked. A child forked from the main thread
  of its parent (the usual case; Barnraise starts hivemind from the main thread) is armed. A child
  forked from another thread is not (it would die when that thread ends); it gets a small watcher
  thread instead, which polls ``getppid()`` and on the parent's death kills the child's own
  children, then the child.
* Not covered: programs started with ``subprocess``/``asyncio``'s default loop (``_posixsubprocess``
  and ``posix_spawn`` run no Python in the child), and multiprocessing's ``spawn``/``forkserver``
  start methods. They can be covered by passing ``preexec_fn`` (any, even ``lambda: None``) to
  ``subprocess.Popen``, which runs the at-fork hooks.

The hook does only what is safe right after ``fork()``: two system calls (``prctl``, ``getppid``)
through a ``ctypes`` function resolved beforehand; no locks, no imports, no threads (except the
rare watcher above). On other systems than Linux every forked child gets the watcher.
"""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["bind_children_to_this_process"]

_PR_SET_PDEATHSIG = 1
_WATCH_SECONDS = 0.5
"""How often a watcher thread (the fallback, see above) checks that its parent is alive."""

_bound = False
_prctl = None  # libc's prctl, resolved before any fork (Linux only)
_pid = 0  # this process's pid; read in a newly forked child, it is the parent's
_main_ident = 0  # threading ident of this process's main thread; in a child, that of its parent


def bind_children_to_this_process() -> None:
    """Make every process forked from now on (and, recursively, from those) die with its parent.

    Call once, early in the program's main thread, before hivemind (or anything else) starts
    child processes; later calls do nothing. The calling process itself is not affected.
    """
    global _bound, _prctl, _pid, _main_ident
    if _bound:
        return
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
            prctl.restype = ctypes.c_int
            _prctl = prctl
        except (OSError, AttributeError):  # no libc to load: fall back to the watcher thread
            _prctl = None
    _pid = os.getpid()
    _main_ident = threading.main_thread().ident or threading.get_ident()
    # threading's own after-fork hook (registered when threading was imported, so it runs first)
    # has already made the forking thread the child's main thread when this one runs.
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _bound = True


def _after_fork_in_child() -> None:
    """In every child forked from a bound process: arm the death signal, or else start a watcher."""
    global _pid, _main_ident
    parent, _pid = _pid, os.getpid()
    forking_thread = threading.get_ident()  # the same thread id the forking thread had in the parent
    from_main_thread = forking_thread == _main_ident
    _main_ident = forking_thread  # the child's only thread, thus its main thread (for its own forks)
    if from_main_thread and _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os.kill(os.getpid(), signal.SIGKILL)
        return
    _thread.start_new_thread(_watch_parent, (parent,))


def _watch_parent(parent: int) -> None:
    """(Watcher thread) once the parent is gone, kill this process's children, then this process."""
    while os.getppid() == parent:
        time.sleep(_WATCH_SECONDS)
    for child in _children():
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _children() -> list[int]:
    """This process's direct children (Linux ``/proc``; none found elsewhere)."""
    found = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as listing:
                found.extend(int(pid) for pid in listing.read().split())
        except (OSError, ValueError):
            continue
    return found

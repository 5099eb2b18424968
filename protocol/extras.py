"""Which of Barnraise's optional parts are installed, and the one line a tool prints when one is not.

The core install (``pip install .``) is what ``barnraise-audit`` needs: ``protocol``'s records and
signatures, numpy, safetensors. Peers and coordinators need the ``[swarm]`` extra as well (torch,
hivemind, transformers, ...). Their ``main`` starts with

    require_extra("swarm", "barnraise-peer")

so that on the core install they stop with one line and exit 2 instead of an ImportError's traceback.
Only looks modules up (``importlib.util.find_spec``); imports none of them.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["EXTRA_MODULES", "missing_modules", "require_extra"]

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    # The modules each extra of setup.cfg brings, by import name; keep the two in step.
    "swarm": ("torch", "hivemind", "transformers", "tokenizers", "datasets", "uvloop", "aiohttp", "prometheus_client", "rich"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here, in ``EXTRA_MODULES`` order."""
    return [name for name in EXTRA_MODULES[extra] if not _findable(name)]


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses the name; a broken half-imported module
        return False


def require_extra(extra: str, prog: str) -> None:
    """Return if ``extra`` is installed; else print one line naming it and exit 2 (``SystemExit``)."""
    if missing := missing_modules(extra):
        print(f"{prog}: error: this needs Barnraise's [{extra}] extra (no module {', '.join(missing)}): "
              f"pip install \".[{extra}]\" in a clone of Barnraise, or pip install "
              f"\"barnraise[{extra}] @ git+<repository URL>\"", file=sys.stderr)
        raise SystemExit(2)

"""Read-only client of the coordinator's HTTP view (manifest, bootstrap, ledger, files).

The coordinator, or anything between it and this volunteer, may be hostile, so every response
is bounded whatever it claims:

- **Bytes.** Each read has a cap fit for what it is: the manifest ``MAX_RECORD_BYTES`` (what its
  decoder takes), the bootstrap list ``BOOTSTRAP_MAX_BYTES``, the ledger ``LEDGER_MAX_BYTES``,
  a file the size that its signed record gives (ledger entry, manifest, data index). A
  ``Content-Length`` above the cap is refused before the body is read, and a body that runs past
  the cap is cut off.
- **Time.** ``timeout`` for connecting and for each wait on the next bytes; ``request_seconds``
  for the status line and headers; a whole-download deadline of ``request_seconds`` plus the
  expected size over ``min_bytes_per_second``, so a server that drips one byte at a time, within
  the socket timeout, still ends. A watchdog thread, owned by the request, shuts the socket
  down when a deadline passes, which ends any read blocked on it.
- **Where.** Only paths this package builds from signed names, on this coordinator. A redirect
  is not followed (a 3xx is an error), and no proxy is used.

Every failure is one line: ``TransportError`` (unreachable, a bad status, larger than its cap,
cut short), ``DeadlineExceeded`` (past a deadline), ``MalformedRecord`` (a body that does not
decode).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import DeadlineExceeded, InputError, MalformedRecord, TransportError
from protocol.ledger import entries_from_jsonl
from protocol.manifest import SignedManifest
from protocol.multiaddr import BOOTSTRAP_MAX_ADDRESSES, checked_multiaddrs
from protocol.policy import AUTH_HEADER
from protocol.records import MAX_TOKEN_BYTES, LedgerEntry
from protocol.wire import MAX_RECORD_BYTES

__all__ = ["CoordinatorClient", "BOOTSTRAP_MAX_BYTES", "LEDGER_MAX_BYTES"]

BOOTSTRAP_MAX_BYTES = 64 * 1024
"""``/bootstrap``: 32 multiaddrs of at most 256 characters, with room to spare."""
LEDGER_MAX_BYTES = 256 * 1024 * 1024
"""``/ledger.jsonl``: an entry lists every tensor's digest, tens of KiB for a real model."""
_CHUNK = 1 << 20


class CoordinatorClient:
    """GETs from one coordinator, each with a byte cap and deadlines (module docstring)."""

    def __init__(self, url: str, timeout: float = 15.0, *, request_seconds: float = 60.0,
                 min_bytes_per_second: float = 64 * 1024, on_note: Callable[[str], None] = print):
        if not url.startswith(("http://", "https://")):
            raise InputError(f"coordinator URL {url!r} must start with http:// or https://")
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise InputError(f"coordinator URL {url!r} has an invalid port") from None
        if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
            raise InputError(f"coordinator URL {url!r} must be http(s)://HOST[:PORT][/PATH]")
        self.url = url.rstrip("/")
        self.timeout = timeout
        """Seconds to connect, and the longest wait for the next bytes of an answer."""
        self.request_seconds = request_seconds
        """Seconds for the status line and headers; a body gets these plus its size's share."""
        self.min_bytes_per_second = min_bytes_per_second
        """A body slower than this on average (over its expected size) is given up."""
        self.on_note = on_note
        """Where a one-line note goes (addresses left out of ``/bootstrap``)."""
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, port
        self._base = parts.path.rstrip("/")
        self.auth: Callable[[str], str] | None = None
        """A private run: the value of ``policy.AUTH_HEADER`` for a path (the join token, signed)."""

    def get(self, path: str, *, max_bytes: int) -> bytes:
        """The whole body of ``path``; ``TransportError`` when it is larger than ``max_bytes``."""
        body = bytearray()
        with self._response(path, max_bytes) as chunks:
            for chunk in chunks:
                body += chunk
        return bytes(body)

    def manifest(self) -> SignedManifest:
        return SignedManifest.from_bytes(self.get("/manifest", max_bytes=MAX_RECORD_BYTES))

    def bootstrap(self) -> list[str]:
        """The well-formed multiaddrs the coordinator lists (``protocol.multiaddr``); the others are
        left out with a note, and ``TransportError`` when none is left."""
        try:
            maddrs = json.loads(self.get("/bootstrap", max_bytes=BOOTSTRAP_MAX_BYTES))["maddrs"]
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deeply
            raise MalformedRecord("coordinator's /bootstrap is not {\"maddrs\": [...]}") from None
        if not isinstance(maddrs, list):
            raise MalformedRecord("coordinator's /bootstrap maddrs must be a list of strings")
        checked = checked_multiaddrs(maddrs, limit=BOOTSTRAP_MAX_ADDRESSES)
        if not checked.kept:
            raise TransportError(
                f"the coordinator at {self.url} lists no usable address at /bootstrap ({len(maddrs)} given, none "
                "of the form /ip4|ip6|dns/HOST/tcp/PORT/p2p/ID): join with --initial-peers MULTIADDR instead"
            )
        if checked.left_out:
            more = f" and {len(checked.left_out) - 1} more" if len(checked.left_out) > 1 else ""
            self.on_note(f"[peer] left out {len(checked.left_out)} of the {len(maddrs)} addresses at the "
                         f"coordinator's /bootstrap: {checked.left_out[0]}{more}")
        return list(checked.kept)

    def token(self, peer_id: str) -> bytes | None:
        """The join token the coordinator issued for ``peer_id`` in a private run, or None."""
        try:
            return self.get(f"/token/{peer_id}", max_bytes=MAX_TOKEN_BYTES)
        except TransportError as error:
            if " answered 404 " in f"{error} ":
                return None
            raise

    def ledger(self) -> list[LedgerEntry]:
        return entries_from_jsonl(self.get("/ledger.jsonl", max_bytes=LEDGER_MAX_BYTES).decode("utf-8", "replace"))

    def download(self, path: str, destination: Path, max_bytes: int) -> None:
        """Stream a file of at most ``max_bytes`` to ``destination`` (written to a temporary name,
        then renamed); ``TransportError`` when it is larger or cut short."""
        partial = destination.with_name(destination.name + ".partial")
        try:
            with self._response(path, max_bytes) as chunks, partial.open("wb") as out:
                for chunk in chunks:
                    out.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(destination)

    @contextmanager
    def _response(self, path: str, max_bytes: int) -> Iterator[Iterator[bytes]]:
        """The body of ``GET path`` as chunks, within the caps and deadlines."""
        connection = self._connection()
        try:
            try:
                connection.connect()  # within ``timeout``
            except (OSError, http.client.HTTPException) as error:
                raise TransportError(f"cannot reach the coordinator at {self.url}: {_reason(error)}") from None
            # the socket itself: the connection lets go of it once an answer says "Connection: close"
            watchdog = _Watchdog(connection.sock, self.request_seconds)
            try:
                yield from self._answer(connection, path, max_bytes, watchdog)
            finally:
                watchdog.stop()
        finally:
            connection.close()

    def _answer(self, connection: http.client.HTTPConnection, path: str, max_bytes: int,
                watchdog: _Watchdog) -> Iterator[Iterator[bytes]]:
        try:
            headers = {"Accept-Encoding": "identity", "Connection": "close"}
            if self.auth is not None:
                headers[AUTH_HEADER] = self.auth(path)
            connection.request("GET", self._base + urllib.parse.quote(path, safe="/"), headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            if watchdog.expired:
                raise DeadlineExceeded(f"the coordinator at {self.url} did not answer {path} within "
                                       f"{self.request_seconds:.0f} s") from None
            if isinstance(error, TimeoutError):
                raise DeadlineExceeded(f"the coordinator at {self.url} sent nothing of {path} for "
                                       f"{self.timeout:.0f} s") from None
            raise TransportError(f"the coordinator at {self.url} answered {path} badly: {_reason(error)}") from None
        with response:
            if response.status != 200:
                redirect = " (redirects are not followed)" if 300 <= response.status < 400 else ""
                raise TransportError(f"coordinator at {self.url} answered {response.status} for {path}{redirect}")
            length = response.length  # the Content-Length, None when absent or chunked
            if length is not None and length > max_bytes:
                raise TransportError(f"coordinator's {path} is {length} bytes, more than the {max_bytes} expected")
            seconds = self.request_seconds + (max_bytes if length is None else length) / self.min_bytes_per_second
            watchdog.extend(seconds)
            yield self._chunks(response, path, max_bytes, length, watchdog, seconds)

    def _chunks(self, response: http.client.HTTPResponse, path: str, max_bytes: int, length: int | None,
                watchdog: _Watchdog, seconds: float) -> Iterator[bytes]:
        received = 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as error:
                chunk, failure = b"", error
            else:
                failure = None
            if watchdog.expired:
                raise DeadlineExceeded(f"downloading {path} from the coordinator at {self.url} took longer than "
                                       f"{seconds:.0f} s (slower than {self.min_bytes_per_second / 1024:.0f} KiB/s)")
            if isinstance(failure, TimeoutError):
                raise DeadlineExceeded(f"the coordinator at {self.url} sent nothing of {path} for "
                                       f"{self.timeout:.0f} s")
            if failure is not None:
                raise TransportError(f"downloading {path} from the coordinator at {self.url} failed: "
                                     f"{_reason(failure)}")
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                raise TransportError(f"coordinator's {path} is larger than the {max_bytes} bytes expected")
            yield chunk
        if length is not None and received != length:
            # the connection closed early: read() returns b"" rather than raising
            raise TransportError(f"coordinator's {path} was cut short ({received} of {length} bytes)")

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)


class _Watchdog:
    """Shuts a socket down once its deadline passes, which ends any read blocked on it (a read that
    keeps getting a byte within the socket timeout would never end otherwise). Owned by one
    request: ``stop`` ends the thread and waits for it."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock = sock
        self.started = time.monotonic()
        self.deadline = self.started + seconds
        self.expired = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="coordinator-deadline", daemon=True)
        self._thread.start()

    def extend(self, seconds: float) -> None:
        """Move the deadline to ``seconds`` after the request began (never earlier)."""
        self.deadline = max(self.deadline, self.started + seconds)

    def _watch(self) -> None:
        while not self._stopped.wait(max(0.0, self.deadline - time.monotonic())):
            if time.monotonic() >= self.deadline:  # else the deadline moved while we waited
                self.expired = True
                try:
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
                except OSError:
                    pass  # already closed: nothing is blocked on it
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "reason", None) or error or type(error).__name__)
    return " ".join(text.split())[:200]

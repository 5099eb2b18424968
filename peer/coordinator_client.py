"""Read-only client of the coordinator's HTTP view (manifest, bootstrap, ledger, files)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path

from protocol.errors import InputError, MalformedRecord, TransportError
from protocol.ledger import entries_from_jsonl
from protocol.manifest import SignedManifest
from protocol.records import LedgerEntry

__all__ = ["CoordinatorClient"]

_SMALL = 16 * 1024 * 1024
_LEDGER = 256 * 1024 * 1024  # an entry lists every tensor's digest: tens of KiB for a real model


class CoordinatorClient:
    """GETs with a deadline and a size cap; every failure is a one-line ``TransportError``."""

    def __init__(self, url: str, timeout: float = 15.0):
        if not url.startswith(("http://", "https://")):
            raise InputError(f"coordinator URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _open(self, path: str):
        try:
            return urllib.request.urlopen(f"{self.url}{path}", timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise TransportError(f"coordinator at {self.url} answered {error.code} for {path}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TransportError(f"cannot reach the coordinator at {self.url}: {reason}") from None

    def get(self, path: str, max_bytes: int = _SMALL) -> bytes:
        with self._open(path) as response:
            body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise TransportError(f"coordinator's {path} is larger than {max_bytes} bytes")
        return body

    def manifest(self) -> SignedManifest:
        return SignedManifest.from_bytes(self.get("/manifest"))

    def bootstrap(self) -> list[str]:
        try:
            maddrs = json.loads(self.get("/bootstrap"))["maddrs"]
        except (ValueError, KeyError, TypeError):
            raise MalformedRecord("coordinator's /bootstrap is not {\"maddrs\": [...]}") from None
        if not isinstance(maddrs, list) or not all(isinstance(a, str) for a in maddrs):
            raise MalformedRecord("coordinator's /bootstrap maddrs must be a list of strings")
        return maddrs

    def ledger(self) -> list[LedgerEntry]:
        return entries_from_jsonl(self.get("/ledger.jsonl", max_bytes=_LEDGER).decode("utf-8", "replace"))

    def download(self, path: str, destination: Path, max_bytes: int) -> None:
        """Stream a file to ``destination`` (written to a temporary name, then renamed)."""
        partial = destination.with_name(destination.name + ".partial")
        written = 0
        try:
            with self._open(path) as response, partial.open("wb") as out:
                length = response.headers.get("Content-Length")
                while chunk := self._read(response, path):
                    written += len(chunk)
                    if written > max_bytes:
                        raise TransportError(f"coordinator's {path} is larger than the ledger says ({max_bytes} bytes)")
                    out.write(chunk)
            if length is not None and length.isdigit() and written != int(length):
                # the connection closed early: read() returns b"" rather than raising
                raise TransportError(f"coordinator's {path} was cut short ({written} of {length} bytes)")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(destination)

    def _read(self, response, path: str) -> bytes:
        try:
            return response.read(1 << 20)
        except (OSError, http.client.HTTPException) as error:
            raise TransportError(f"downloading {path} from the coordinator at {self.url} failed: {error}") from None

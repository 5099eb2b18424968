"""The coordinator's read-only HTTP view (aiohttp).

aiohttp, not FastAPI: the coordinator is one asyncio process whose tracker loop already runs
on the event loop, and aiohttp serves on that same loop without an ASGI server, streams
checkpoint files with ``FileResponse`` (sendfile), and adds no schema layer we would not use:
every response here is either signed bytes, JSON Lines we already produce, or a small JSON.

    GET /manifest        the signed manifest (canonical msgpack bytes)
    GET /manifest.json   the same, as JSON
    GET /public-key      the coordinator's Ed25519 public key (PEM)
    GET /bootstrap       {"maddrs": [...]}: the coordinator's DHT node, then live peers (only
                         well-formed multiaddrs, ``protocol.multiaddr``: peers' records are untrusted)
    GET /status          global round, live peers, samples, loss, last checkpoint
    GET /ledger.jsonl    the ledger, one signed entry per line
    GET /checkpoints/r000042/model.safetensors   a checkpoint file
    GET /blobs/<sha256>  a file the manifest or the data index names by sha256 (model config,
                         tokenizer, data index, token shards); only those are in the folder
    GET /token/<peer id> a private run's join token for that volunteer key (no secret: it admits
                         only the holder of the key's private half)
    GET /                the run page (``coordinator.runpage``; files from ``coordinator/static/``)
    GET /api/run         the run page's data (JSON)
    GET /metrics         Prometheus metrics (``coordinator.metrics``)

In a private run, checkpoint files and blobs are served only to a request signed by an admitted
key (``protocol.policy.request_problem``): 403 with the reason otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from coordinator.runpage import STATIC_FILES
from protocol.multiaddr import BOOTSTRAP_MAX_ADDRESSES, checked_multiaddrs
from protocol.policy import AUTH_HEADER

__all__ = ["build_app", "HttpView"]

_CHECKPOINT_DIR = re.compile(r"\Ar[0-9]{6}\Z")  # not \d: it takes any Unicode digit
_CHECKPOINT_FILE = re.compile(r"\A[A-Za-z0-9_.-]{1,128}\.safetensors\Z")
_BLOB = re.compile(r"\A[0-9a-f]{64}\Z")
_STATIC = Path(__file__).with_name("static")
_PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                            "script-src 'self'; connect-src 'self'"}


class HttpView:
    """What the HTTP handlers read; the service keeps it up to date."""

    def __init__(self, *, manifest_bytes: bytes, manifest_json: dict, public_key_pem: bytes, checkpoints: Path,
                 ledger_jsonl: Callable[[], str], status: Callable[[], dict], bootstrap: Callable[[], list[str]],
                 blobs: Path | None = None, recorded: Callable[[str], bool] = lambda folder: True,
                 token: Callable[[str], bytes | None] = lambda peer_id: None,
                 refused: Callable[[str | None, str], str | None] = lambda header, path: None,
                 page: Callable[[], dict | None] | None = None, metrics: Callable[[], tuple[bytes, str]] | None = None):
        self.manifest_bytes = manifest_bytes
        self.manifest_json = manifest_json
        self.public_key_pem = public_key_pem
        self.checkpoints = checkpoints
        self.blobs = blobs
        self.ledger_jsonl = ledger_jsonl
        self.status = status
        self.bootstrap = bootstrap
        self.recorded = recorded
        """Whether a checkpoint folder belongs to an entry of the ledger (only those are served)."""
        self.token = token
        """The join token issued for a peer id (private runs), or None."""
        self.refused = refused
        """Why a request (its ``AUTH_HEADER``, its path) for weights or data is refused, or None."""
        self.page = page
        """The run page's data (``coordinator.runpage.run_page``; None while starting); None: no run page."""
        self.metrics = metrics
        """Prometheus exposition (bytes, content type); None: no ``/metrics``."""


def build_app(view: HttpView) -> web.Application:
    async def manifest(_request: web.Request) -> web.Response:
        return web.Response(body=view.manifest_bytes, content_type="application/msgpack")

    async def manifest_json(_request: web.Request) -> web.Response:
        return web.json_response(view.manifest_json)

    async def public_key(_request: web.Request) -> web.Response:
        return web.Response(body=view.public_key_pem, content_type="application/x-pem-file")

    async def bootstrap(_request: web.Request) -> web.Response:
        # live peers' addresses come from records anyone can sign: one that hivemind cannot parse
        # would fail every joiner's DHT, so only well-formed ones, a few per peer, are passed on
        checked = checked_multiaddrs(view.bootstrap(), limit=BOOTSTRAP_MAX_ADDRESSES)
        return web.json_response({"maddrs": list(checked.kept)})

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(view.status(), dumps=lambda o: json.dumps(o, allow_nan=False))

    async def ledger(_request: web.Request) -> web.Response:
        return web.Response(text=view.ledger_jsonl(), content_type="application/jsonl")

    def gate(request: web.Request) -> None:
        if (problem := view.refused(request.headers.get(AUTH_HEADER), request.path)) is not None:
            raise web.HTTPForbidden(text=problem)

    async def token(request: web.Request) -> web.Response:
        issued = view.token(request.match_info["peer_id"])
        if issued is None:
            raise web.HTTPNotFound(text="no join token for that peer id (barnraise-coordinator admit KEY)")
        return web.Response(body=issued, content_type="application/msgpack")

    async def checkpoint(request: web.Request) -> web.StreamResponse:
        gate(request)
        folder, name = request.match_info["folder"], request.match_info["name"]
        if not _CHECKPOINT_DIR.match(folder) or not _CHECKPOINT_FILE.match(name):
            raise web.HTTPNotFound(text="no such checkpoint file")
        path = view.checkpoints / folder / name
        if not view.recorded(folder) or not path.is_file():  # a folder written but not (yet) recorded: never served
            raise web.HTTPNotFound(text="no such checkpoint file")
        return web.FileResponse(path)

    async def blob(request: web.Request) -> web.StreamResponse:
        gate(request)
        name = request.match_info["sha256"]
        if view.blobs is None or not _BLOB.match(name) or not (view.blobs / name).is_file():
            raise web.HTTPNotFound(text="no such blob")
        return web.FileResponse(view.blobs / name, headers={"Content-Type": "application/octet-stream"})

    async def page_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name", "index.html")
        if view.page is None or name not in STATIC_FILES:
            raise web.HTTPNotFound(text="no such page")
        return web.Response(body=(_STATIC / name).read_bytes(), content_type=STATIC_FILES[name],
                            charset="utf-8", headers=_PAGE_HEADERS)

    async def page_data(_request: web.Request) -> web.Response:
        if view.page is None:
            raise web.HTTPNotFound(text="no run page")
        if (data := view.page()) is None:
            raise web.HTTPServiceUnavailable(text="the run page is starting")
        return web.json_response(data, dumps=lambda o: json.dumps(o, allow_nan=False),
                                 headers={"Cache-Control": "no-cache"})

    async def metrics(_request: web.Request) -> web.Response:
        if view.metrics is None:
            raise web.HTTPNotFound(text="no metrics")
        body, content_type = view.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application(client_max_size=1024)
    app.router.add_get("/", page_file)
    app.router.add_get("/static/{name}", page_file)
    app.router.add_get("/api/run", page_data)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/manifest", manifest)
    app.router.add_get("/manifest.json", manifest_json)
    app.router.add_get("/public-key", public_key)
    app.router.add_get("/bootstrap", bootstrap)
    app.router.add_get("/status", status)
    app.router.add_get("/ledger.jsonl", ledger)
    app.router.add_get("/checkpoints/{folder}/{name}", checkpoint)
    app.router.add_get("/blobs/{sha256}", blob)
    app.router.add_get("/token/{peer_id}", token)
    return app

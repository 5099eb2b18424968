"""What a hostile coordinator can make a volunteer download: every answer has a byte cap and
deadlines, and the files a peer asks for are bounded by what the signed records and its own
memory check allow.

A real aiohttp server on 127.0.0.1 serves oversized, endless, dripping and stalling answers
(and a raw socket server drips a status line); each one must end, quickly, in one typed line.
The servers are shut down by their fixture, which fails the test if a thread is left behind.

    pytest -q tests/test_coordinator_client.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from safetensors.torch import save_file
from tinyrun import TINY_CONFIGS, VOCAB

from peer.assets import CONFIG_MAX_BYTES, coordinator_source, open_assets
from peer.blobs import BlobCache
from peer.coordinator_client import BOOTSTRAP_MAX_BYTES, CoordinatorClient
from peer.join import _state_file_max_bytes, state_from_checkpoint
from peer.model import build_model
from peer.state import StateLayout
from protocol.errors import (
    DeadlineExceeded,
    HashMismatch,
    InputError,
    MalformedRecord,
    TransportError,
    VerificationError,
)
from protocol.ledger import next_entry
from protocol.manifest import ModelConfig, RunConfig, RunManifest
from protocol.records import FileRecord
from protocol.signing import SigningKey
from protocol.wire import MAX_RECORD_BYTES

RSA_ID = "QmSGygx5JKs2aEv7bKvbdSRfrYtXBW5MXjAT5ZV3knkPoe"
GOOD = f"/ip4/127.0.0.1/tcp/41337/p2p/{RSA_ID}"


class _Servers:
    """An aiohttp app and a raw socket server on one event loop, in a thread of their own."""

    def __init__(self, routes: dict):
        self.loop = asyncio.new_event_loop()
        self.dripping: set[asyncio.Task] = set()
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.raw = self.loop.run_until_complete(asyncio.start_server(self._drip_status, "127.0.0.1", 0))
        self.raw_url = f"http://127.0.0.1:{self.raw.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-coordinator", daemon=True)
        self.thread.start()

    async def _drip_status(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A status line and headers, one byte every 0.1 s: never a socket timeout, never done."""
        self.dripping.add(asyncio.current_task())
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, OSError):
            pass  # the client gave up: what is wanted
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.raw.close()
            for task in self.dripping:
                task.cancel()
            await asyncio.gather(*self.dripping, return_exceptions=True)
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.loop.close()


async def _drip(request: web.Request) -> web.StreamResponse:
    """A chunked body of one byte every 0.1 s, for ever."""
    response = web.StreamResponse()
    await response.prepare(request)
    while True:
        await response.write(b"x")
        await asyncio.sleep(0.1)


async def _endless(request: web.Request) -> web.StreamResponse:
    """A chunked body as fast as it goes, for ever."""
    response = web.StreamResponse()
    await response.prepare(request)
    while True:
        await response.write(b"x" * 65536)


async def _stall(request: web.Request) -> web.StreamResponse:
    """Promises 100 bytes, sends 10, then nothing."""
    response = web.StreamResponse(headers={"Content-Length": "100"})
    await response.prepare(request)
    await response.write(b"x" * 10)
    await asyncio.sleep(60)
    return response


async def _claims_a_lot(request: web.Request) -> web.StreamResponse:
    """Declares 10 GiB, then sends for ever."""
    response = web.StreamResponse(headers={"Content-Length": str(10 * 2**30)})
    await response.prepare(request)
    while True:
        await response.write(b"x" * 65536)


async def _redirect(_request: web.Request) -> web.Response:
    raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")


def _json(body: object):
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    return handler


def _bytes(body: bytes):
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body)

    return handler


@pytest.fixture
def servers() -> Iterator[_Servers]:
    started = _Servers({
        "/drip": _drip,
        "/endless": _endless,
        "/stall": _stall,
        "/claims": _claims_a_lot,
        "/redirect": _redirect,
        "/sized": _bytes(b"y" * 100),
        "/bootstrap": _json({"maddrs": ["x", GOOD, f"/ip4/1.2.3.4/tcp/5/p2p/{RSA_ID}/p2p-circuit/p2p/{RSA_ID}"]}),
        "/junk/bootstrap": _json({"maddrs": ["x", "/ip4/1.2.3.4/tcp/5", None]}),
        "/empty/bootstrap": _json({"maddrs": []}),
        "/notjson/bootstrap": _bytes(b"<html>"),
        "/huge/bootstrap": _json({"maddrs": [GOOD] * (BOOTSTRAP_MAX_BYTES // len(GOOD) + 1)}),
        "/huge/manifest": _bytes(b"\x80" * (MAX_RECORD_BYTES + 1)),
        "/blobs/{sha256}": _endless,
    })
    try:
        yield started
    finally:
        started.close()  # fails the test if the server's thread does not end
    assert not [t for t in threading.enumerate() if t.name == "coordinator-deadline"]  # every watchdog joined


def _client(url: str, **limits) -> CoordinatorClient:
    limits = {"timeout": 2.0, "request_seconds": 1.0, "min_bytes_per_second": 1 << 30, **limits}
    return CoordinatorClient(url, **limits)


def _one_line(error: pytest.ExceptionInfo) -> str:
    line = str(error.value)
    assert line and "\n" not in line
    return line


def test_a_body_dripped_a_byte_at_a_time_ends_at_the_whole_download_deadline(servers):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        _client(servers.url, timeout=5.0).get("/drip", max_bytes=1 << 20)
    assert time.monotonic() - started < 4  # 1 s + 1 MiB at 1 GiB/s, not the 5 s socket timeout
    assert "took longer than" in _one_line(caught)


def test_a_status_line_dripped_a_byte_at_a_time_ends_at_the_request_deadline(servers):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        _client(servers.raw_url, timeout=5.0).get("/manifest", max_bytes=1024)
    assert time.monotonic() - started < 4
    assert "did not answer /manifest within 1 s" in _one_line(caught)


def test_a_stalled_body_ends_at_the_socket_timeout(servers):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        _client(servers.url, timeout=0.5, request_seconds=30.0).get("/stall", max_bytes=100)
    assert time.monotonic() - started < 4
    assert "sent nothing of /stall for" in _one_line(caught)


def test_an_endless_body_is_cut_off_at_its_cap(servers, tmp_path):
    with pytest.raises(TransportError) as caught:
        _client(servers.url).get("/endless", max_bytes=3 << 20)
    assert "larger than the 3145728 bytes expected" in _one_line(caught)
    with pytest.raises(TransportError):
        _client(servers.url).download("/endless", tmp_path / "file", 3 << 20)
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_a_declared_length_above_the_cap_is_refused_before_the_body(servers, tmp_path):
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        _client(servers.url).download("/claims", tmp_path / "file", 1000)
    assert time.monotonic() - started < 2
    assert "/claims is 10737418240 bytes, more than the 1000 expected" in _one_line(caught)
    with pytest.raises(TransportError, match="more than the 99 expected"):
        _client(servers.url).get("/sized", max_bytes=99)
    assert _client(servers.url).get("/sized", max_bytes=100) == b"y" * 100
    assert not list(tmp_path.iterdir())


def test_redirects_are_not_followed_and_odd_paths_do_not_crash(servers):
    with pytest.raises(TransportError) as caught:
        _client(servers.url).get("/redirect", max_bytes=1024)
    assert "answered 302 for /redirect (redirects are not followed)" in _one_line(caught)
    for path in ("/checkpoints/r000001/a b.safetensors", "/checkpoints/r000001/a\x00b", "/x\r\nHost: evil"):
        with pytest.raises(TransportError, match="answered 404"):
            _client(servers.url).get(path, max_bytes=1024)


def test_small_answers_have_small_caps(servers):
    with pytest.raises(TransportError, match="/bootstrap is .* bytes, more than the 65536 expected"):
        _client(f"{servers.url}/huge").bootstrap()
    with pytest.raises(TransportError, match="/manifest is .* bytes, more than the 262144 expected"):
        _client(f"{servers.url}/huge").manifest()


def test_bootstrap_keeps_the_well_formed_addresses_and_says_which_it_left_out(servers):
    notes = []
    client = _client(servers.url, on_note=notes.append)
    assert client.bootstrap() == [GOOD]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("[peer] left out 2 of the 3 addresses at the coordinator's /bootstrap: 'x'")
    for prefix in ("/junk", "/empty"):
        with pytest.raises(TransportError) as caught:
            _client(f"{servers.url}{prefix}").bootstrap()
        assert "lists no usable address at /bootstrap" in _one_line(caught)
        assert "--initial-peers" in str(caught.value)
    with pytest.raises(MalformedRecord):
        _client(f"{servers.url}/notjson").bootstrap()


def test_an_unreachable_coordinator_and_bad_urls_are_one_line():
    with pytest.raises(TransportError) as caught:
        _client("http://127.0.0.1:9").get("/manifest", max_bytes=1024)
    assert "cannot reach the coordinator at http://127.0.0.1:9" in _one_line(caught)
    for url in ("ftp://example.org", "example.org:8470", "http://", "http://host:99999", "http://u:p@host",
                "http://host/?a=1"):
        with pytest.raises(InputError):
            CoordinatorClient(url)


def test_a_blob_of_unknown_size_is_fetched_only_up_to_its_kind_s_cap(servers, tmp_path):
    """The coordinator streams the model config for ever: the peer stops at 1 MiB, not at the
    tokenizer's 256 MiB, and keeps nothing."""
    config = json.dumps(dict(TINY_CONFIGS["llama"], vocab_size=VOCAB)).encode()
    digest = hashlib.sha256(config).hexdigest()
    manifest = _manifest(ModelConfig(family="llama", config=f"sha256:{digest}", parameters=1 << 20))
    asked = []
    source = coordinator_source(_client(servers.url))

    def recording(sha256: str, size: int, destination: Path) -> None:
        asked.append(size)
        source(sha256, size, destination)

    with pytest.raises(TransportError) as caught:
        open_assets(manifest, tmp_path / "blobs", [("the coordinator", recording)])
    assert asked == [CONFIG_MAX_BYTES]
    assert f"larger than the {CONFIG_MAX_BYTES} bytes expected" in _one_line(caught)
    assert not [p for p in (tmp_path / "blobs").iterdir()]


def _manifest(model: ModelConfig, key: SigningKey | None = None) -> RunManifest:
    config = dataclasses.replace(RunConfig.from_toml('[run]\nname = "t"\n'), model=model)
    key = key or SigningKey.generate()
    return RunManifest(config=config, coordinator_key=key.public_key_hex, genesis_root="0" * 64, created_at=0.0)


def _serving(config: bytes):
    def source(sha256: str, size: int, destination: Path) -> None:
        destination.write_bytes(config)

    return [("the coordinator", source)]


def test_a_model_config_that_builds_more_than_the_manifest_states_is_refused(tmp_path):
    """The runner checks its memory for ``model.parameters``: a config that builds more is refused
    before anything builds it, and a config of a million layers is refused as fast."""
    keys = dict(TINY_CONFIGS["llama"], vocab_size=VOCAB)
    config = json.dumps(keys).encode()
    digest = hashlib.sha256(config).hexdigest()
    count = sum(p.numel() for p in build_model(ModelConfig(family="llama", config="sha256:" + "0" * 64, parameters=1),
                                               config).parameters())
    honest = _manifest(ModelConfig(family="llama", config=f"sha256:{digest}", parameters=count))
    assert open_assets(honest, tmp_path / "a", _serving(config)).config_json == config
    lying = _manifest(ModelConfig(family="llama", config=f"sha256:{digest}", parameters=count - 1))
    with pytest.raises(VerificationError) as caught:
        open_assets(lying, tmp_path / "b", _serving(config))
    assert f"builds {count:,} parameters, more than the {count - 1:,} its manifest states" in _one_line(caught)
    huge = json.dumps(dict(keys, num_hidden_layers=10**6)).encode()
    deep = _manifest(ModelConfig(family="llama", config=f"sha256:{hashlib.sha256(huge).hexdigest()}", parameters=count))
    started = time.monotonic()
    with pytest.raises(VerificationError, match="builds more than the"):
        open_assets(deep, tmp_path / "c", _serving(huge))
    assert time.monotonic() - started < 20


def test_the_checkpoint_size_bound_fits_real_files_and_refuses_larger_records(tmp_path):
    model = build_model(ModelConfig(family="llama", config="sha256:" + "0" * 64, parameters=1),
                        json.dumps(dict(TINY_CONFIGS["llama"], vocab_size=VOCAB)).encode())
    layout = StateLayout.of(model)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"round": "123456"})
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 4 * layout.size < size <= _state_file_max_bytes(layout)
    # a signed ledger whose checkpoint record is larger than the model's state: refused, nothing fetched
    key = SigningKey.generate()
    manifest = _manifest(ModelConfig(), key)
    record = FileRecord(name="model.safetensors", sha256="1" * 64, size=size, root="2" * 64, tensors={})
    genesis = next_entry(key, None, run_id=manifest.run_id, round=0, created_at=1.0, files=[record],
                         contributors=[], heldout_loss=None)
    files = [record, FileRecord(name="outer.safetensors", sha256="3" * 64, size=10 * 2**30, root="4" * 64, tensors={}),
             FileRecord(name="extra.safetensors", sha256="5" * 64, size=1, root="6" * 64, tensors={})]
    entry = next_entry(key, genesis, run_id=manifest.run_id, round=5, created_at=2.0, files=files,
                       contributors=[], heldout_loss=None)

    class Ledger:
        def ledger(self):
            return [genesis, entry]

        def download(self, *args):
            raise AssertionError(f"nothing may be downloaded: {args}")

    with pytest.raises(HashMismatch) as caught:
        state_from_checkpoint(Ledger(), manifest, layout, tmp_path / "checkpoints")
    assert "outer.safetensors is 10,737,418,240 bytes, more than the" in _one_line(caught)


def test_a_blob_cache_source_stops_at_its_cap_and_the_watchdog_threads_end(servers, tmp_path):
    cache = BlobCache(tmp_path / "cache", [("the coordinator", coordinator_source(_client(servers.url)))])
    with pytest.raises(TransportError, match="larger than the 2097152 bytes expected"):
        cache.fetch("a" * 64, 2 << 20, "training shard 0")
    assert not [p for p in (tmp_path / "cache").iterdir()]


def test_a_bootstrap_nested_too_deeply_is_malformed_not_a_crash():
    """Found by scripts/fuzz.py (http_bootstrap): json.loads raised RecursionError."""
    started = _Servers({"/bootstrap": _bytes(b'{"maddrs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")})
    try:
        with pytest.raises(MalformedRecord, match="/bootstrap is not"):
            _client(started.url).bootstrap()
    finally:
        started.close()

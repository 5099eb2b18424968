"""The decoders ``bench.fuzz`` attacks, each with valid seeds made by the real encoders and keys.

    peer_progress        PeerProgress.from_bytes(raw).verify()              (DHT, from any peer)
    round_announcement   RoundAnnouncement.from_bytes(raw).verify()         (DHT, from any peer)
    payload_receipt      PayloadReceipt.from_bytes(raw).verify()            (DHT, from any peer)
    join_token           JoinToken.from_bytes(raw).verify(key)              (RPC requests, HTTP, DHT)
    sealed_record        policy.dht_record_problem of a private run         (DHT, from any node)
    ledger_entry         LedgerEntry.from_bytes, verify_link to the seed chain
    ledger_jsonl         entries_from_jsonl (as the client decodes it), verify_chain
    signed_manifest      SignedManifest.from_bytes(raw).verify(key), run_id
    run_config_toml      RunConfig.from_toml; an accepted config must read back from to_toml
    data_index           SignedDataIndex.from_bytes(raw).verify(key), round_shard
    payload:<codec>      parse_payload, then decode / entries / add_to must keep their promises
    checkpoint_file      coordinator.audit.hash_safetensors_file (the auditor reads served files)
    residual_file        peer.rounds.RoundExchanger loading a residual.safetensors (falls back to zeros)
    http_<endpoint>      CoordinatorClient.manifest / bootstrap / ledger / download against a
                         loopback server that answers with the input bytes, byte for byte

Keys are derived from fixed strings, so seeds (and so every input) are the same on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save as save_safetensors

from bench import fuzz_framing as framing
from bench import fuzz_inputs as inputs
from bench.fuzz import Broken, Target
from protocol.codecs import encode, parse_codec, parse_payload
from protocol.data_index import DataIndex, Shard, SignedDataIndex, round_shard
from protocol.errors import BarnraiseError, MalformedRecord
from protocol.ledger import entries_from_jsonl, entry_to_json, next_entry, verify_chain, verify_link
from protocol.manifest import (
    AveragingConfig,
    DataSpec,
    ModelConfig,
    RunConfig,
    RunManifest,
    SignedManifest,
    TrainingConfig,
)
from protocol.multiaddr import libp2p_id_of
from protocol.policy import Admission, dht_record_problem
from protocol.records import (
    SEALED_BYTES,
    Contribution,
    FileRecord,
    JoinToken,
    LedgerEntry,
    PayloadReceipt,
    PeerProgress,
    RoundAnnouncement,
    seal,
    unseal,
)
from protocol.signing import SigningKey, key_id
from protocol.wire import canonical_bytes

__all__ = ["TARGET_NAMES", "builders", "select"]

RUN_ID = "0123456789abcdef"
PAYLOAD_CODECS: dict[str, tuple[int, ...]] = {
    "bmax-c4096-b64-s2": (5000, 4096, 1),  # the default; 5000 = one chunk + a short chunk with a short block
    "bmax-c64-b4-f32": (203, 64),
    "bmax-c128-b8-s8": (300,),
    "topk-c64-k4-q2": (300, 64),
    "topk-c64-k8-s3": (300, 5),
    "topk-c128-k3-f32": (300,),
    "int8-b16": (100, 16),
    "fp16": (77, 1, 0),
}
"""Codec name -> the element counts a payload may be decoded for (the first unless its header names another)."""


def _key(label: str) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest()))


PEER, COORDINATOR = _key("barnraise fuzz peer"), _key("barnraise fuzz coordinator")


def _hex(label: str, digits: int = 64) -> str:
    return hashlib.sha256(label.encode()).hexdigest()[:digits]


def _resign_peer_record(cls: type) -> Callable[[Any], Any]:
    """A volunteer signs whatever it likes: decode the edited map and sign it with the peer key."""
    def resign(tree: Any) -> Any:
        try:
            record = cls.from_wire(tree)
            if record.peer_key != PEER.public_key_hex:
                return tree
            return dict(tree, signature=PEER.sign(cls.DOMAIN + canonical_bytes(record.unsigned_wire())))
        except Exception:  # noqa: BLE001 - unsigned then: the decoder meets (and reports) the same error
            return tree
    return resign


def _resign_entry(tree: Any) -> Any:
    try:
        entry = LedgerEntry.from_wire(tree)
        return dataclasses.replace(entry, signature=COORDINATOR.sign(canonical_bytes(entry.unsigned_wire()))).to_wire()
    except Exception:  # noqa: BLE001 - as above
        return tree


def _resign_manifest(tree: Any) -> Any:
    try:
        return dict(tree, signature=RunManifest.from_wire(tree["manifest"]).sign(COORDINATOR).signature)
    except Exception:  # noqa: BLE001 - as above
        return tree


def _resign_index(tree: Any) -> Any:
    try:
        return dict(tree, signature=DataIndex.from_wire(tree["index"]).sign(COORDINATOR).signature)
    except Exception:  # noqa: BLE001 - as above
        return tree


def _field_names(*classes: type) -> tuple[str, ...]:
    return tuple(sorted({f.name for cls in classes for f in cls.FIELDS}))


# ---------------------------------------------------------------------------------------------
# Signed records
# ---------------------------------------------------------------------------------------------

def _progress_target() -> Target:
    seeds = []
    for i, (averaged_with, maddrs) in enumerate(((1, []), (3, ["/ip4/127.0.0.1/tcp/4001"]), (4096, ["/ip6/::1/udp/1"] * 16))):
        seeds.append(PeerProgress.signed(
            PEER, run_id=RUN_ID, round=7 * i, samples=1000 * i, loss=2.5 + i, samples_per_second=123.5,
            averaged_with=averaged_with, averaged=averaged_with >= 2, network_seconds=0.25 * i, state_root=_hex(f"s{i}"),
            p2p_id="12D3KooW" + "x" * (20 + 50 * i), maddrs=maddrs, time=1.7e9 + i).to_bytes())
    keys = _field_names(PeerProgress)
    return Target("peer_progress", lambda raw: PeerProgress.from_bytes(raw).verify(), seeds,
                  inputs.msgpack_mutator(keys, _resign_peer_record(PeerProgress)), max_bytes=300_000)


def _announcement_target() -> Target:
    seeds = [RoundAnnouncement.signed(
        PEER, run_id=RUN_ID, round=r, weight=w, codec=codec, payload_size=size, payload_sha256=_hex(f"p{r}"),
        base_root=_hex(f"b{r}"), loss=loss, p2p_id="12D3KooWfuzz", time=1.7e9).to_bytes()
        for r, w, codec, size, loss in ((0, 1.0, "fp16", 100, 0.0), (41, 240.0, "bmax-c4096-b64-s2", 2**39, 5.5),
                                        (2**40 - 1, 2.0**52, "x" * 64, 1, 999999.0))]
    keys = _field_names(RoundAnnouncement)
    return Target("round_announcement", lambda raw: RoundAnnouncement.from_bytes(raw).verify(), seeds,
                  inputs.msgpack_mutator(keys, _resign_peer_record(RoundAnnouncement)), max_bytes=300_000)


def _receipt_target() -> Target:
    seeds = [PayloadReceipt.signed(PEER, run_id=RUN_ID, round=r, base_root=_hex(f"b{r}"),
                                   held=sorted(_hex(f"h{r}{i}") for i in range(n)), p2p_id="12D3KooWfuzz",
                                   time=1.7e9).to_bytes()
             for r, n in ((0, 0), (41, 3), (2**40 - 1, 16))]
    keys = _field_names(PayloadReceipt)
    return Target("payload_receipt", lambda raw: PayloadReceipt.from_bytes(raw).verify(), seeds,
                  inputs.msgpack_mutator(keys, _resign_peer_record(PayloadReceipt)), max_bytes=300_000)


def _resign_token(tree: Any) -> Any:
    try:
        token = JoinToken.from_wire(tree)
        if token.signer != COORDINATOR.public_key_hex:
            return tree
        return dict(tree, signature=COORDINATOR.sign(JoinToken.DOMAIN + canonical_bytes(token.unsigned_wire())))
    except Exception:  # noqa: BLE001 - as above
        return tree


def _tokens() -> list[bytes]:
    return [JoinToken.issue(COORDINATOR, run_id=RUN_ID, peer_key=PEER.public_key_hex, expires=e).to_bytes()
            for e in (0.0, 1.7e9, 4e9)]


def _token_target() -> Target:
    return Target("join_token", lambda raw: JoinToken.from_bytes(raw).verify(COORDINATOR.public_key_hex), _tokens(),
                  inputs.msgpack_mutator(_field_names(JoinToken), _resign_token), max_bytes=8192)


def _sealed_target() -> Target:
    admission = Admission(RUN_ID, COORDINATOR.public_key_hex)
    record = PeerProgress.signed(
        PEER, run_id=RUN_ID, round=7, samples=10, loss=2.5, samples_per_second=1.0, averaged_with=1, averaged=False,
        network_seconds=0.0, state_root=_hex("s"), p2p_id=libp2p_id_of(PEER.public_key_hex), maddrs=[],
        time=1.7e9).to_bytes()
    seeds = [seal(record, token) for token in _tokens()] + [seal(record, b"")]
    subkey = key_id(PEER.public_key_hex)

    def check(raw: bytes) -> None:
        problem = dht_record_problem(subkey, raw, 1.7e9 + 60, 1.7e9, admission)
        if problem is not None:
            raise MalformedRecord(problem)

    token_mutate = inputs.msgpack_mutator(_field_names(JoinToken), _resign_token)
    record_mutate = inputs.msgpack_mutator(_field_names(PeerProgress), _resign_peer_record(PeerProgress))

    def mutate(rng, seed: bytes, pool) -> bytes:  # one side of a valid seal, structure-aware; resealed as is
        record, token = unseal(seed)
        if rng.random() < 0.5:
            token = token_mutate(rng, token, _tokens())
        else:
            record = record_mutate(rng, record, [record])
        return b"BRSEAL1" + (len(token) & 0xFFFF).to_bytes(2, "big") + token + record

    return Target("sealed_record", check, seeds, mutate, max_bytes=SEALED_BYTES + 1024)


def _ledger_chain() -> list[LedgerEntry]:
    chain: list[LedgerEntry] = []
    for seq in range(3):
        files = [FileRecord(name=name, sha256=_hex(f"{name}{seq}"), size=1000 + seq, root=_hex(f"r{name}{seq}"),
                            tensors={f"model/w{t}": _hex(f"t{t}{seq}") for t in range(seq + 1)})
                 for name in ("model.safetensors", "outer.safetensors")[: 1 + (seq > 0)]]
        contributors = [Contribution(peer_id=_hex(f"c{c}", 16), samples=100 * c) for c in range(seq * 2)]
        chain.append(next_entry(COORDINATOR, chain[-1] if chain else None, run_id=RUN_ID, round=5 * seq,
                                created_at=1.7e9 + seq, files=files, contributors=contributors,
                                heldout_loss=None if seq == 0 else 3.25))
    return chain


def _ledger_entry_target() -> Target:
    chain = _ledger_chain()
    by_seq = {entry.seq: entry for entry in chain}

    def decode(raw: bytes) -> None:
        entry = LedgerEntry.from_bytes(raw)
        verify_link(by_seq.get(entry.seq - 1), entry, COORDINATOR.public_key_hex)
        _ = entry.entry_hash

    keys = _field_names(LedgerEntry, FileRecord, Contribution)
    return Target("ledger_entry", decode, [e.to_bytes() for e in chain], inputs.msgpack_mutator(keys, _resign_entry),
                  max_bytes=300_000)


def _ledger_jsonl_seeds() -> list[bytes]:
    chain = _ledger_chain()
    return [("\n".join(entry_to_json(e) for e in chain[:n]) + "\n").encode() for n in (1, 3)]


def _decode_ledger(raw: bytes) -> None:
    entries = entries_from_jsonl(raw.decode("utf-8", "replace"))  # as peer.coordinator_client reads it
    verify_chain(entries, COORDINATOR.public_key_hex)


def _ledger_jsonl_target() -> Target:
    keys = _field_names(LedgerEntry, FileRecord, Contribution)
    return Target("ledger_jsonl", _decode_ledger, _ledger_jsonl_seeds(), inputs.json_lines_mutator(keys, _resign_entry))


def _manifests() -> list[bytes]:
    configs = [
        RunConfig(name="fuzz"),
        RunConfig(name="files-run", model=ModelConfig(family="llama", config="sha256:" + _hex("cfg"), parameters=10**6),
                  data=DataSpec(corpus="files", files=("*.txt", "b/*.jsonl"), tokenizer="sha256:" + _hex("tok"),
                                index="sha256:" + _hex("idx")),
                  training=TrainingConfig(lr_schedule="cosine", total_steps=1000, warmup_steps=10),
                  averaging=AveragingConfig(codec="topk-c64-k8-s3", aggregation="mean", overlap=False)),
        RunConfig(name="inline", model=ModelConfig(family="qwen2", config='json:{"hidden_size":64}')),
    ]
    return [RunManifest(config=c, coordinator_key=COORDINATOR.public_key_hex, genesis_root=_hex(c.name),
                        created_at=1.7e9).sign(COORDINATOR).to_bytes() for c in configs]


def _manifest_keys() -> tuple[str, ...]:
    fields = {f.name for cls in (ModelConfig, DataSpec, TrainingConfig, AveragingConfig, RunManifest)
              for f in dataclasses.fields(cls)}
    return tuple(sorted(fields | {"name", "manifest", "signature", "every_rounds"}))


def _manifest_target() -> Target:
    def decode(raw: bytes) -> None:
        _ = SignedManifest.from_bytes(raw).verify(COORDINATOR.public_key_hex).run_id

    return Target("signed_manifest", decode, _manifests(), inputs.msgpack_mutator(_manifest_keys(), _resign_manifest),
                  max_bytes=300_000)


_INLINE_TOML = """[run]
name = "inline"

[model]
family = "llama"

[model.config]
hidden_size = 64
rope_scaling = { type = "linear", factor = 2.0 }
layers = [1, 2, 3]

[data]
files = ["*.txt"]
tokenizer = "tokenizer.json"
"""


def _decode_toml(raw: bytes) -> None:
    config = RunConfig.from_toml(raw.decode("utf-8", "replace"))
    try:  # to_toml's promise: from_toml reads back an equal config
        again = RunConfig.from_toml(config.to_toml())
    except BarnraiseError as error:
        raise Broken(f"to_toml of an accepted config does not read back: {error}") from None
    if again != config:
        raise Broken("to_toml of an accepted config reads back as a different config")


def _toml_target() -> Target:
    configs = [RunConfig(name="fuzz"), RunConfig(name="c", training=TrainingConfig(lr_schedule="cosine", total_steps=99)),
               RunConfig(name="f", data=DataSpec(corpus="files", files=("a/*.txt",), tokenizer="t.json"))]
    seeds = [c.to_toml().encode() for c in configs] + [_INLINE_TOML.encode()]
    return Target("run_config_toml", _decode_toml, seeds, inputs.toml_mutator(_manifest_keys()))


def _data_index_target() -> Target:
    indexes = [
        DataIndex(tokenizer="bytes", vocab_size=256, dtype="uint16", separator=-1,
                  train=tuple(Shard(_hex(f"s{i}"), 1000 + i) for i in range(5)), heldout=(Shard(_hex("h"), 70),)),
        DataIndex(tokenizer=_hex("tok"), vocab_size=70000, dtype="uint32", separator=69999,
                  train=(Shard(_hex("a"), 1 << 28),), heldout=(Shard(_hex("b"), 1),)),
    ]

    def decode(raw: bytes) -> None:
        index = SignedDataIndex.from_bytes(raw).verify(COORDINATOR.public_key_hex)
        round_shard(index, seed=0, width=65, peer_id=_hex("p", 16), round=3)

    keys = ("index", "signer", "signature", "version", "tokenizer", "vocab_size", "dtype", "separator", "train", "heldout")
    return Target("data_index", decode, [i.sign(COORDINATOR).to_bytes() for i in indexes],
                  inputs.msgpack_mutator(keys, _resign_index), max_bytes=2 << 20)


# ---------------------------------------------------------------------------------------------
# Codec payloads
# ---------------------------------------------------------------------------------------------

def _vectors(numel: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(numel)
    extremes = torch.tensor([1e30, -1e30, 1e-40, -0.0, 0.0, 3e38, -65504.0, 1e-45], dtype=torch.float32)
    mixed, spread = torch.randn(numel, generator=g), min(numel, len(extremes))
    mixed[torch.linspace(0, numel - 1, spread).long()] = extremes[:spread]
    return [torch.zeros(numel), torch.randn(numel, generator=g), torch.full((numel,), -2.5), mixed]


def _payload_target(codec_name: str, numels: tuple[int, ...]) -> Target:
    codec = parse_codec(codec_name)
    seeds = []
    for numel in numels:
        for vector in _vectors(numel):
            try:
                seeds.append(encode(codec, vector))
            except BarnraiseError:  # an extreme the codec refuses (fp16 beyond 65504, int8's 3e38)
                seeds.append(encode(codec, torch.randn(numel, generator=torch.Generator().manual_seed(1))))

    def decode(raw: bytes) -> None:
        count = struct.unpack_from("<Q", raw, 8)[0] if len(raw) >= 16 else -1
        numel = count if count in numels else numels[0]
        parsed = parse_payload(raw, codec, numel)
        _check_parsed(parsed, numel)

    return Target(f"payload:{codec_name}", decode, seeds, framing.payload_mutator(), max_bytes=64 << 10)


def _check_parsed(parsed: Any, numel: int) -> None:
    """What parse_payload promises: decoding and adding cannot fail, and give finite values."""
    vector = parsed.decode()
    if vector.dtype != torch.float32 or tuple(vector.shape) != (numel,) or not bool(torch.isfinite(vector).all()):
        raise Broken(f"decode gave {vector.dtype} {tuple(vector.shape)} with non-finite values or the wrong size")
    listed = torch.zeros(numel, dtype=torch.float32)
    last = -1
    for positions, values in parsed.entries():
        if len(positions) and (positions[0] <= last or (positions[1:] <= positions[:-1]).any() or positions[-1] >= numel):
            raise Broken("entries lists positions out of order or outside the vector")
        last = int(positions[-1]) if len(positions) else last
        listed[torch.from_numpy(positions)] = torch.from_numpy(values)
    if not torch.equal(listed, vector):
        raise Broken("entries and decode disagree")
    total = torch.zeros(numel, dtype=torch.float64)
    parsed.add_to(total, 1.0)
    if not torch.equal(total, vector.double()):
        raise Broken("add_to and decode disagree")


# ---------------------------------------------------------------------------------------------
# safetensors files: the auditor's checkpoint hash, a peer's saved residual
# ---------------------------------------------------------------------------------------------

def _scratch() -> Path:
    """A new temporary folder, in memory where there is a tmpfs (a file is written per input)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="barnraise-fuzz-", dir=shm if shm.is_dir() else None))


def _safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with its header's keys sorted (it writes the metadata in hash order)."""
    raw = save_safetensors(tensors, metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + length :]


def _checkpoint_target() -> Target:
    from coordinator.audit import hash_safetensors_file

    g = torch.Generator().manual_seed(0)
    tensor_sets = [
        {"model/w": torch.randn(3, 4, generator=g), "model/b": torch.zeros(4, dtype=torch.float16)},
        {"x": torch.arange(10), "m": torch.tensor([True, False]), "h": torch.ones(2, 2, dtype=torch.bfloat16),
         "i8": torch.tensor([-1, 2], dtype=torch.int8), "d": torch.tensor([1.5], dtype=torch.float64)},
        {"empty": torch.zeros(0), "scalar": torch.tensor(2.0), "u8": torch.arange(5, dtype=torch.uint8)},
    ]
    seeds = [_safetensors(t, {"format": "pt"} if i else None) for i, t in enumerate(tensor_sets)]
    folder = _scratch()
    path = folder / "model.safetensors"

    def decode(raw: bytes) -> None:
        path.write_bytes(raw)
        hash_safetensors_file(path)

    return Target("checkpoint_file", decode, seeds, framing.safetensors_mutator(), max_bytes=1 << 20,
                  close=lambda: shutil.rmtree(folder, ignore_errors=True))


def _residual_target() -> Target:
    from peer.rounds import RESIDUAL_FILE, RoundExchanger

    codec, numel = "topk-c64-k4-q2", 100
    manifest = RunManifest(config=RunConfig(name="fuzz", averaging=AveragingConfig(codec=codec)),
                           coordinator_key=COORDINATOR.public_key_hex, genesis_root=_hex("g"), created_at=0.0)
    metadata = {"run_id": manifest.run_id, "codec": codec, "round": "3"}
    seeds = [_safetensors({"residual": torch.randn(numel, generator=torch.Generator().manual_seed(0))}, metadata),
             _safetensors({"residual": torch.zeros(numel), "other": torch.ones(3)}, metadata)]
    folder = _scratch()
    exchanger = RoundExchanger(None, manifest, None, _hex("p", 16), folder, numel)  # no file yet: zeros

    def decode(raw: bytes) -> None:
        (folder / RESIDUAL_FILE).write_bytes(raw)
        residual = exchanger._load_residual()  # what the constructor does on a restart
        if residual.dtype != torch.float32 or tuple(residual.shape) != (numel,) or not bool(torch.isfinite(residual).all()):
            raise Broken(f"loaded residual is {residual.dtype} {tuple(residual.shape)}, or not finite")

    return Target("residual_file", decode, seeds, framing.safetensors_mutator(metadata), max_bytes=1 << 20,
                  close=lambda: shutil.rmtree(folder, ignore_errors=True))


# ---------------------------------------------------------------------------------------------
# The coordinator client against a loopback server that answers with the input
# ---------------------------------------------------------------------------------------------

class LoopbackServer:
    """Answers every HTTP request on 127.0.0.1 with ``response``, byte for byte, then closes."""

    def __init__(self) -> None:
        self.response = b""
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fuzz-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 65536:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    conn.sendall(self.response)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._socket.close()


_MADDRS = ["/ip4/127.0.0.1/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
           "/ip6/::1/tcp/65535/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN",
           "/dns4/coordinator.example.org/tcp/1/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"]


def _response(body: bytes, content_type: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _http_target(endpoint: str) -> Target:
    from peer.coordinator_client import CoordinatorClient

    server = LoopbackServer()
    client = CoordinatorClient(server.url, timeout=5.0, on_note=lambda line: None)
    folder = _scratch()
    jsonl_keys = _field_names(LedgerEntry, FileRecord, Contribution)
    blob = bytes(range(256)) * 12
    bodies: dict[str, tuple[list[bytes], str, inputs.Mutator, Callable[[], object]]] = {
        "manifest": (_manifests(), "application/msgpack", inputs.msgpack_mutator(_manifest_keys(), _resign_manifest),
                     client.manifest),
        "bootstrap": ([json.dumps({"maddrs": m}).encode() for m in (_MADDRS[:1], _MADDRS, _MADDRS[::-1] * 9)],
                      "application/json", inputs.json_mutator(("maddrs",)), client.bootstrap),
        "ledger": (_ledger_jsonl_seeds(), "application/jsonl", inputs.json_lines_mutator(jsonl_keys, _resign_entry),
                   client.ledger),
        "download": ([blob], "application/octet-stream",
                     lambda rng, seed, seeds: inputs.mutate_bytes(rng, seed, seeds, 1 << 16),
                     lambda: client.download("/blobs/" + "0" * 64, folder / "blob", len(blob))),
    }
    seeds, content_type, body_mutate, call = bodies[endpoint]

    def decode(raw: bytes) -> None:
        server.response = raw
        call()

    def close() -> None:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)

    return Target(f"http_{endpoint}", decode, [_response(s, content_type) for s in seeds],
                  framing.http_mutator(body_mutate), max_bytes=1 << 20, close=close)


_BUILDERS: dict[str, Callable[[], Target]] = {
    "peer_progress": _progress_target,
    "round_announcement": _announcement_target,
    "payload_receipt": _receipt_target,
    "join_token": _token_target,
    "sealed_record": _sealed_target,
    "ledger_entry": _ledger_entry_target,
    "ledger_jsonl": _ledger_jsonl_target,
    "signed_manifest": _manifest_target,
    "run_config_toml": _toml_target,
    "data_index": _data_index_target,
    **{f"payload:{name}": (lambda name=name, numels=numels: _payload_target(name, numels))
       for name, numels in PAYLOAD_CODECS.items()},
    "checkpoint_file": _checkpoint_target,
    "residual_file": _residual_target,
    **{f"http_{endpoint}": (lambda endpoint=endpoint: _http_target(endpoint))
       for endpoint in ("manifest", "bootstrap", "ledger", "download")},
}
TARGET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def select(patterns: Sequence[str]) -> list[str]:
    """Target names matching any pattern: a name, or its family before ``:`` (``payload``)."""
    return [name for name in TARGET_NAMES if any(name == p or name.startswith(p + ":") for p in patterns)]


def builders(names: Sequence[str]) -> list[Callable[[], Target]]:
    """Builders of the named targets, in ``TARGET_NAMES`` order (each target starts what it needs)."""
    return [_BUILDERS[name] for name in TARGET_NAMES if name in names]

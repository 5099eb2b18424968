"""Private runs: join tokens, sealed DHT records, the RPC gate, signed HTTP requests, ``admit``.

The pure checks (``protocol.policy``) one hostile input at a time; the coordinator's side
(``coordinator.admission``, the HTTP view) on real files and a real aiohttp server. The swarm
itself refusing a peer without a token is ``tests/test_hostile_swarm.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from coordinator.admission import admit, issued_token
from coordinator.http import HttpView, build_app
from peer.rpc_gate import BURST, RpcGate
from protocol.errors import InputError, MalformedRecord
from protocol.manifest import AccessConfig, RunConfig, RunManifest, SignedManifest
from protocol.multiaddr import libp2p_id_of
from protocol.policy import (
    AUTH_HEADER,
    Admission,
    dht_record_problem,
    request_problem,
    request_signature,
    token_problem,
)
from protocol.records import JoinToken, PeerProgress, seal, unseal
from protocol.signing import SigningKey, key_id

NOW = 1_800_000_000.0
COORDINATOR, PEER, STRANGER = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
RUN = "ab" * 8
ADMISSION = Admission(RUN, COORDINATOR.public_key_hex)


def _token(key: SigningKey = PEER, *, issuer: SigningKey = COORDINATOR, run_id: str = RUN,
           expires: float = NOW + 3600) -> bytes:
    return JoinToken.issue(issuer, run_id=run_id, peer_key=key.public_key_hex, expires=expires).to_bytes()


def _progress(key: SigningKey) -> PeerProgress:
    return PeerProgress.signed(key, run_id=RUN, round=3, samples=10, loss=1.0, samples_per_second=1.0,
                               averaged_with=1, averaged=False, network_seconds=0.0, state_root="a" * 64,
                               p2p_id=libp2p_id_of(key.public_key_hex), maddrs=[], time=NOW)


def test_a_token_admits_its_key_only_for_its_run_until_it_expires():
    assert token_problem(_token(), ADMISSION, now=NOW, peer_key=PEER.public_key_hex) is None
    assert token_problem(_token(), ADMISSION, now=NOW, p2p_id=libp2p_id_of(PEER.public_key_hex)) is None
    assert "no join token" in token_problem(b"", ADMISSION, now=NOW)
    assert "not the record's signer" in token_problem(_token(), ADMISSION, now=NOW, peer_key=STRANGER.public_key_hex)
    assert "not the caller" in token_problem(_token(), ADMISSION, now=NOW, p2p_id=libp2p_id_of(STRANGER.public_key_hex))
    assert "for run" in token_problem(_token(run_id="cd" * 8), ADMISSION, now=NOW)
    assert "expired" in token_problem(_token(expires=NOW - 100), ADMISSION, now=NOW)
    assert "not the run's coordinator" in token_problem(_token(issuer=STRANGER), ADMISSION, now=NOW)
    forged = JoinToken.from_bytes(_token())
    forged = JoinToken(**{**forged.to_wire(), "peer_key": STRANGER.public_key_hex})
    assert "does not verify" in token_problem(forged.to_bytes(), ADMISSION, now=NOW)
    assert "not a valid join token" in token_problem(b"\x81\xa1x\x01", ADMISSION, now=NOW)
    # the coordinator's own node needs none
    assert token_problem(b"", ADMISSION, now=NOW, p2p_id=libp2p_id_of(COORDINATOR.public_key_hex)) is None


def test_a_token_signature_is_domain_separated():
    token = JoinToken.from_bytes(_token())
    from protocol.signing import verify_signature
    from protocol.wire import canonical_bytes
    with pytest.raises(Exception, match="does not verify"):  # the same fields signed without the prefix
        verify_signature(token.signer, canonical_bytes(token.unsigned_wire()), token.signature, what="x")


def test_a_private_runs_dht_keeps_only_records_sealed_with_their_signers_token():
    own = key_id(PEER.public_key_hex)
    record = _progress(PEER).to_bytes()
    assert dht_record_problem(own, seal(record, _token()), NOW + 60, NOW, ADMISSION) is None
    assert "sealed" in dht_record_problem(own, record, NOW + 60, NOW, ADMISSION), "a bare record is refused"
    stranger = key_id(STRANGER.public_key_hex)
    assert "not the record's signer" in dht_record_problem(stranger, seal(_progress(STRANGER).to_bytes(), _token()),
                                                           NOW + 60, NOW, ADMISSION), "another peer's token"
    assert "no join token" in dht_record_problem(stranger, seal(_progress(STRANGER).to_bytes(), b""),
                                                 NOW + 60, NOW, ADMISSION)
    assert dht_record_problem(own, record, NOW + 60, NOW) is None, "a public run takes bare records"
    # a token's expiry is judged at the record's signed time: readers whose clocks differ agree
    short = _token(expires=NOW + 10)
    assert dht_record_problem(own, seal(record, short), NOW + 60, NOW + 1000, ADMISSION) is None
    assert "expired" in dht_record_problem(own, seal(record, _token(expires=NOW - 100)), NOW + 60, NOW, ADMISSION)
    assert "past its join token's expiry" in dht_record_problem(own, seal(record, _token(expires=NOW - 20)),
                                                                NOW + 140, NOW, ADMISSION)


def test_a_private_runs_dht_keeps_only_its_coordinators_manifest():
    def signed(key: SigningKey) -> bytes:
        manifest = RunManifest(config=RunConfig(name="x"), coordinator_key=key.public_key_hex,
                               genesis_root="0" * 64, created_at=NOW)
        return manifest.sign(key).to_bytes()

    assert dht_record_problem(None, signed(COORDINATOR), NOW + 60, NOW, ADMISSION) is None
    assert "expected" in dht_record_problem(None, signed(STRANGER), NOW + 60, NOW, ADMISSION)


@pytest.mark.parametrize("raw", [b"", b"BRSEAL1", b"BRSEAL1\xff\xff" + b"x" * 10, b"not sealed", "text"])
def test_unseal_refuses_what_is_not_a_sealed_record(raw):
    with pytest.raises(MalformedRecord):
        unseal(raw)
    assert unseal(seal(b"record", b"token")) == (b"record", b"token")


def test_the_gate_serves_admitted_callers_only_and_rate_limits_everyone():
    clock = [0.0]
    gate = RpcGate(ADMISSION, clock=lambda: clock[0], wall=lambda: NOW)
    peer, stranger = libp2p_id_of(PEER.public_key_hex), libp2p_id_of(STRANGER.public_key_hex)
    assert gate.allows(peer, _token())
    assert not gate.allows(stranger, b""), "no token"
    assert not gate.allows(stranger, _token()), "another key's token, presented by a caller it does not name"
    assert gate.allows(libp2p_id_of(COORDINATOR.public_key_hex), b"")
    assert gate.refused["token"] == 2
    public = RpcGate(None, clock=lambda: clock[0])
    served = sum(public.allows(stranger, b"") for _ in range(int(BURST) + 50))
    assert served == int(BURST) and public.refused["rate"] == 50
    clock[0] += 1.0  # a second later: RATE more
    assert public.allows(stranger, b"")


def test_a_private_runs_http_requests_are_signed_by_an_admitted_key():
    token = _token()
    path = "/blobs/" + "a" * 64
    header = request_signature(PEER, token, path, NOW)
    assert request_problem(header, path, ADMISSION, now=NOW + 5) is None
    assert "signature does not verify" in request_problem(header, "/blobs/" + "b" * 64, ADMISSION, now=NOW)
    assert "clock skew" in request_problem(header, path, ADMISSION, now=NOW + 3600)
    assert "carries no join token" in request_problem(None, path, ADMISSION, now=NOW)
    assert "malformed" in request_problem("a b", path, ADMISSION, now=NOW)
    stolen = request_signature(STRANGER, token, path, NOW)  # a token without its key's private half
    assert "does not verify" in request_problem(stolen, path, ADMISSION, now=NOW)


def test_access_is_in_the_manifest_only_when_private_and_a_public_manifest_is_unchanged():
    public = RunManifest(config=RunConfig(name="x"), coordinator_key=COORDINATOR.public_key_hex,
                         genesis_root="0" * 64, created_at=NOW)
    assert "access" not in public.to_wire()
    private = RunManifest(config=RunConfig(name="x", access=AccessConfig(mode="private")),
                          coordinator_key=COORDINATOR.public_key_hex, genesis_root="0" * 64, created_at=NOW)
    assert private.to_wire()["access"] == {"mode": "private"} and private.run_id != public.run_id
    again = SignedManifest.from_bytes(private.sign(COORDINATOR).to_bytes()).verify()
    assert again.config.access.mode == "private" and Admission.of(again) == Admission(again.run_id, again.coordinator_key)
    assert Admission.of(public) is None
    explicit = dict(public.to_wire(), access={"mode": "public"})  # one config, one encoding
    with pytest.raises(MalformedRecord, match="default"):
        RunManifest.from_wire(explicit)
    parsed = RunConfig.from_toml('[run]\nname = "x"\n[access]\nmode = "private"\n')
    assert parsed.access.mode == "private" and RunConfig.from_toml(parsed.to_toml()) == parsed


def _launched(workdir: Path, mode: str) -> None:
    """A coordinator folder as ``launch`` leaves it, as far as ``admit`` reads it."""
    from peer.workdir import load_or_create_key
    workdir.mkdir()
    key = load_or_create_key(workdir / "coordinator.key")
    manifest = RunManifest(config=RunConfig(name="x", access=AccessConfig(mode=mode)), coordinator_key=key.public_key_hex,
                           genesis_root="0" * 64, created_at=NOW)
    (workdir / "manifest.msgpack").write_bytes(manifest.sign(key).to_bytes())


def test_admit_issues_a_token_the_coordinator_serves_and_refuses_bad_input(tmp_path):
    _launched(tmp_path / "run", "private")
    token, path = admit(tmp_path / "run", PEER.public_key_hex, days=1)
    assert path.read_bytes() == token.to_bytes() == issued_token(tmp_path / "run", token.peer_id)
    assert token.expires == pytest.approx(time.time() + 86400, abs=60)
    assert issued_token(tmp_path / "run", key_id(STRANGER.public_key_hex)) is None
    assert issued_token(tmp_path / "run", "../../etc/passwd") is None
    with pytest.raises(InputError, match="neither 64 hex digits nor a PEM"):
        admit(tmp_path / "run", "not-a-key")
    with pytest.raises(InputError, match="no run here"):
        admit(tmp_path / "nothing", PEER.public_key_hex)
    _launched(tmp_path / "public", "public")
    with pytest.raises(InputError, match="is public"):
        admit(tmp_path / "public", PEER.public_key_hex)
    assert not (tmp_path / "public" / "admitted").exists(), "a refused admit writes nothing"


def test_the_http_view_of_a_private_run_serves_weights_and_files_to_admitted_keys_only(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    digest = "a" * 64
    (blobs / digest).write_bytes(b"shard")
    token = _token(expires=time.time() + 3600)
    view = HttpView(manifest_bytes=b"m", manifest_json={}, public_key_pem=b"", checkpoints=tmp_path, blobs=blobs,
                    ledger_jsonl=lambda: "", status=dict, bootstrap=list,
                    token=lambda peer_id: token if peer_id == key_id(PEER.public_key_hex) else None,
                    refused=lambda header, path: request_problem(header, path, ADMISSION, now=time.time()))

    async def scenario() -> None:
        async with TestClient(TestServer(build_app(view))) as client:
            path = f"/blobs/{digest}"
            refused = await client.get(path)
            assert refused.status == 403 and "private" in await refused.text()
            signed = {AUTH_HEADER: request_signature(PEER, token, path, time.time())}
            served = await client.get(path, headers=signed)
            assert served.status == 200 and await served.read() == b"shard"
            mine = await client.get(f"/token/{key_id(PEER.public_key_hex)}")
            assert mine.status == 200 and await mine.read() == token
            assert (await client.get(f"/token/{key_id(STRANGER.public_key_hex)}")).status == 404
            assert (await client.get("/manifest")).status == 200, "the manifest stays public"

    asyncio.run(scenario())


def test_the_commands_name_a_bad_input_in_one_line(tmp_path, capsys):
    from coordinator.cli import main as coordinator_main
    from peer.cli import main as peer_main

    assert peer_main(["join", "--coordinator", "http://127.0.0.1:1", "--workdir", str(tmp_path / "p"),
                      "--token", str(tmp_path / "missing.token")]) == 2
    assert "--token" in capsys.readouterr().err
    _launched(tmp_path / "run", "private")
    assert coordinator_main(["admit", "not-a-key", "--workdir", str(tmp_path / "run")]) == 2
    assert "neither 64 hex digits" in capsys.readouterr().err
    assert coordinator_main(["admit", PEER.public_key_hex, "--workdir", str(tmp_path / "run"), "--days", "0"]) == 2
    assert "--days" in capsys.readouterr().err
    assert peer_main(["key", "--workdir", str(tmp_path / "p")]) == 0
    shown = capsys.readouterr()
    assert coordinator_main(["admit", shown.out.strip(), "--workdir", str(tmp_path / "run")]) == 0
    assert "admitted key" in capsys.readouterr().out

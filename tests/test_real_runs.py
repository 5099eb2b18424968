"""Real runs without a swarm: transformers models from a config, token shards and their signed index,
the files a peer fetches (refused when tampered), the schedule, and the export round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from aiohttp import web
from tinyrun import TINY_CONFIGS, VOCAB, make_run, stdlib_texts, train_tokenizer

from coordinator.audit import main as audit_main
from coordinator.export import export_checkpoint
from coordinator.http import HttpView, build_app
from coordinator.launch import prepare_run
from coordinator.shards import build_shards, byte_tokenizer, file_tokenizer
from peer.assets import coordinator_source, open_assets
from peer.blobs import BlobStore
from peer.coordinator_client import CoordinatorClient
from peer.model import BYTES_PER_PARAMETER, build_model, check_memory, count_parameters
from peer.trainer import Trainer
from protocol.data_index import DataIndex, SignedDataIndex, round_shard
from protocol.errors import ConfigError, HashMismatch, InputError, SignatureError
from protocol.manifest import DataSpec, ModelConfig, RunConfig, TrainingConfig, blob_digest
from protocol.signing import SigningKey


def _model(family: str, **overrides) -> tuple[ModelConfig, bytes]:
    config = json.dumps(dict(TINY_CONFIGS[family], vocab_size=VOCAB, **overrides)).encode()
    return ModelConfig(family=family, config="sha256:" + "0" * 64, parameters=1), config


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_any_causal_lm_family_builds_bit_for_bit_from_its_config(family):
    model, config = _model(family)
    first, second = build_model(model, config), build_model(model, config)
    assert type(first).__name__.lower().startswith(family.replace("2", "")[:4])
    named = dict(first.named_parameters())
    assert all(torch.equal(p, dict(second.named_parameters())[n]) for n, p in named.items())
    assert count_parameters(model, config) == sum(p.numel() for p in first.parameters())
    assert first.get_input_embeddings().weight.shape[0] == VOCAB
    other_seed = build_model(ModelConfig(family=family, config=model.config, parameters=1, init_seed=1), config)
    assert not torch.equal(next(other_seed.parameters()), next(first.parameters()))


@pytest.mark.parametrize(
    ("family", "keys", "message"),
    [
        ("llama", {"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "remote code"),
        ("llama", {"model_type": "qwen2"}, "is not model.family 'llama'"),
        ("t5", {"model_type": "t5"}, "encoder-decoder"),
        ("vit", {"model_type": "vit"}, "no causal LM"),
        ("nosuchmodel", {"model_type": "nosuchmodel"}, "nosuchmodel"),
    ],
)
def test_a_config_transformers_cannot_build_as_a_causal_lm_is_refused_by_name(family, keys, message):
    model = ModelConfig(family=family, config="sha256:" + "0" * 64, parameters=1)
    config = dict(TINY_CONFIGS["llama"], **keys) if "auto_map" in keys or family == "llama" else keys
    with pytest.raises(ConfigError, match=message):
        build_model(model, json.dumps(config).encode())


def test_a_model_the_peer_cannot_hold_is_refused_with_the_estimate():
    with pytest.raises(InputError) as caught:
        check_memory(135_000_000, "cpu", max_memory=1 << 30)
    line = str(caught.value)
    assert f"{BYTES_PER_PARAMETER['cpu']} bytes per parameter × 135,000,000 parameters" in line
    assert "--max-memory" in line and "\n" not in line
    assert check_memory(1_000_000, "cpu", max_memory=1 << 30) == BYTES_PER_PARAMETER["cpu"] * 1_000_000


def _corpus(folder: Path) -> Path:
    """Three file types: .jsonl, .txt (documents split at blank lines) and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = stdlib_texts(400_000)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "a.jsonl").open("w") as out:
        for text in texts[0::3]:
            out.write(json.dumps({"body": text, "n": 1}) + "\n")
    (folder / "b.txt").write_text("\n\n".join(texts[1::3]))
    pq.write_table(pa.table({"body": texts[2::3]}), folder / "c.parquet")
    return train_tokenizer(texts, folder / "tokenizer.json")


def test_the_corpus_becomes_the_same_shards_every_time_and_the_index_is_signed(tmp_path):
    tokenizer_path = _corpus(tmp_path / "c")
    spec = DataSpec(corpus="files", files=("c/*.jsonl", "c/*.txt", "c/*.parquet"), text_field="body",
                    tokenizer="tok", seq_len=64, shard_tokens=16384)
    key = SigningKey.generate()
    indexes = []
    for attempt in range(2):
        store = BlobStore(tmp_path / f"blobs{attempt}")
        indexes.append(build_shards(spec, tmp_path, store, file_tokenizer(tokenizer_path), "ab" * 32))
    index = indexes[0]
    assert indexes[1] == index  # deterministic: same files, same shards
    assert index.dtype == "uint16" and index.vocab_size == VOCAB and index.separator == 0
    assert len(index.train) > 3 and len(index.heldout) >= 1
    assert all(s.tokens == 16384 for s in index.train[:-1])
    raw = BlobStore(tmp_path / "blobs0").read(index.train[0].sha256, "shard")
    assert len(raw) == 2 * 16384
    signed = index.sign(key)
    assert SignedDataIndex.from_bytes(signed.to_bytes()).verify(key.public_key_hex) == index
    with pytest.raises(SignatureError):
        SignedDataIndex.from_bytes(signed.to_bytes()).verify(SigningKey.generate().public_key_hex)
    forged = SignedDataIndex(index=DataIndex(**{**index.__dict__, "train": index.train[1:]}), signer=signed.signer,
                             signature=signed.signature)
    with pytest.raises(SignatureError):
        forged.verify(key.public_key_hex)
    # the byte vocabulary: one token per byte
    bytes_index = build_shards(DataSpec(corpus="files", files=("c/a.jsonl",), text_field="body", seq_len=64,
                                        heldout_percent=40),
                               tmp_path, BlobStore(tmp_path / "b"), byte_tokenizer(), "bytes")
    assert bytes_index.vocab_size == 256 and bytes_index.separator == -1


def test_a_launch_that_fails_leaves_no_key_or_files_behind(tmp_path):
    config = RunConfig.from_toml('[run]\nname = "x"\n[data]\nfiles = ["missing/*.txt"]\n')
    with pytest.raises(ConfigError, match="matches no file"):
        prepare_run(config, tmp_path / "fresh", base=tmp_path)
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="matches no file"):
        prepare_run(config, tmp_path / "kept", base=tmp_path)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_a_glob_that_matches_nothing_and_a_file_without_the_text_field_are_named(tmp_path):
    tokenizer = byte_tokenizer()
    with pytest.raises(ConfigError, match="'nothing/\\*.jsonl' matches no file"):
        build_shards(DataSpec(corpus="files", files=("nothing/*.jsonl",)), tmp_path, BlobStore(tmp_path / "b"),
                     tokenizer, "bytes")
    (tmp_path / "x.jsonl").write_text(json.dumps({"other": "text"}) + "\n")
    with pytest.raises(InputError, match="x.jsonl: row 0 has no text field 'text'"):
        build_shards(DataSpec(corpus="files", files=("x.jsonl",)), tmp_path, BlobStore(tmp_path / "b"), tokenizer,
                     "bytes")


_STREAM_SCRIPT = """
import json, resource, sys
from pathlib import Path
from coordinator.shards import build_shards, byte_tokenizer
from peer.blobs import BlobStore
from protocol.manifest import DataSpec
import datasets, pyarrow, numpy  # imported before the cap: only the build counts
spec = DataSpec(corpus="files", files=("big.jsonl",), seq_len=64, shard_tokens=1 << 20)
build_shards(spec, Path("."), BlobStore(Path("warm")), byte_tokenizer(), "bytes")  # warm up lazy imports
warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
spec = DataSpec(corpus="files", files=("huge.jsonl",), seq_len=64, shard_tokens=1 << 20)
index = build_shards(spec, Path("."), BlobStore(Path("blobs")), byte_tokenizer(), "bytes")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - warm, "tokens": sum(s.tokens for s in index.train + index.heldout)}))
"""


def test_a_corpus_file_larger_than_the_memory_cap_streams_through(tmp_path):
    """The corpus file is 3× the cap on how much the build may grow the process's peak memory."""
    cap = 40 * 2**20
    body = json.dumps("x = [i * i for i in range(100)]  # a line of code\n" * 20)[1:-1]
    lines = lambda start, count: "".join(f'{{"text": "# {n}\\n{body}"}}\n' for n in range(start, start + count))  # noqa: E731
    (tmp_path / "big.jsonl").write_text(lines(0, 200))
    with (tmp_path / "huge.jsonl").open("w") as out:
        while out.tell() < 3 * cap:
            out.write(lines(out.tell(), 1000))
    size = (tmp_path / "huge.jsonl").stat().st_size
    finished = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 0.9 * size  # every byte of text is a token (less the JSON around it)
    assert result["growth"] < cap, f"building shards of a {size / 2**20:.0f} MiB file grew the peak by {result['growth'] / 2**20:.0f} MiB"


class _Server:
    """The coordinator's HTTP view of a blob folder, on loopback, in a thread."""

    def __init__(self, blobs: Path):
        self.loop = asyncio.new_event_loop()
        view = HttpView(manifest_bytes=b"", manifest_json={}, public_key_pem=b"", checkpoints=blobs,
                        ledger_jsonl=lambda: "", status=dict, bootstrap=list, blobs=blobs)
        self.runner = web.AppRunner(build_app(view))
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A tiny llama run launched in a workdir (genesis in the ledger, every file in blobs/)."""
    root = tmp_path_factory.mktemp("real")
    run_toml = make_run(root / "run", "llama")
    config = RunConfig.from_toml(run_toml.read_text())
    run = prepare_run(config, root / "coord", base=run_toml.parent)
    run.ledger.write_jsonl(root / "coord" / "ledger.jsonl")
    run.ledger.close()
    return root, run


def test_a_peer_fetches_the_files_it_needs_and_refuses_each_one_tampered(launched, tmp_path):
    root, run = launched
    manifest = run.manifest
    server = _Server(root / "coord" / "blobs")
    try:
        client = CoordinatorClient(server.url)
        assets = open_assets(manifest, tmp_path / "cache", [("the coordinator", coordinator_source(client))])
        fetched = {p.name for p in (tmp_path / "cache").iterdir()}
        index = assets.corpus.index
        assert blob_digest(manifest.config.model.config) in fetched and blob_digest(manifest.config.data.index) in fetched
        assert not {s.sha256 for s in index.train} & fetched  # shards only when a round needs them
        windows = assets.corpus.batch(manifest.config.data, 4, peer_id="p1", round=3, step=0)
        assert windows.shape == (4, 65) and int(windows.max()) < VOCAB
        wanted = index.train[round_shard(index, seed=0, width=65, peer_id="p1", round=3)].sha256
        assert {p.name for p in (tmp_path / "cache").iterdir()} - fetched == {wanted}
        # a file changed in the coordinator's store is refused, one line naming it
        store = root / "coord" / "blobs"
        for name, digest in [("training shard", index.train[1].sha256),
                             ("the tokenizer", blob_digest(manifest.config.data.tokenizer)),
                             ("the model config", blob_digest(manifest.config.model.config))]:
            original = (store / digest).read_bytes()
            try:
                (store / digest).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
                cache = tmp_path / f"fresh-{digest[:8]}"
                with pytest.raises(HashMismatch) as caught:
                    got = open_assets(manifest, cache, [("the coordinator", coordinator_source(client))])
                    for peer in range(64):  # until some round draws the tampered shard
                        got.corpus.prefetch(f"peer{peer}", 0)
                line = str(caught.value)
                assert name in line and "from the coordinator" in line and "refused" in line and "\n" not in line
            finally:
                (store / digest).write_bytes(original)
        # a cached file changed on disk is fetched again, not used
        cached = tmp_path / "cache" / wanted
        cached.write_bytes(b"garbage")
        assets.corpus._loaded.clear()
        again = assets.corpus.batch(manifest.config.data, 4, peer_id="p1", round=3, step=0)
        assert torch.equal(again, windows)
    finally:
        server.close()


def test_every_peer_agrees_on_the_schedule_and_on_what_each_peer_trains_on(launched):
    root, run = launched
    training = TrainingConfig(inner_steps=3, batch_size=4, lr_schedule="cosine", warmup_steps=5, total_steps=100)
    manifest = dataclasses.replace(run.manifest, config=dataclasses.replace(run.manifest.config, training=training))
    assets = open_assets(manifest, root / "coord" / "blobs", [])
    rates: dict[str, list[float]] = {}
    for peer in ("peer-a", "peer-b"):
        trainer = Trainer(manifest, assets.corpus, peer, config_json=assets.config_json, micro_batch=2)
        seen = []
        original = trainer.inner.step

        def step(*args, _seen=seen, _trainer=trainer, _original=original, **kwargs):
            _seen.append(_trainer.inner.param_groups[0]["lr"])
            return _original(*args, **kwargs)

        trainer.inner.step = step
        trainer.inner_steps(7)
        rates[peer] = seen
    expected = [manifest.config.training.inner_lr_at(7 * 3 + k) for k in range(3)]
    assert rates["peer-a"] == rates["peer-b"] == expected
    assert expected[0] > expected[1] > expected[2]  # past the warmup (5 steps): the cosine decays
    data = manifest.config.data
    a = assets.corpus.batch(data, 4, peer_id="peer-a", round=7, step=1)
    assert torch.equal(a, open_assets(manifest, root / "coord" / "blobs", []).corpus.batch(
        data, 4, peer_id="peer-a", round=7, step=1))
    assert not torch.equal(a, assets.corpus.batch(data, 4, peer_id="peer-b", round=7, step=1))


def test_gradient_accumulation_and_activation_checkpointing_keep_the_runs_gradient(launched):
    root, run = launched
    assets = open_assets(run.manifest, root / "coord" / "blobs", [])
    grads = []
    for micro in (8, 2, 3):
        trainer = Trainer(run.manifest, assets.corpus, "p", config_json=assets.config_json, micro_batch=micro)
        windows = assets.corpus.batch(run.manifest.config.data, 8, peer_id="p", round=0, step=0)
        loss = trainer._gradient(windows)
        grads.append((loss, torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()])))
    checkpointed = Trainer(run.manifest, assets.corpus, "p", config_json=assets.config_json, micro_batch=4,
                           activation_checkpointing=True)
    assert getattr(checkpointed.model, "is_activation_checkpointing", None) or checkpointed.model.is_gradient_checkpointing
    loss = checkpointed._gradient(assets.corpus.batch(run.manifest.config.data, 8, peer_id="p", round=0, step=0))
    grads.append((loss, torch.cat([p.grad.reshape(-1) for p in checkpointed.model.parameters()])))
    for loss, grad in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-5)
        assert torch.allclose(grad, grads[0][1], atol=1e-6, rtol=1e-4)


def test_relaunch_refuses_a_changed_model_config(launched, tmp_path):
    root, run = launched
    config_path = root / "run" / "model" / "config.json"
    original = config_path.read_text()
    try:
        config_path.write_text(original.replace('"intermediate_size": 128', '"intermediate_size": 96'))
        with pytest.raises(ConfigError, match=r"differs .*\(model\.config\)"):
            prepare_run(RunConfig.from_toml((root / "run" / "RUN.toml").read_text()), root / "coord",
                        base=root / "run")
    finally:
        config_path.write_text(original)
    resumed = prepare_run(RunConfig.from_toml((root / "run" / "RUN.toml").read_text()), root / "coord",
                          base=root / "run")
    assert resumed.resumed and resumed.manifest == run.manifest
    resumed.ledger.close()


def test_export_loads_with_from_pretrained_generates_and_its_root_is_the_ledgers(launched, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, run = launched
    out = tmp_path / "export"
    summary = export_checkpoint(root / "coord", out)
    assert summary.entry.seq == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "barnraise.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert run.manifest.run_id in card and summary.entry.checkpoint_root in card and "barnraise-audit verify" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 8
    assert tokenizer.decode(ids["input_ids"][0]) == "def main("
    # what from_pretrained built is the recorded genesis, tensor for tensor
    genesis = build_model(run.manifest.config.model, (root / "coord" / "blobs" / blob_digest(
        run.manifest.config.model.config)).read_bytes())
    loaded = dict(model.named_parameters())
    assert all(torch.equal(p, loaded[n]) for n, p in genesis.named_parameters())

    args = ["verify", "--ledger", str(root / "coord" / "ledger.jsonl"), "--public-key",
            str(root / "coord" / "coordinator.pub"), "--export", str(out)]
    assert audit_main(args) == 0
    assert "export ok" in capsys.readouterr().out
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0] += 1e-3
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert audit_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "audit failed: export" in err[0] and "ledger entry 0 signed root" in err[0]
    assert f"tensor {name}: digest does not match the ledger" in err[0]
    assert oct((out / "config.json").stat().st_mode & 0o777) == oct(0o644)
    with pytest.raises(InputError, match="not an empty folder"):
        export_checkpoint(root / "coord", out)
    with pytest.raises(InputError, match="no checkpoint of round 99"):
        export_checkpoint(root / "coord", tmp_path / "other", round=99)


def test_the_built_in_byte_level_run_exports_with_a_byte_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = prepare_run(RunConfig(name="demo"), tmp_path / "coord")
    run.ledger.write_jsonl(tmp_path / "coord" / "ledger.jsonl")
    run.ledger.close()
    export_checkpoint(tmp_path / "coord", tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("héllo\n").input_ids == list("héllo\n".encode())  # a token is a byte
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "GPT2LMHeadModel"
    generated = model.generate(**tokenizer("def ", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_init_weights_become_genesis_and_a_misfit_is_refused(tmp_path):
    from safetensors.torch import save_file

    from peer.join import state_from_genesis
    from peer.state import StateLayout
    from protocol.hashing import checkpoint_root

    run_toml = make_run(tmp_path / "run", "qwen2", limit=600_000)
    model_config, config_json = _model("qwen2")
    start = build_model(dataclasses.replace(model_config, init_seed=7), (tmp_path / "run" / "model" / "config.json")
                        .read_bytes())
    tensors = {n: p.detach().clone() for n, p in start.named_parameters()}
    (tmp_path / "run" / "start").mkdir()
    save_file(tensors, str(tmp_path / "run" / "start" / "w.safetensors"))
    text = run_toml.read_text().replace('config = "model/config.json"\n',
                                        'config = "model/config.json"\ninit = "start/w.safetensors"\n')
    run = prepare_run(RunConfig.from_toml(text), tmp_path / "coord", base=tmp_path / "run")
    run.ledger.close()
    assert run.manifest.config.model.init.startswith("sha256:")
    assert run.manifest.genesis_root == checkpoint_root(tensors)
    with pytest.raises(HashMismatch, match="init weights"):
        state_from_genesis(run.manifest, StateLayout.of(start))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first][:1]
    save_file(tensors, str(tmp_path / "run" / "start" / "w.safetensors"))
    with pytest.raises(InputError, match=f"model.init does not fit model.config: .*{first}"):
        prepare_run(RunConfig.from_toml(text), tmp_path / "coord2", base=tmp_path / "run")


def test_what_a_peer_trains_on_is_pinned_to_integers_from_sha256():
    """Golden values: the draw uses no float and no torch generator, so any machine recomputes it."""
    from protocol.data_index import Shard, heldout_starts, window_starts

    index = DataIndex(tokenizer="bytes", vocab_size=256, dtype="uint16", separator=-1,
                      train=(Shard("a" * 64, 1000), Shard("b" * 64, 50), Shard("c" * 64, 5000)),
                      heldout=(Shard("d" * 64, 300),))
    assert [round_shard(index, seed=0, width=65, peer_id="p", round=r) for r in range(12)] == \
        [0, 2, 2, 0, 2, 0, 2, 2, 2, 2, 2, 2]
    assert window_starts(5000, seed=0, width=65, batch_size=4, peer_id="p", round=3, step=1).tolist() == \
        [3071, 4480, 3534, 799]
    # shard 1 (50 tokens) is shorter than a window: never drawn
    assert 1 not in {round_shard(index, seed=0, width=65, peer_id=f"p{k}", round=0) for k in range(300)}
    # the last held-out window ends at the last token, even past float32's exact integers
    total = 2**25 + 132
    assert heldout_starts(total, width=65, count=3).tolist() == [0, (total - 65) // 2, total - 65]


def test_a_download_cut_short_is_a_transport_failure_not_a_tampered_file(tmp_path):
    """The coordinator restarting mid-download: fewer bytes than Content-Length. The peer tries its
    next source and, with none, sits the round out (TransportError), instead of calling it tampered."""
    import http.server

    from peer.blobs import BlobCache
    from protocol.errors import TransportError

    body = bytes(range(256)) * 8

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Short)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = CoordinatorClient(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(TransportError, match="cut short"):
            client.download("/blobs/x", tmp_path / "x", len(body))
        assert not list(tmp_path.iterdir())  # nothing half-written is left
        digest = hashlib.sha256(body).hexdigest()
        cache = BlobCache(tmp_path / "cache", [("the coordinator", coordinator_source(client))])
        with pytest.raises(TransportError, match="cut short"):
            cache.fetch(digest, len(body), "training shard 0")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

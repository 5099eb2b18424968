"""The light install: ``barnraise-audit`` runs with none of the ``[swarm]`` extra's modules.

Each check runs in a subprocess whose ``sys.meta_path`` refuses torch, hivemind and the rest of
the extra, as a core-only install (``pip install .``) would: a heavy import added anywhere on the
audit's path (``coordinator.audit``, ``protocol``'s ``__init__``, ``protocol.ledger`` ...) fails here.
The ledger and the checkpoint records are made in this process with torch and
``protocol.hashing``, so the audit's torch-free digests are checked against the reference too.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import protocol
from protocol.extras import EXTRA_MODULES, missing_modules, require_extra
from protocol.hashing import checkpoint_root, tensor_digests
from protocol.ledger import entry_to_json, next_entry
from protocol.records import FileRecord
from protocol.signing import SigningKey, public_key_to_pem

HEAVY = ("torch", "hivemind", "transformers", "tokenizers", "datasets", "uvloop", "aiohttp", "prometheus_client", "rich")

# Runs before anything else in the subprocess: every module of HEAVY (and its submodules) is unimportable.
_BLOCKER = textwrap.dedent(f"""
    import sys

    class _NoSwarmExtra:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: light install)", name=name)
            return None

    sys.meta_path.insert(0, _NoSwarmExtra())
""")


def _run_light(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(__file__).resolve().parents[1])


def _record(path: Path, tensors: dict[str, torch.Tensor]) -> FileRecord:
    """The ledger's record of ``path``, made by the torch reference (``protocol.hashing``)."""
    raw = path.read_bytes()
    return FileRecord(name=path.name, root=checkpoint_root(tensors), sha256=hashlib.sha256(raw).hexdigest(),
                      size=len(raw), tensors=tensor_digests(tensors))


@pytest.fixture
def light_run(tmp_path: Path) -> Path:
    """Two signed ledger entries and their checkpoint files, every dtype the canonical hash covers."""
    key = SigningKey.generate()
    generator = torch.Generator().manual_seed(7)
    entries = []
    for round in (0, 3):
        folder = tmp_path / "checkpoints" / f"r{round:06d}"
        folder.mkdir(parents=True)
        model = {"transformer.wte.weight": torch.randn(16, 8, generator=generator),
                 "transformer.h.0.attn.c_attn.weight": torch.randn(8, 24, generator=generator).to(torch.bfloat16),
                 "transformer.h.0.ln_1.bias": torch.zeros(8, dtype=torch.float16),
                 "mask": torch.tensor([True, False, True]), "step": torch.tensor(round, dtype=torch.int64),
                 "empty": torch.zeros(0, 3, dtype=torch.int8)}
        outer = {"momentum.transformer.wte.weight": torch.randn(16, 8, generator=generator).double()}
        records = []
        for name, tensors in (("model.safetensors", model), ("outer.safetensors", outer)):
            save_file(tensors, str(folder / name))
            records.append(_record(folder / name, tensors))
        entries.append(next_entry(key, entries[-1] if entries else None, run_id="0123456789abcdef", round=round,
                                  created_at=1_700_000_000.0 + round, files=records, contributors=[],
                                  heldout_loss=None))
    (tmp_path / "ledger.jsonl").write_text("".join(entry_to_json(entry) + "\n" for entry in entries))
    (tmp_path / "coordinator.pub").write_bytes(public_key_to_pem(key.public_key_hex))
    return tmp_path


def test_the_blocker_blocks() -> None:
    """Without this, a broken blocker would let every test below pass on a full install."""
    result = _run_light("import torch")
    assert result.returncode == 1 and "blocked: light install" in result.stderr


def test_audit_verify_and_hash_run_without_the_swarm_extra(light_run: Path) -> None:
    result = _run_light(f"""
        import json, sys
        from coordinator.audit import main
        args = ["--ledger", {str(light_run / "ledger.jsonl")!r}, "--public-key", {str(light_run / "coordinator.pub")!r},
                "--checkpoints", {str(light_run / "checkpoints")!r}]
        assert main(["verify", *args]) == 0
        assert main(["verify", *args, "--format", "json"]) == 0
        assert main(["hash", {str(light_run / "checkpoints" / "r000003")!r}, "--tensors"]) == 0
        heavy = sorted({{name.partition(".")[0] for name in sys.modules}} & {set(HEAVY) | {"peer"}!r})
        print(json.dumps({{"heavy": heavy}}))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert "checkpoints ok: 4 files, 14 tensors" in result.stdout
    assert json.loads(lines[-1]) == {"heavy": []}
    report = json.loads(result.stdout[result.stdout.index("{"):result.stdout.index("\n}\n") + 2])
    assert report["ok"] and [c["ok"] for c in report["checkpoints"]] == [True, True]


def test_a_tampered_checkpoint_still_fails_without_the_swarm_extra(light_run: Path) -> None:
    path = light_run / "checkpoints" / "r000003" / "outer.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the only tensor's data
    path.write_bytes(bytes(raw))
    result = _run_light(f"""
        from coordinator.audit import main
        raise SystemExit(main(["verify", "--ledger", {str(light_run / "ledger.jsonl")!r}, "--public-key",
                               {str(light_run / "coordinator.pub")!r}, "--checkpoints", {str(light_run / "checkpoints")!r}]))
    """)
    assert result.returncode == 1
    assert result.stderr == ("audit failed: ledger entry 1, file outer.safetensors, tensor "
                             "momentum.transformer.wte.weight: digest does not match the ledger\n")


def test_a_swarm_tool_on_a_light_install_stops_in_one_line() -> None:
    result = _run_light("""
        from protocol.extras import require_extra
        require_extra("swarm", "barnraise-peer")
        print("not reached")
    """)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("barnraise-peer: error: this needs Barnraise's [swarm] extra (no module torch, ")
    assert 'pip install ".[swarm]"' in result.stderr


def test_the_swarm_extra_is_complete_here() -> None:
    """The test environment installs ``[dev]``, which pulls ``[swarm]``: nothing is missing, nothing exits."""
    assert set(EXTRA_MODULES["swarm"]) == set(HEAVY)
    assert missing_modules("swarm") == []
    assert require_extra("swarm", "barnraise-peer") is None


def test_every_name_protocol_exports_resolves() -> None:
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        protocol.nothing_here  # noqa: B018

"""``barnraise-audit`` against real ledgers and safetensors checkpoints built in tmp_path.

Every failure case checks the exit status and that stderr is exactly one line naming what
failed. A few cases run the real console module in a subprocess; the rest call ``main``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import coordinator.audit
from coordinator.audit import audit, file_record, hash_safetensors_file, main, read_ledger, verify_checkpoint_files
from protocol.errors import HashMismatch, InputError
from protocol.hashing import DTYPE_NAMES, checkpoint_root, tensor_digests
from protocol.ledger import entry_to_json, next_entry
from protocol.records import Contribution, LedgerEntry
from protocol.signing import SigningKey, key_id, public_key_to_pem

RUN_ID = "0123456789abcdef"
ROUNDS = (0, 5, 10)
ATTN = "transformer.h.0.attn.c_attn.weight"


@dataclass
class Run:
    """A three-entry ledger (genesis + 2 checkpoints) with its checkpoint files on disk."""

    root: Path
    key: SigningKey
    entries: list[LedgerEntry]
    tensors: dict[tuple[int, str], dict[str, torch.Tensor]]
    """The tensors saved, by (round, file name)."""

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    @property
    def public_key(self) -> Path:
        return self.root / "coordinator.pub"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def file(self, round: int, name: str) -> Path:
        return self.checkpoints / f"r{round:06d}" / name

    def args(self, *extra: str) -> list[str]:
        return ["verify", "--ledger", str(self.ledger), "--public-key", str(self.public_key), *extra]

    def full_args(self) -> list[str]:
        return self.args("--checkpoints", str(self.checkpoints))


def _model_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        ATTN: torch.randn(8, 24, generator=generator),
        "transformer.wte.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "transformer.ln_f.bias": torch.zeros(8),
        "lm_head.step": torch.tensor(7, dtype=torch.int64),
    }


def _outer_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"momentum." + ATTN: torch.randn(8, 24, generator=generator), "outer.step": torch.tensor([3])}


@pytest.fixture
def run(tmp_path: Path) -> Run:
    key = SigningKey.generate()
    generator = torch.Generator().manual_seed(0)
    entries: list[LedgerEntry] = []
    saved: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for round in ROUNDS:
        folder = tmp_path / "checkpoints" / f"r{round:06d}"
        folder.mkdir(parents=True)
        records = []
        for name, tensors in (("model.safetensors", _model_tensors(generator)),
                              ("outer.safetensors", _outer_tensors(generator))):
            save_file(tensors, str(folder / name))
            saved[round, name] = tensors
            records.append(file_record(folder / name))
        contributors = [Contribution(peer_id="aa" * 8, samples=64 * round)] if round else []
        entries.append(next_entry(key, entries[-1] if entries else None, run_id=RUN_ID, round=round,
                                  created_at=1_700_000_000.0 + round, files=records,
                                  contributors=contributors, heldout_loss=None if round == 0 else 2.5))
    result = Run(root=tmp_path, key=key, entries=entries, tensors=saved)
    _write_ledger(result.ledger, [entry_to_json(e) for e in entries])
    result.public_key.write_bytes(public_key_to_pem(key.public_key_hex))
    return result


def _write_ledger(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _audit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line: {err!r}"
    return err.strip()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.audit", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _data_offset(path: Path, tensor: str) -> int:
    """Where ``tensor``'s bytes start in a safetensors file."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    return 8 + header_len + header[tensor]["data_offsets"][0]


# --- verify: the good case ------------------------------------------------------------------


def test_verify_passes_on_an_untouched_run_in_a_subprocess(run: Run) -> None:
    result = _cli(*run.full_args())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "3 entries" in result.stdout and "last round 10" in result.stdout
    assert "6 files, 18 tensors" in result.stdout
    assert run.key.public_key_hex not in result.stdout  # the key id, not the key, is shown
    assert key_id(run.key.public_key_hex) in result.stdout


def test_verify_passes_in_process_with_a_hex_public_key(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.public_key.write_text(run.key.public_key_hex + "\n")
    status, out, err = _audit(run.full_args(), capsys)
    assert (status, err) == (0, "")
    assert "checkpoints ok: 6 files, 18 tensors" in out


def test_verify_without_checkpoints_checks_only_the_ledger(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.file(5, "model.safetensors").unlink()
    status, out, err = _audit(run.args(), capsys)
    assert (status, err) == (0, "")
    assert "not checked" in out


def test_an_extra_file_in_a_checkpoint_folder_is_fine(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"x": torch.ones(2)}, str(run.file(5, "extra.safetensors")))
    (run.file(5, "README.txt")).write_text("not in the ledger")
    assert _audit(run.full_args(), capsys)[0] == 0


def test_last_only_checks_just_the_newest_checkpoint(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.file(5, "model.safetensors").unlink()
    status, out, err = _audit([*run.full_args(), "--last-only"], capsys)
    assert (status, err) == (0, "")
    assert "2 files, 6 tensors" in out


# --- verify: checkpoint files that do not match ---------------------------------------------


def test_a_flipped_byte_inside_a_tensor_names_entry_file_and_tensor(run: Run) -> None:
    path = run.file(10, "model.safetensors")
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, ATTN) + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    result = _cli(*run.full_args())
    assert result.returncode == 1
    assert _one_line(result.stderr) == (
        f"audit failed: ledger entry 2, file model.safetensors, tensor {ATTN}: digest does not match the ledger")


def test_a_truncated_file_fails_naming_it(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    path = run.file(5, "outer.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 1
    line = _one_line(err)
    assert line.startswith("audit failed: ledger entry 1, file outer.safetensors: size is ")


def test_a_file_that_is_not_safetensors_fails_naming_it(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    path = run.file(5, "model.safetensors")
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size, so only the parse can tell
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 1
    assert _one_line(err).startswith(
        "audit failed: ledger entry 1, file model.safetensors: not a valid safetensors file")


def test_a_missing_file_fails_naming_it(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.file(10, "outer.safetensors").unlink()
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 1
    assert _one_line(err) == (
        "audit failed: ledger entry 2, file outer.safetensors: missing (expected r000010/outer.safetensors)")


def test_a_file_with_the_same_tensors_but_other_bytes_fails_on_sha256(run: Run) -> None:
    """Same tensors and size, header keys in another order: only the plain sha256 can tell."""
    path = run.file(5, "outer.safetensors")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    reordered = json.dumps(dict(reversed(header.items())), separators=(",", ":")).encode()
    assert len(reordered) <= header_len and reordered != raw[8:8 + header_len].rstrip()
    path.write_bytes(raw[:8] + reordered.ljust(header_len) + raw[8 + header_len:])
    assert hash_safetensors_file(path).root == run.entries[1].files[1].root
    with pytest.raises(HashMismatch, match="ledger entry 1, file outer.safetensors: sha256 does not match"):
        verify_checkpoint_files(run.entries[1], run.checkpoints)


def test_a_renamed_tensor_is_reported_as_missing(run: Run) -> None:
    tensors = dict(run.tensors[0, "outer.safetensors"])
    tensors["outer.step2"] = tensors.pop("outer.step")
    save_file(tensors, str(run.file(0, "outer.safetensors")))
    with pytest.raises(HashMismatch, match="file outer.safetensors, tensor outer.step: in the ledger but not in"):
        verify_checkpoint_files(run.entries[0], run.checkpoints)


# --- verify: a ledger that does not verify ------------------------------------------------


def test_an_edited_ledger_line_fails_naming_that_entry(run: Run) -> None:
    lines = run.ledger.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["created_at"] += 1.0
    lines[1] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    _write_ledger(run.ledger, lines)
    result = _cli(*run.full_args())
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith("audit failed: ledger entry 1: signature does not verify")


def test_a_deleted_ledger_line_fails(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    lines = run.ledger.read_text().splitlines()
    _write_ledger(run.ledger, [lines[0], lines[2]])
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 1
    assert _one_line(err) == "audit failed: ledger entry at line 2: seq is 2, expected 1"


def test_a_wrong_public_key_fails_naming_the_signature(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.public_key.write_bytes(public_key_to_pem(SigningKey.generate().public_key_hex))
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 1
    assert _one_line(err).startswith("audit failed: ledger entry 0: signature is by key ")


def test_a_signed_entry_whose_tensor_digests_do_not_make_its_root_fails(run: Run) -> None:
    """The chain and signature hold, but the coordinator recorded a root its digests do not give."""
    genesis = run.entries[0]
    model = genesis.files[0]
    tensors = dict(model.tensors)
    tensors[ATTN] = "0" * 64
    bad_file = dataclasses.replace(model, tensors=tensors)
    entry = next_entry(run.key, genesis, run_id=RUN_ID, round=1, created_at=1_700_000_001.0,
                       files=[bad_file, genesis.files[1]], contributors=[], heldout_loss=None)
    with pytest.raises(HashMismatch, match="ledger entry 1, file model.safetensors: recorded tensor digests do not"):
        audit([genesis, entry], run.key.public_key_hex)


def test_an_empty_ledger_fails(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.ledger.write_text("")
    status, _, err = _audit(run.args(), capsys)
    assert status == 1
    assert "ledger is empty" in _one_line(err)


# --- bad input: exit 2, one line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda r: r.ledger.unlink(), "cannot read ledger"),
        (lambda r: r.public_key.unlink(), "cannot read public key"),
        (lambda r: r.public_key.write_bytes(b"not a key at all\n"), "not a PEM public key"),
        (lambda r: r.ledger.write_text(r.ledger.read_text() + "{not json\n"), "ledger line 4:"),
        (lambda r: r.ledger.write_text("[" * 100_000 + "\n"), "ledger line 1: nested too deeply"),
        (lambda r: r.ledger.write_bytes(b"\xff\xfe\n"), "not UTF-8"),
        (lambda r: r.ledger.write_text('{"version": 1}\n'), "ledger line 1: ledger entry: missing field"),
    ],
    ids=["missing-ledger", "missing-key", "garbage-key", "malformed-line", "deep-json", "not-utf8", "bad-schema"],
)
def test_bad_input_exits_2_with_one_line(run: Run, capsys: pytest.CaptureFixture[str], damage, expected) -> None:
    damage(run)
    status, _, err = _audit(run.full_args(), capsys)
    assert status == 2
    line = _one_line(err)
    assert line.startswith("barnraise-audit: error: ") and expected in line


def test_a_missing_checkpoints_folder_exits_2(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _audit(run.args("--checkpoints", str(run.root / "nowhere")), capsys)
    assert status == 2
    assert "checkpoints folder" in _one_line(err)


def test_a_usage_error_is_one_line_and_exit_2(run: Run) -> None:
    result = _cli("verify", "--ledger", str(run.ledger))
    assert result.returncode == 2
    assert _one_line(result.stderr) == "barnraise-audit: error: the following arguments are required: --public-key"


# --- the ledger over HTTP -----------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(run: Run):
    """An HTTP server on 127.0.0.1 serving the run's folder; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(run.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="ledger-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_ledger_served_over_http_verifies(run: Run, served: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify", "--ledger", f"{served}/ledger.jsonl", "--public-key", str(run.public_key),
            "--checkpoints", str(run.checkpoints)]
    status, out, err = _audit(args, capsys)
    assert (status, err) == (0, "")
    assert "3 entries" in out


def test_a_missing_url_exits_2(run: Run, served: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _audit(["verify", "--ledger", f"{served}/nope.jsonl", "--public-key", str(run.public_key)],
                            capsys)
    assert status == 2
    assert "HTTP 404" in _one_line(err)


def test_a_ledger_larger_than_the_cap_is_refused(run: Run, served: str) -> None:
    with pytest.raises(InputError, match="larger than 100 bytes"):
        read_ledger(f"{served}/ledger.jsonl", max_bytes=100)


def test_an_unreachable_url_exits_2_quickly(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    status, _, err = _audit(["verify", "--ledger", f"http://127.0.0.1:{port}/ledger.jsonl",
                             "--public-key", str(run.public_key)], capsys)
    assert status == 2
    assert _one_line(err).startswith("barnraise-audit: error: cannot fetch ledger")
    assert time.monotonic() - started < 5


# --- hash -----------------------------------------------------------------------------------------


def test_hash_prints_the_canonical_root_and_the_plain_sha256(run: Run) -> None:
    path = run.file(5, "model.safetensors")
    tensors = run.tensors[5, "model.safetensors"]
    result = _cli("hash", str(path), "--tensors")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = dict(line.split(" ", 1) for line in lines[:4])
    assert fields["checkpoint_root"] == checkpoint_root(tensors)
    assert fields["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fields["size"] == str(path.stat().st_size)
    digests = tensor_digests(tensors)
    assert lines[4:] == [f"{digests[name]} {name}" for name in sorted(tensors)]


def test_hash_of_a_folder_covers_each_file_in_name_order(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _audit(["hash", str(run.checkpoints / "r000010")], capsys)
    assert (status, err) == (0, "")
    roots = [line.split()[1] for line in out.splitlines() if line.startswith("checkpoint_root ")]
    assert roots == [run.entries[2].files[0].root, run.entries[2].files[1].root]


@pytest.mark.parametrize(
    ("what", "expected"),
    [("missing", "does not exist"), ("not-safetensors", "x.safetensors: not a valid safetensors file"),
     ("empty-folder", "no .safetensors files"), ("unsupported-dtype", "x.safetensors: tensor 'u' has unsupported")],
)
def test_hash_of_a_bad_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str,
                                    expected: str) -> None:
    path = tmp_path / "x.safetensors"
    if what == "not-safetensors":
        path.write_bytes(b"hello")
    elif what == "unsupported-dtype":
        save_file({"u": torch.zeros(3, dtype=torch.uint16)}, str(path))
    elif what == "empty-folder":
        path = tmp_path
    status, _, err = _audit(["hash", str(path)], capsys)
    assert status == 2
    line = _one_line(err)
    assert line.startswith("barnraise-audit: error: ") and expected in line


# --- what auditors must install -------------------------------------------------------------------


def test_the_audit_tool_imports_no_networking_or_peer_code() -> None:
    probe = ("import sys, coordinator.audit; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'hivemind', 'aiohttp', 'peer', 'uvloop', 'torch', 'transformers', 'datasets'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# --- the canonical hash, computed from the file's bytes (no torch) ------------------------------


def _sample(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    low = 0 if dtype == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
def test_file_digests_equal_the_torch_reference_for_every_dtype(tmp_path: Path, dtype: torch.dtype,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1)
    tensors = {"matrix": _sample(dtype, (3, 5), generator), "scalar": _sample(dtype, (), generator),
               "empty": _sample(dtype, (0, 4), generator), "transposed": _sample(dtype, (4, 2), generator).T.contiguous(),
               "ünïcode.name": _sample(dtype, (7,), generator)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    monkeypatch.setattr(coordinator.audit, "_CHUNK_BYTES", 7)  # tensors span several reads, cut mid-element
    hashes = hash_safetensors_file(path)
    assert hashes.tensors == tensor_digests(tensors)
    assert hashes.root == checkpoint_root(tensors)


def test_a_bool_byte_other_than_0_or_1_hashes_as_torch_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"mask": torch.tensor([True, False, True])}, str(path))
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, "mask")] = 0x02  # torch loads it as True
    path.write_bytes(bytes(raw))
    assert hash_safetensors_file(path).tensors == tensor_digests({"mask": torch.tensor([True, False, True])})


def test_a_header_naming_a_tensor_twice_is_not_valid_safetensors(tmp_path: Path) -> None:
    spec = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = f'{{"a":{spec},"a":{spec}}}'.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(InputError, match="x.safetensors: not a valid safetensors file"):
        hash_safetensors_file(path)


# --- --format json --------------------------------------------------------------------------------


def test_verify_format_json_reports_the_ledger_and_each_checkpoint(run: Run,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _audit([*run.full_args(), "--format", "json"], capsys)
    assert (status, err) == (0, "")
    report = json.loads(out)
    assert {k: report[k] for k in ("version", "command", "ok", "error", "problems", "export")} == {
        "version": 1, "command": "verify", "ok": True, "error": None, "problems": [], "export": None}
    assert report["ledger"] == {"ok": True, "entries": 3, "run_id": RUN_ID, "last_round": 10,
                                "key_id": key_id(run.key.public_key_hex)}
    assert [(c["seq"], c["round"], c["ok"], c["problem"], c["files"], c["tensors"]) for c in report["checkpoints"]] \
        == [(0, 0, True, None, 2, 6), (1, 5, True, None, 2, 6), (2, 10, True, None, 2, 6)]
    assert [c["checkpoint_root"] for c in report["checkpoints"]] == [e.checkpoint_root for e in run.entries]
    assert report["checkpoints"][1]["bytes"] == sum(r.size for r in run.entries[1].files)


def test_verify_format_json_without_checkpoints_says_they_were_not_checked(run: Run,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _audit([*run.args(), "--format", "json"], capsys)
    assert status == 0
    assert json.loads(out)["checkpoints"] is None


def test_verify_format_json_goes_on_past_a_failed_checkpoint(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    path = run.file(5, "model.safetensors")
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, ATTN) + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    run.file(10, "outer.safetensors").unlink()
    text_status, _, text_err = _audit(run.full_args(), capsys)
    status, out, err = _audit([*run.full_args(), "--format", "json"], capsys)
    assert status == text_status == 1
    assert err == text_err  # the same one line, naming the first failure
    report = json.loads(out)
    assert report["ok"] is False
    assert report["problems"] == [
        f"ledger entry 1, file model.safetensors, tensor {ATTN}: digest does not match the ledger",
        "ledger entry 2, file outer.safetensors: missing (expected r000010/outer.safetensors)"]
    assert [c["ok"] for c in report["checkpoints"]] == [True, False, False]
    assert [c["problem"] for c in report["checkpoints"]] == [None, *report["problems"]]
    assert _one_line(err) == f"audit failed: {report['problems'][0]}"


def test_verify_format_json_with_a_bad_signature_checks_no_file(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run.public_key.write_bytes(public_key_to_pem(SigningKey.generate().public_key_hex))
    status, out, err = _audit([*run.full_args(), "--format", "json"], capsys)
    assert status == 1
    report = json.loads(out)
    assert report["ledger"]["ok"] is False and report["checkpoints"] is None
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("ledger entry 0: signature is by key ")
    assert _one_line(err) == f"audit failed: {report['problems'][0]}"


def test_verify_format_json_checks_an_export(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(run.file(5, "model.safetensors").read_bytes())
    status, out, err = _audit([*run.args("--export", str(export)), "--format", "json"], capsys)
    assert (status, err) == (0, "")
    assert json.loads(out)["export"] == {"ok": True, "path": str(export), "problem": None, "seq": 1, "round": 5,
                                         "checkpoint_root": run.entries[1].checkpoint_root}
    save_file({"x": torch.ones(2)}, str(export / "model.safetensors"))
    status, out, err = _audit([*run.args("--export", str(export)), "--format", "json"], capsys)
    assert status == 1
    report = json.loads(out)
    assert report["export"]["ok"] is False and report["export"]["seq"] is None
    assert report["problems"] == [report["export"]["problem"]]
    assert "which no ledger entry signed" in report["export"]["problem"]


def test_format_json_on_unusable_input_prints_the_error_and_exits_2(run: Run,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run.ledger.unlink()
    status, out, err = _audit([*run.full_args(), "--format", "json"], capsys)
    assert status == 2
    report = json.loads(out)
    assert report == {"version": 1, "command": "verify", "ok": False, "problems": [],
                      "error": f"cannot read ledger {run.ledger}: No such file or directory"}
    assert _one_line(err) == f"barnraise-audit: error: {report['error']}"


def test_hash_format_json(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    folder = run.checkpoints / "r000010"
    status, out, err = _audit(["hash", str(folder), "--format", "json", "--tensors"], capsys)
    assert (status, err) == (0, "")
    report = json.loads(out)
    assert (report["version"], report["command"], report["ok"], report["error"]) == (1, "hash", True, None)
    model, outer = report["files"]
    path = folder / "model.safetensors"
    assert model == {"path": str(path), "size": path.stat().st_size,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                     "checkpoint_root": run.entries[2].files[0].root,
                     "tensors": tensor_digests(run.tensors[10, "model.safetensors"])}
    assert list(model["tensors"]) == sorted(model["tensors"])
    assert outer["path"] == str(folder / "outer.safetensors")
    status, out, _ = _audit(["hash", str(path), "--format", "json"], capsys)
    assert status == 0 and json.loads(out)["files"][0]["tensors"] is None


def test_format_takes_only_text_or_json(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _audit([*run.args(), "--format", "yaml"], capsys)
    assert (status, out) == (2, "")
    assert "invalid choice: 'yaml'" in _one_line(err)

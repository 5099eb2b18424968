"""Run config (TOML) and the signed run manifest.

pytest -q tests/test_protocol_manifest.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError, InputError, MalformedRecord, SignatureError
from protocol.manifest import (
    AveragingConfig,
    CheckpointConfig,
    DataSpec,
    ModelConfig,
    RunConfig,
    RunManifest,
    SignedManifest,
    TrainingConfig,
)
from protocol.signing import SigningKey, key_id
from protocol.wire import canonical_bytes

COORDINATOR_SEED = bytes(range(32))
COORDINATOR = SigningKey(Ed25519PrivateKey.from_private_bytes(COORDINATOR_SEED))
STRANGER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([0x5A] * 32)))
SECTIONS = ("model", "data", "training", "averaging", "checkpoints")


def manifest_of(config: RunConfig, **overrides) -> RunManifest:
    fields = dict(
        config=config,
        coordinator_key=COORDINATOR.public_key_hex,
        genesis_root="7e" * 32,
        created_at=1700000000.0,
    )
    fields.update(overrides)
    return RunManifest(**fields)


# Every field differs from its default, and each one alone still makes a valid config (but for
# lr_schedule = "cosine", which needs total_steps).
ALTERNATIVE = {
    "model": {"vocab_size": 512, "n_positions": 256, "n_embd": 256, "n_layer": 3, "n_head": 8, "init_seed": 1},
    "data": {"seq_len": 64, "heldout_percent": 10, "eval_windows": 32, "seed": 1},
    "training": {
        "inner_steps": 10,
        "batch_size": 8,
        "inner_lr": 0.001,
        "inner_weight_decay": 0.1,
        "inner_betas": [0.8, 0.99],
        "grad_clip": 0.5,
        "outer_lr": 0.5,
        "outer_momentum": 0.8,
        "nesterov": True,
        "lr_schedule": "cosine",
        "warmup_steps": 5,
        "total_steps": 1000,
        "min_lr_ratio": 0.05,
    },
    "averaging": {
        "codec": "int8-b256",
        "error_feedback_decay": 0.9,
        "aggregation": "mean",
        "overlap": False,
        "round_seconds": 30.0,
        "settle_seconds": 4.0,
        "max_contributors": 8,
        "round_deadline_seconds": 60.0,
    },
    "checkpoints": {"every_rounds": 3},
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def to_toml(name: str, sections: dict[str, dict]) -> str:
    """A minimal TOML writer for the test (the package only reads TOML)."""
    lines = ["[run]", f"name = {toml_value(name)}"]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# TOML
# ---------------------------------------------------------------------------------------


def test_minimal_toml_gives_the_documented_defaults():
    config = RunConfig.from_toml('[run]\nname = "demo"\n')
    assert config == RunConfig(name="demo")
    assert config.model == ModelConfig(
        family="gpt2", vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4, init_seed=0
    )
    assert config.data == DataSpec(corpus="python-stdlib", seq_len=128, heldout_percent=5, eval_windows=64, seed=0)
    assert config.training == TrainingConfig(
        inner_steps=15,
        batch_size=16,
        inner_lr=3e-3,
        inner_weight_decay=0.01,
        inner_betas=(0.9, 0.95),
        grad_clip=1.0,
        outer_lr=1.0,
        outer_momentum=0.0,
        nesterov=False,
        lr_schedule="constant",
        warmup_steps=0,
        total_steps=0,
        min_lr_ratio=0.1,
    )
    assert config.averaging == AveragingConfig(
        codec="bmax-c4096-b64-s2", error_feedback_decay=0.95, aggregation="senders", overlap=True,
        round_seconds=8.0, settle_seconds=1.5, max_contributors=16, round_deadline_seconds=30.0
    )
    assert config.checkpoints == CheckpointConfig(every_rounds=5)


def test_every_section_and_key_is_read():
    config = RunConfig.from_toml(to_toml("full-run_2", ALTERNATIVE))
    assert config.name == "full-run_2"
    for section, values in ALTERNATIVE.items():
        got = getattr(config, section)
        for key, value in values.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(got, key) == expected, f"{section}.{key}"
            assert getattr(got, key) != getattr(getattr(RunConfig(name="x"), section), key), f"{section}.{key}"
    assert config.training.inner_betas == (0.8, 0.99)


def test_integers_in_float_fields_become_floats():
    config = RunConfig.from_toml('[run]\nname = "x"\n[training]\ninner_lr = 1\ninner_betas = [0, 0]\n')
    assert config.training.inner_lr == 1.0 and isinstance(config.training.inner_lr, float)
    assert all(isinstance(b, float) for b in config.training.inner_betas)


def test_inline_tables_are_sections_too():
    config = RunConfig.from_toml('checkpoints = { every_rounds = 9 }\n[run]\nname = "x"\n')
    assert config.checkpoints.every_rounds == 9


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[run]\nname = "x"\n[optimizer]\nlr = 1\n', r"unknown table \[optimizer\]"),
        ('[run]\nname = "x"\n[model]\nn_layers = 2\n', r"model: unknown key 'n_layers'"),
        ('[run]\nname = "x"\n[data]\nseqlen = 2\n', r"data: unknown key 'seqlen'"),
        ('[run]\nname = "x"\n[training]\nlr = 2\n', r"training: unknown key 'lr'"),
        ('[run]\nname = "x"\n[averaging]\ngroup = 2\n', r"averaging: unknown key 'group'"),
        ('[run]\nname = "x"\n[checkpoints]\nevery = 2\n', r"checkpoints: unknown key 'every'"),
        ('[run]\nname = "x"\nseed = 1\n', r"\[run\] must hold exactly one key: name"),
        ("[model]\nn_layer = 2\n", r"\[run\] must hold exactly one key: name"),
        ('run = "x"\n', r"\[run\] must hold exactly one key: name"),
        ('model = 3\n[run]\nname = "x"\n', r"model must be a table"),
    ],
)
def test_unknown_tables_and_keys_are_named(text, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_toml(text)


@pytest.mark.parametrize(
    ("section", "line", "match"),
    [
        ("model", "n_layer = true", r"model\.n_layer: True is not a valid int"),
        ("model", "n_layer = 2.0", r"model\.n_layer: 2\.0 is not a valid int"),
        ("model", 'vocab_size = "256"', r"model\.vocab_size: '256' is not a valid int"),
        ("model", 'family = "llama"', r"model\.family 'llama' needs model\.config"),
        ("model", "n_layer = 99999999999999999999999", r"model\.n_layer: .* is not a valid int"),
        ("data", 'corpus = "web"', r"data\.corpus: 'web' is not a valid choice"),
        ("data", "seq_len = [8]", r"data\.seq_len: \[8\] is not a valid int"),
        ("training", 'inner_lr = "0.1"', r"training\.inner_lr: '0\.1' is not a valid float"),
        ("training", "inner_lr = true", r"training\.inner_lr: True is not a valid float"),
        ("training", "inner_lr = inf", r"training\.inner_lr: inf is not a valid float"),
        ("training", "outer_lr = nan", r"training\.outer_lr: nan is not a valid float"),
        ("training", "nesterov = 1", r"training\.nesterov: 1 is not a valid bool"),
        ("training", "inner_betas = [0.9]", r"training\.inner_betas: \[0\.9\] is not a valid tuple"),
        ("training", "inner_betas = 0.9", r"training\.inner_betas: 0\.9 is not a valid tuple"),
        ("training", "inner_betas = [0.9, 0.95, 0.99]", r"training\.inner_betas: .* is not a valid tuple"),
        ("training", 'inner_betas = [0.9, "x"]', r"training\.inner_betas: .* is not a valid tuple"),
        ("averaging", 'codec = "int8"', r"averaging\.codec: codec 'int8' is not a codec name.*"),
        ("averaging", 'codec = "topk-c4096-k8192-q2"', r"averaging\.codec: .*'topk-c4096-k8192-q2'.*"),
        ("averaging", "codec = 16", r"averaging\.codec: 16 is not a valid str"),
        ("averaging", 'overlap = "yes"', r"averaging\.overlap: 'yes' is not a valid bool"),
        ("averaging", 'aggregation = "median"', r"averaging\.aggregation: 'median' is not a valid choice"),
        ("averaging", 'error_feedback_decay = "1"', r"averaging\.error_feedback_decay: '1' is not a valid float"),
        ("training", 'lr_schedule = "linear"', r"training\.lr_schedule: 'linear' is not a valid choice"),
        ("training", "warmup_steps = 1.5", r"training\.warmup_steps: 1\.5 is not a valid int"),
        ("averaging", "round_deadline_seconds = inf", r"averaging\.round_deadline_seconds: inf is not a valid float"),
        ("checkpoints", "every_rounds = 1979-05-27", r"checkpoints\.every_rounds: .* is not a valid int"),
    ],
)
def test_wrong_types_are_named(section, line, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_toml(f'[run]\nname = "x"\n[{section}]\n{line}\n')


@pytest.mark.parametrize(
    ("section", "line", "match"),
    [
        ("model", "vocab_size = 0", r"model\.vocab_size must be positive"),
        ("model", "n_positions = 0", r"model\.n_positions must be positive"),
        ("model", "n_embd = 0", r"model\.n_embd must be positive"),
        ("model", "n_layer = -1", r"model\.n_layer must be positive"),
        ("model", "n_head = 0", r"model\.n_head must be positive"),
        ("model", "n_head = 3", r"model\.n_head must divide model\.n_embd"),
        ("model", "vocab_size = 255", r"model\.vocab_size must be at least 256"),
        ("model", "init_seed = -1", r"model\.init_seed must be non-negative"),
        ("data", "seq_len = 7", r"data\.seq_len must be at least 8"),
        ("data", "heldout_percent = 0", r"data\.heldout_percent must be between 1 and 49"),
        ("data", "heldout_percent = 50", r"data\.heldout_percent must be between 1 and 49"),
        ("data", "eval_windows = 0", r"data\.eval_windows must be positive"),
        ("data", "seq_len = 256", r"model\.n_positions must be at least data\.seq_len"),
        ("training", "inner_steps = 0", r"training\.inner_steps must be positive"),
        ("training", "batch_size = 0", r"training\.batch_size must be positive"),
        ("training", "inner_lr = 0.0", r"training\.inner_lr must be positive"),
        ("training", "inner_weight_decay = -0.1", r"training\.inner_weight_decay must be non-negative"),
        ("training", "inner_betas = [1.0, 0.9]", r"training\.inner_betas must lie in \[0, 1\)"),
        ("training", "inner_betas = [0.9, -0.1]", r"training\.inner_betas must lie in \[0, 1\)"),
        ("training", "grad_clip = -1.0", r"training\.grad_clip must be non-negative"),
        ("training", "outer_lr = 0", r"training\.outer_lr must be positive"),
        ("training", "outer_momentum = 1.0", r"training\.outer_momentum must lie in \[0, 1\)"),
        ("training", "outer_momentum = -0.5", r"training\.outer_momentum must lie in \[0, 1\)"),
        ("training", "warmup_steps = -1", r"training\.warmup_steps must be non-negative"),
        ("training", "total_steps = -1", r"training\.total_steps must be non-negative"),
        ("training", 'lr_schedule = "cosine"', r"training\.total_steps must exceed training\.warmup_steps"),
        ("training", "min_lr_ratio = 1.5", r"training\.min_lr_ratio must lie in \[0, 1\]"),
        ("averaging", "error_feedback_decay = 1.01", r"averaging\.error_feedback_decay must lie in \[0, 1\]"),
        ("averaging", "error_feedback_decay = -0.1", r"averaging\.error_feedback_decay must lie in \[0, 1\]"),
        ("averaging", "round_seconds = 0", r"averaging\.round_seconds must lie in \(0, 86400\]"),
        ("averaging", "settle_seconds = 5.0", r"averaging\.settle_seconds must be positive and at most half"),
        ("averaging", "max_contributors = 0", r"averaging\.max_contributors must lie in \[1, 1024\]"),
        ("averaging", "round_deadline_seconds = 0", r"averaging\.round_deadline_seconds must be positive"),
        ("checkpoints", "every_rounds = 0", r"checkpoints\.every_rounds must be positive"),
    ],
)
def test_each_post_init_check_names_its_key(section, line, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_toml(f'[run]\nname = "x"\n[{section}]\n{line}\n')


@pytest.mark.parametrize("name", ["", "has space", "dot.name", "slash/name", "x" * 65, 3, True])
def test_bad_run_names_are_refused(name):
    text = f"[run]\nname = {toml_value(name) if not isinstance(name, str) else repr(name)}\n"
    with pytest.raises(ConfigError, match="run.name"):
        RunConfig.from_toml(text.replace("'", '"'))


@pytest.mark.parametrize(
    "text",
    ["[run\nname = 'x'\n", "[run]\nname = \n", "[run]\nname = 'a'\nname = 'b'\n", "[run]\nname = 'x'\n[run]\n", "= 1"],
)
def test_malformed_toml_is_a_config_error(text):
    with pytest.raises(ConfigError, match="malformed TOML"):
        RunConfig.from_toml(text)


_HUGE_HEX = "0x" + "f" * 5000  # tomllib reads it; int() has no digit limit in base 16, str() does


@pytest.mark.parametrize(
    "text, match",
    [  # found by scripts/fuzz.py (run_config_toml): each raised something other than ConfigError, or hung
        ("[run]\nname = 'a'\n[training]\ninner_steps = " + "1" * 5000, "malformed TOML: Exceeds the limit"),
        ("[run]\nname = 'a'\n[training]\ninner_betas = " + "[" * 3000 + "]" * 3000, "nested too deeply"),
        ("[run]\nname = 'a'\n[model]\nfamily = 'llama'\n[model.config]\nx = 1979-05-27T07:32:00Z",
         r"\[model.config\] cannot be written as JSON: Object of type datetime"),
        ("[run]\nname = 'a'\n[model]\nfamily = 'llama'\n[model.config]\nx = " + _HUGE_HEX,
         r"\[model.config\] cannot be written as JSON: Exceeds the limit"),
        ("[run]\nname = 'a'\n[training]\ninner_lr = " + _HUGE_HEX, "training.inner_lr: <int too large to print> is not a valid float"),
        ("[run]\nname = 'a'\n[training]\ninner_steps = " + _HUGE_HEX, "training.inner_steps: <int too large to print> is not a valid int"),
        ("[run]\nname = " + _HUGE_HEX, "run.name <int too large to print> must be"),
        ("[run]\nname = 'a'\n" + "a" + ".b" * 40_000 + " = 1", "too many '.' on single lines"),
    ],
)
def test_toml_python_cannot_hold_is_a_one_line_config_error(text, match):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=match) as caught:
        RunConfig.from_toml(text)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert time.monotonic() - started < 5  # the dotted key took tomllib 37 s


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_toml("[run]\nname = 'a'\n[training]\ninner_lr = '" + "x" * 5000 + "'")
    assert str(caught.value) == "training.inner_lr: '" + "x" * 76 + "... is not a valid float"


def test_config_errors_are_input_errors():
    assert issubclass(ConfigError, InputError)


# ---------------------------------------------------------------------------------------
# Manifest: wire form, run id, signature
# ---------------------------------------------------------------------------------------

RUN_ID_KAT = "293e781ed2be7c2a"
SIGNATURE_KAT = "a4510d95cd20c13352781fee4ad5f04e3b5d6865e5b719353f153a3dc5592470094e0af269fc1662604835be84e1bd77acdc8e313e67cb3f7fdd8acdc7a44803"


def test_manifest_known_answers():
    manifest = manifest_of(RunConfig(name="demo"))
    wire = manifest.to_wire()
    assert set(wire) == {"version", "name", "coordinator_key", "genesis_root", "created_at", *SECTIONS}
    assert wire["training"]["inner_betas"] == [0.9, 0.95]
    assert manifest.run_id == hashlib.sha256(canonical_bytes(wire)).hexdigest()[:16]
    assert manifest.run_id == RUN_ID_KAT
    assert manifest.sign(COORDINATOR).signature == SIGNATURE_KAT


def test_signed_manifest_verifies_and_round_trips():
    signed = manifest_of(RunConfig(name="demo")).sign(COORDINATOR)
    assert signed.verify() == signed.manifest
    assert signed.verify(COORDINATOR.public_key_hex) == signed.manifest
    again = SignedManifest.from_bytes(signed.to_bytes())
    assert again == signed
    again.verify(COORDINATOR.public_key_hex)


def test_only_the_coordinator_key_may_sign():
    with pytest.raises(InputError, match="not the manifest's coordinator key"):
        manifest_of(RunConfig(name="demo")).sign(STRANGER)


def test_flipped_signature_byte_is_a_signature_error():
    signed = manifest_of(RunConfig(name="demo")).sign(COORDINATOR)
    raw = bytes.fromhex(signed.signature)
    for index in (0, 31, 63):
        flipped = bytearray(raw)
        flipped[index] ^= 0x80
        with pytest.raises(SignatureError, match="manifest"):
            dataclasses.replace(signed, signature=flipped.hex()).verify()


@pytest.mark.parametrize("signature", ["", "zz" * 64, "AB" * 64, "ab" * 63])
def test_malformed_manifest_signature_is_a_signature_error(signature):
    signed = manifest_of(RunConfig(name="demo")).sign(COORDINATOR)
    again = SignedManifest.from_wire({"manifest": signed.manifest.to_wire(), "signature": signature})
    with pytest.raises(SignatureError):
        again.verify()


def _edits() -> list[tuple[tuple[str, ...], object]]:
    edits: list[tuple[tuple[str, ...], object]] = [
        (("name",), "other"),
        (("genesis_root",), "00" * 32),
        (("created_at",), 1700000001.0),
    ]
    for section, values in ALTERNATIVE.items():
        # a cosine schedule alone (total_steps 0) is refused before signing; total_steps stands for it
        edits.extend(((section, key), value) for key, value in values.items() if key != "lr_schedule")
    return edits


@pytest.mark.parametrize(("path", "value"), _edits(), ids=lambda x: ".".join(x) if isinstance(x, tuple) else None)
def test_any_edited_field_breaks_the_signature_and_the_run_id(path, value):
    signed = manifest_of(RunConfig(name="demo")).sign(COORDINATOR)
    wire = signed.to_wire()
    target = wire["manifest"]
    for step in path[:-1]:
        target = target[step]
    assert target[path[-1]] != value
    target[path[-1]] = value
    edited = SignedManifest.from_bytes(canonical_bytes(wire))
    assert edited.manifest.run_id != signed.manifest.run_id
    with pytest.raises(SignatureError, match="manifest: signature does not verify"):
        edited.verify(COORDINATOR.public_key_hex)


def test_wrong_expected_key_is_a_signature_error():
    signed = manifest_of(RunConfig(name="demo")).sign(COORDINATOR)
    with pytest.raises(SignatureError, match=f"signed by key {key_id(COORDINATOR.public_key_hex)}"):
        signed.verify(STRANGER.public_key_hex)


def test_manifest_re_signed_by_a_stranger_fails_against_the_pinned_key():
    stranger_manifest = manifest_of(RunConfig(name="demo"), coordinator_key=STRANGER.public_key_hex)
    forged = stranger_manifest.sign(STRANGER)
    forged.verify()  # valid on its own terms ...
    with pytest.raises(SignatureError):
        forged.verify(COORDINATOR.public_key_hex)  # ... but not by the key a peer trusts
    # Swapping in the real key without the real signature does not verify either.
    swapped = SignedManifest(manifest=manifest_of(RunConfig(name="demo")), signature=forged.signature)
    with pytest.raises(SignatureError):
        swapped.verify(COORDINATOR.public_key_hex)


def test_float_field_built_from_an_int_signs_as_float64():
    config = RunConfig(name="x", training=TrainingConfig(inner_lr=1, inner_betas=(0, 0)), averaging=AveragingConfig())
    signed = manifest_of(config, created_at=1700000000).sign(COORDINATOR)
    again = SignedManifest.from_bytes(signed.to_bytes())
    again.verify(COORDINATOR.public_key_hex)
    assert again.manifest.run_id == signed.manifest.run_id


# ---------------------------------------------------------------------------------------
# Manifest: malformed wire input
# ---------------------------------------------------------------------------------------


def _wire() -> dict:
    return manifest_of(RunConfig(name="demo")).to_wire()


def _malformed(wire) -> MalformedRecord:
    with pytest.raises(MalformedRecord) as caught:
        RunManifest.from_wire(wire)
    return caught.value


@pytest.mark.parametrize("version", [0, 2, True, 1.0, "1", None])
def test_wrong_manifest_version_is_malformed(version):
    wire = _wire()
    wire["version"] = version
    assert "version" in str(_malformed(wire))


def test_missing_or_extra_top_level_field_is_malformed():
    for field in _wire():
        wire = _wire()
        del wire[field]
        assert repr(field) in str(_malformed(wire))
    wire = _wire()
    wire["extra"] = 1
    assert "'extra'" in str(_malformed(wire))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", 3, "'name'"),
        ("name", "bad name", "run.name"),
        ("coordinator_key", "ab" * 31, "coordinator_key"),
        ("coordinator_key", 5, "'coordinator_key'"),
        ("genesis_root", "XY" * 32, "genesis_root"),
        ("created_at", "now", "'created_at'"),
        ("created_at", True, "'created_at'"),
        ("created_at", float("nan"), "'created_at'"),
        ("created_at", float("inf"), "'created_at'"),
        ("model", [1], "model must be a table"),
    ],
)
def test_bad_top_level_values_are_malformed(field, value, match):
    wire = _wire()
    wire[field] = value
    assert match in str(_malformed(wire))


@pytest.mark.parametrize("section", SECTIONS)
def test_sections_on_the_wire_must_be_complete_and_exact(section):
    for key in _wire()[section]:
        wire = _wire()
        del wire[section][key]
        assert f"{section}: missing key {key!r}" in str(_malformed(wire))
    wire = _wire()
    wire[section]["surprise"] = 1
    assert f"{section}: unknown key 'surprise'" in str(_malformed(wire))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("model", "n_layer"), True),
        (("training", "inner_lr"), "0.1"),
        (("training", "inner_lr"), float("nan")),
        (("training", "nesterov"), 0),
        (("averaging", "codec"), "int8"),
        (("model", "n_head"), 3),
        (("data", "seq_len"), 2**64),
    ],
)
def test_bad_section_values_on_the_wire_are_malformed(path, value):
    wire = _wire()
    wire[path[0]][path[1]] = value
    assert ".".join(path) in str(_malformed(wire))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x80",
        msgpack.packb({"manifest": {}, "signature": "00"}),
        msgpack.packb({"manifest": 1, "signature": "00"}),
        msgpack.packb({"manifest": {}, "signature": 5}),
        msgpack.packb({"signature": "00"}),
        msgpack.packb([1, 2]),
    ],
)
def test_malformed_signed_manifest_bytes(raw):
    with pytest.raises(MalformedRecord):
        SignedManifest.from_bytes(raw)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=512))
def test_random_bytes_are_never_a_bare_exception(raw):
    try:
        SignedManifest.from_bytes(raw)
    except MalformedRecord:
        pass


def test_manifest_constructor_refuses_bad_fields():
    with pytest.raises(MalformedRecord, match="version"):
        manifest_of(RunConfig(name="x"), version=2)
    with pytest.raises(MalformedRecord, match="coordinator_key"):
        manifest_of(RunConfig(name="x"), coordinator_key="nope")
    with pytest.raises(MalformedRecord, match="genesis_root"):
        manifest_of(RunConfig(name="x"), genesis_root="nope")


# ---------------------------------------------------------------------------------------
# Round trips (hypothesis)
# ---------------------------------------------------------------------------------------

positive = st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=0.999999, allow_nan=False)


@st.composite
def run_configs(draw) -> RunConfig:
    n_head = draw(st.integers(1, 16))
    seq_len = draw(st.integers(8, 2048))
    model = ModelConfig(
        vocab_size=draw(st.integers(256, 100_000)),
        n_positions=draw(st.integers(seq_len, 4096)),
        n_embd=n_head * draw(st.integers(1, 64)),
        n_layer=draw(st.integers(1, 64)),
        n_head=n_head,
        init_seed=draw(st.integers(0, 2**63 - 1)),
    )
    data = DataSpec(
        seq_len=seq_len,
        heldout_percent=draw(st.integers(1, 49)),
        eval_windows=draw(st.integers(1, 10_000)),
        seed=draw(st.integers(-(2**63), 2**63 - 1)),
    )
    training = TrainingConfig(
        inner_steps=draw(st.integers(1, 1000)),
        batch_size=draw(st.integers(1, 1024)),
        inner_lr=draw(positive),
        inner_weight_decay=draw(st.floats(0.0, 10.0)),
        inner_betas=(draw(unit), draw(unit)),
        grad_clip=draw(st.floats(0.0, 100.0)),
        outer_lr=draw(positive),
        outer_momentum=draw(unit),
        nesterov=draw(st.booleans()),
    )
    round_seconds = draw(st.floats(0.1, 86400.0))
    averaging = AveragingConfig(
        codec=draw(st.sampled_from(["fp16", "int8-b256", "topk-c4096-k64-q2", "topk-c1024-k8-q4"])),
        overlap=draw(st.booleans()),
        round_seconds=round_seconds,
        settle_seconds=draw(st.floats(0.01, round_seconds / 2)),
        max_contributors=draw(st.integers(1, 1024)),
        round_deadline_seconds=draw(st.floats(0.01, 1000.0)),
    )
    name = draw(st.text(alphabet="abcXYZ019-_", min_size=1, max_size=64))
    return RunConfig(
        name=name,
        model=model,
        data=data,
        training=training,
        averaging=averaging,
        checkpoints=CheckpointConfig(every_rounds=draw(st.integers(1, 1000))),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=run_configs(), created_at=st.floats(0, 4e9), genesis=st.binary(min_size=32, max_size=32))
def test_manifest_round_trips_through_wire_and_bytes(config, created_at, genesis):
    manifest = manifest_of(config, created_at=created_at, genesis_root=genesis.hex())
    again = RunManifest.from_wire(manifest.to_wire())
    assert again == manifest
    assert again.run_id == manifest.run_id
    signed = manifest.sign(COORDINATOR)
    decoded = SignedManifest.from_bytes(signed.to_bytes())
    assert decoded == signed
    decoded.verify(COORDINATOR.public_key_hex)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=run_configs())
def test_config_round_trips_through_toml(config):
    sections = {name: dataclasses.asdict(getattr(config, name)) for name in SECTIONS}
    assert RunConfig.from_toml(to_toml(config.name, sections)) == config


def test_the_inner_learning_rate_follows_warmup_then_cosine():
    training = TrainingConfig(inner_lr=1.0, lr_schedule="cosine", warmup_steps=4, total_steps=104, min_lr_ratio=0.1)
    assert [training.inner_lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert training.inner_lr_at(4) == 1.0
    assert training.inner_lr_at(54) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert training.inner_lr_at(104) == pytest.approx(0.1) and training.inner_lr_at(10**6) == pytest.approx(0.1)
    constant = TrainingConfig(inner_lr=0.5, warmup_steps=2)
    assert [constant.inner_lr_at(s) for s in (0, 1, 2, 10**6)] == [0.25, 0.5, 0.5, 0.5]


def test_to_toml_writes_every_key_and_reads_back_equal():
    config = RunConfig.from_toml(to_toml("full-run_2", ALTERNATIVE))
    text = config.to_toml()
    assert RunConfig.from_toml(text) == config
    for values in ALTERNATIVE.values():
        for key in values:
            assert f"\n{key} = " in text

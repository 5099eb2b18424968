"""The run manifest: everything that defines a run, signed by the coordinator (Ed25519).

A run config (TOML) gives the sections below; the coordinator adds its public key and the
genesis checkpoint root, signs the canonical msgpack encoding, and every peer verifies it.
The run id is the first 16 hex digits of sha256 over the unsigned manifest's canonical bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from protocol.codecs import parse_codec
from protocol.errors import ConfigError, InputError, MalformedRecord, SignatureError
from protocol.signing import SigningKey, key_id, verify_signature
from protocol.wire import PROTOCOL_VERSION, canonical_bytes, decode_map, is_hex, is_wire_int

__all__ = [
    "SHA256_PREFIX",
    "INLINE_PREFIX",
    "is_blob_ref",
    "blob_digest",
    "ModelConfig",
    "DataSpec",
    "TrainingConfig",
    "AveragingConfig",
    "CheckpointConfig",
    "AccessConfig",
    "ChecksConfig",
    "RunConfig",
    "RunManifest",
    "SignedManifest",
]


_MODEL_MAX = {"vocab_size": 1 << 32, "n_positions": 1 << 20, "n_embd": 1 << 16, "n_layer": 1024, "n_head": 1024}
"""Upper bounds of the GPT-2 numbers (and of the training and data sizes below): a signed manifest
cannot ask a peer to count, build or loop over more than these."""
_MAX_PARAMETERS = 1 << 40
"""A peer refuses far fewer, by its memory (``peer.model.check_memory``); this bounds the arithmetic."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


INLINE_PREFIX = "json:"
"""RUN.toml's inline ``[model.config]`` table, as canonical JSON text, before launch resolves it."""
SHA256_PREFIX = "sha256:"
"""How the signed manifest names a file the coordinator serves content-addressed (``/blobs/<hex>``)."""


def is_blob_ref(value: object) -> bool:
    """True for ``sha256:<64 lowercase hex digits>``."""
    return isinstance(value, str) and value.startswith(SHA256_PREFIX) and is_hex(value[len(SHA256_PREFIX):], 64)


def blob_digest(value: str) -> str:
    """The hex digest of a ``sha256:<hex>`` reference."""
    return value[len(SHA256_PREFIX):]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: a decoder-only causal LM that ``transformers`` builds from a config.

    Either ``config`` names a transformers config (RUN.toml: a path to ``config.json``, or an
    inline ``[model.config]`` table; the signed manifest: ``sha256:<hex>`` of its canonical JSON),
    or it is empty and the five GPT-2 numbers below describe a byte-level GPT-2 (the demo).
    """

    family: str = "gpt2"
    """The transformers ``model_type`` (llama, qwen2, mistral, gpt2, ...); must equal the config's."""
    config: str = ""
    """A transformers config: a path relative to RUN.toml's folder (RUN.toml), or ``sha256:<hex>``
    (the manifest a coordinator launches); ``json:<canonical JSON>`` is the config inline (RUN.toml's
    ``[model.config]`` table, and benchmarks' in-process runs); empty for the built-in GPT-2 of
    the five numbers below."""
    init: str = ""
    """Optional starting weights (safetensors, names as ``named_parameters``): a path (RUN.toml), or
    ``sha256:<hex>`` (the manifest); empty to initialise from ``init_seed``."""
    parameters: int = 0
    """Trainable parameters (tied tensors once); the coordinator fills it in at launch, so a peer
    can tell whether it can hold the model before downloading anything."""
    vocab_size: int = 256
    """GPT-2 without ``config``: vocabulary size; 256 is the byte-level vocabulary."""
    n_positions: int = 128
    """GPT-2 without ``config``: longest context in tokens; must be at least ``data.seq_len``."""
    n_embd: int = 128
    """GPT-2 without ``config``: hidden width."""
    n_layer: int = 2
    """GPT-2 without ``config``: number of transformer blocks."""
    n_head: int = 4
    """GPT-2 without ``config``: attention heads; must divide ``n_embd``."""
    init_seed: int = 0
    """Seed of the genesis initialisation (the genesis root depends on it)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.family, str) and self.family.replace("_", "").isalnum() and self.family.islower(),
                 f"model.family {self.family!r} must be a transformers model_type (lowercase letters, digits, '_')")
        if not self.config:
            _require(self.family == "gpt2", f"model.family {self.family!r} needs model.config (a transformers config)")
        _require(not self.init or bool(self.config), "model.init needs model.config")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive")
            _require(getattr(self, name) <= _MODEL_MAX[name], f"model.{name} must be at most {_MODEL_MAX[name]}")
        _require(self.n_embd % self.n_head == 0, "model.n_head must divide model.n_embd")
        _require(self.vocab_size >= 256, "model.vocab_size must be at least 256 (byte-level data)")
        _require(self.init_seed >= 0, "model.init_seed must be non-negative")
        _require(self.parameters >= 0, "model.parameters must be non-negative")
        _require(self.parameters <= _MAX_PARAMETERS, "model.parameters must be at most 2**40")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where training and held-out tokens come from.

    ``python-stdlib``: the standard library's ``.py`` files as bytes (the demo; every machine has
    them). ``files``: the coordinator's own text files, tokenized at launch into content-addressed
    token shards listed by a signed data index (``protocol.data_index``) that peers download.
    """

    corpus: Literal["python-stdlib", "files"] = "python-stdlib"
    """``python-stdlib``, or ``files`` (the default when ``files`` is given)."""
    files: tuple[str, ...] = ()
    """``files``: globs of local ``.txt``, ``.jsonl`` or ``.parquet`` files, relative to RUN.toml's folder."""
    text_field: str = "text"
    """The text column of ``.jsonl`` and ``.parquet`` files."""
    tokenizer: str = "bytes"
    """``bytes`` (one token per byte), or a Hugging Face ``tokenizers`` file: a path (RUN.toml) or
    ``sha256:<hex>`` (the manifest)."""
    index: str = ""
    """``files``: ``sha256:<hex>`` of the signed data index; the coordinator fills it in at launch."""
    shard_tokens: int = 1 << 20
    """``files``: tokens per shard (the last shard of each split may be shorter)."""
    seq_len: int = 128
    """Tokens per training window."""
    heldout_percent: int = 5
    """Share of files (``python-stdlib``) or documents (``files``), chosen by a hash of their path
    or text, kept out of training for evaluation."""
    eval_windows: int = 64
    """Held-out windows scored for each checkpoint's held-out loss."""
    seed: int = 0
    """Seed that, with a peer's id and round, fixes which windows that peer trains on."""

    def __post_init__(self) -> None:
        _require(self.corpus in ("python-stdlib", "files"), f"data.corpus must be 'python-stdlib' or 'files', not {self.corpus!r}")
        if self.corpus == "files":
            _require(len(self.files) > 0, "data.files must list at least one file or glob for corpus 'files'")
        else:
            _require(not self.files, "data.files needs data.corpus = 'files'")
            _require(self.tokenizer == "bytes", "data.tokenizer needs data.corpus = 'files' (the stdlib corpus is bytes)")
            _require(not self.index, "data.index needs data.corpus = 'files'")
        _require(all(isinstance(f, str) and f for f in self.files), "data.files must be non-empty strings")
        _require(bool(self.text_field), "data.text_field must not be empty")
        _require(bool(self.tokenizer), "data.tokenizer must be 'bytes' or a tokenizer file")
        _require(self.shard_tokens >= 1024, "data.shard_tokens must be at least 1024")
        _require(self.shard_tokens <= 1 << 28, "data.shard_tokens must be at most 2**28")  # the data index's cap
        _require(self.seq_len >= 8, "data.seq_len must be at least 8")
        _require(self.seq_len <= 1 << 20, "data.seq_len must be at most 2**20")
        _require(self.shard_tokens > self.seq_len + 1, "data.shard_tokens must exceed data.seq_len + 1")
        _require(0 < self.heldout_percent < 50, "data.heldout_percent must be between 1 and 49")
        _require(self.eval_windows > 0, "data.eval_windows must be positive")
        _require(self.eval_windows <= 1 << 20, "data.eval_windows must be at most 2**20")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Inner (local AdamW) and outer (averaged Nesterov SGD) optimisation."""

    inner_steps: int = 15
    """H: local AdamW steps between two averaging rounds."""
    batch_size: int = 16
    """Windows per inner step on each peer."""
    inner_lr: float = 3e-3
    """AdamW learning rate."""
    inner_weight_decay: float = 0.01
    """AdamW weight decay."""
    inner_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clip for inner steps (0 disables)."""
    outer_lr: float = 1.0
    """Learning rate of the outer step on the averaged outer gradient."""
    outer_momentum: float = 0.0
    """Momentum of the outer step (0: plain outer SGD)."""
    nesterov: bool = False
    """Nesterov momentum for the outer step."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Inner learning rate over the run: ``constant``, or ``cosine`` (linear warmup over
    ``warmup_steps``, then a cosine from ``inner_lr`` down to ``min_lr_ratio × inner_lr`` at
    ``total_steps``, and flat after it). Steps count a peer's inner steps since the run began:
    round × ``inner_steps`` + step, so every peer of a round uses the same rates."""
    warmup_steps: int = 0
    """Inner steps of linear warmup at the start of the run (0: none)."""
    total_steps: int = 0
    """Cosine: the inner step at which the rate reaches its floor (the planned run length in
    inner steps); must exceed ``warmup_steps``. Unused with ``constant``."""
    min_lr_ratio: float = 0.1
    """Cosine: the floor, as a fraction of ``inner_lr``."""

    def __post_init__(self) -> None:
        _require(self.inner_steps > 0, "training.inner_steps must be positive")
        _require(self.inner_steps <= 1 << 20, "training.inner_steps must be at most 2**20")
        _require(self.batch_size > 0, "training.batch_size must be positive")
        _require(self.batch_size <= 1 << 16, "training.batch_size must be at most 2**16")
        _require(self.inner_lr > 0, "training.inner_lr must be positive")
        _require(self.inner_weight_decay >= 0, "training.inner_weight_decay must be non-negative")
        _require(all(0 <= b < 1 for b in self.inner_betas), "training.inner_betas must lie in [0, 1)")
        _require(self.grad_clip >= 0, "training.grad_clip must be non-negative")
        _require(self.outer_lr > 0, "training.outer_lr must be positive")
        _require(0 <= self.outer_momentum < 1, "training.outer_momentum must lie in [0, 1)")
        _require(self.lr_schedule in ("constant", "cosine"), "training.lr_schedule must be 'constant' or 'cosine'")
        _require(self.warmup_steps >= 0, "training.warmup_steps must be non-negative")
        _require(0 <= self.min_lr_ratio <= 1, "training.min_lr_ratio must lie in [0, 1]")
        if self.lr_schedule == "cosine":
            _require(self.total_steps > self.warmup_steps, "training.total_steps must exceed training.warmup_steps")
        else:
            _require(self.total_steps >= 0, "training.total_steps must be non-negative")

    def inner_lr_at(self, step: int) -> float:
        """The inner learning rate at inner step ``step`` of the run (round × H + step in round)."""
        if step < self.warmup_steps:
            return self.inner_lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.inner_lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        floor = self.min_lr_ratio * self.inner_lr
        return floor + (self.inner_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True)
class AveragingConfig:
    """How rounds run, and how outer gradients are compressed, exchanged and combined in them."""

    codec: str = "bmax-c4096-b64-s2"
    """Wire codec of each peer's outer gradient (``protocol.codecs``): ``fp16``, ``int8-b<B>``,
    ``topk-c<C>-k<K>-{q<Q>,s2,f32}`` or ``bmax-c<C>-b<B>-s2``; what the codec drops is carried to
    the next round (error feedback)."""
    error_feedback_decay: float = 0.95
    """β of error feedback: a peer compresses ``β × residual + Δ`` and keeps what the codec
    dropped as its new residual. 1.0 is plain error feedback; below 1 the residual decays, and
    acts as the outer momentum (SparseLoCo)."""
    aggregation: Literal["mean", "senders"] = "senders"
    """How a round's payloads are combined, per coordinate: ``mean`` divides the weighted sum
    by the weights of every member; ``senders`` by the weights of the members whose payload
    kept that coordinate (the same for dense codecs)."""
    overlap: bool = True
    """Asynchronous rounds: start the next round's inner steps at once and apply this round's
    update as soon as it arrives (``peer.trainer.Trainer.advance``, in flight); False waits for it before the
    next round's first step (docs/benchmarks.md compares the two)."""
    round_seconds: float = 8.0
    """W: a round is this window of wall-clock time, counted from the manifest's ``created_at``;
    each peer takes the inner steps that fit its speed (at most ``training.inner_steps``)."""
    settle_seconds: float = 1.5
    """S: a round's announcements are read this long after its close (the DHT's store latency
    plus clock skew: raise it for peers across the Internet)."""
    max_contributors: int = 16
    """G: at most this many contributions enter one round (every peer downloads all of them);
    the others wait in their senders' residuals for a later round."""
    round_deadline_seconds: float = 30.0
    """How long a peer tries to fetch a round's payloads; past it the peer is out of step and
    replays (or reloads) the rounds it missed."""

    def __post_init__(self) -> None:
        try:
            parse_codec(self.codec)
        except ConfigError as error:
            raise ConfigError(f"averaging.codec: {error}") from None
        _require(0 <= self.error_feedback_decay <= 1, "averaging.error_feedback_decay must lie in [0, 1]")
        _require(self.aggregation in ("mean", "senders"), "averaging.aggregation must be 'mean' or 'senders'")
        _require(0 < self.round_seconds <= 86400, "averaging.round_seconds must lie in (0, 86400]")
        _require(0 < self.settle_seconds <= self.round_seconds / 2,
                 "averaging.settle_seconds must be positive and at most half of averaging.round_seconds")
        _require(1 <= self.max_contributors <= 1024, "averaging.max_contributors must lie in [1, 1024]")
        _require(self.round_deadline_seconds > 0, "averaging.round_deadline_seconds must be positive")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When the coordinator records checkpoints."""

    every_rounds: int = 5
    """K: record a checkpoint every K rounds of the swarm."""

    def __post_init__(self) -> None:
        _require(self.every_rounds > 0, "checkpoints.every_rounds must be positive")


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """Who may take part: anyone (``public``), or only volunteers the coordinator admitted
    (``private``: each holds a join token the coordinator signed for its key, checked on every DHT
    store and every averaging and state request; ``barnraise-coordinator admit KEY``)."""

    mode: Literal["public", "private"] = "public"


@dataclass(frozen=True, kw_only=True)
class ChecksConfig:
    """Spot checks of the volunteers' work (docs/protocol.md §10.6). The coordinator draws each
    member of a replayed round with probability 1 / ``spot_check_every`` and replays its round from
    the consensus and that peer's own evidence (its inner AdamW state and residual at the round's
    start), on that peer's windows, and compares the payload it would have sent with the one it
    sent. A peer whose payload does not match, or that does not serve its evidence, loses that
    round's credit, and the next ledger entry says so. 0: no spot checks. Needs synchronous rounds
    (``averaging.overlap = false``): an overlapped round's start depends on the landing of the
    round before, which the evidence does not hold."""

    spot_check_every: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.spot_check_every, int) and 0 <= self.spot_check_every <= 1_000_000,
                 "checks.spot_check_every must lie in [0, 1000000] (0: no spot checks)")


_TOML_DOT_BUDGET = 10_000_000
"""Most sum over RUN.toml's lines of (the '.' on the line) squared. tomllib reads a dotted key in
time quadratic in its parts (40,000 parts: half a minute); this allows a line of 3,000 floats."""

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataSpec,
    "training": TrainingConfig,
    "averaging": AveragingConfig,
    "checkpoints": CheckpointConfig,
}


_OPTIONAL_SECTIONS: dict[str, type] = {"access": AccessConfig, "checks": ChecksConfig}
"""Sections a manifest carries only when they differ from their defaults, so that the manifests
(and run ids) of runs that do not use them stay what they were. Written explicitly at their
default, they are refused: one config, one encoding."""


def _value_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, (list, tuple)) and len(value) <= 4096 and all(_value_ok(v, args[0]) for v in value)
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(
            _value_ok(v, a) for v, a in zip(value, args, strict=True)
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_wire_int(value)
    if hint is float:
        try:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False
    return isinstance(value, hint)


def _shown(value: Any) -> str:
    """``repr`` for a one-line message: at most 80 characters, and never an error (``repr`` of an
    int past 4300 digits raises ValueError, of a deeply nested list RecursionError)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(value: Any, hint: Any) -> Any:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    return float(value) if hint is float else value


def _section(cls: type, mapping: Any, what: str, *, complete: bool) -> Any:
    """Build a config section from a mapping, naming the first bad key; ``complete`` for wire."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{what} must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in mapping:
        if key not in hints:
            raise ConfigError(f"{what}: unknown key {key!r} (known: {', '.join(names)})")
    if complete and (missing := [n for n in names if n not in mapping]):
        raise ConfigError(f"{what}: missing key {missing[0]!r}")
    values = {}
    for key, value in mapping.items():
        if not _value_ok(value, hints[key]):
            raise ConfigError(f"{what}.{key}: {_shown(value)} is not a valid {_hint_name(hints[key])}")
        values[key] = _coerce(value, hints[key])
    return cls(**values)


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "choice among " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _section_wire(section: Any) -> dict[str, Any]:
    # Coerce as from_wire does, so a float field built from an int signs as float64.
    hints = typing.get_type_hints(type(section))
    values = {k: _coerce(v, hints[k]) for k, v in dataclasses.asdict(section).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What a coordinator writes in RUN.toml: a name, the five sections, and ``[access]`` and ``[checks]``."""

    name: str
    """Human-readable run name (letters, digits, ``-`` and ``_``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    def __post_init__(self) -> None:
        ok = isinstance(self.name, str) and 0 < len(self.name) <= 64
        ok = ok and all(c.isalnum() or c in "-_" for c in self.name)
        _require(ok, f"run.name {_shown(self.name)} must be 1-64 letters, digits, '-' or '_'")
        if not self.model.config:
            _require(self.model.n_positions >= self.data.seq_len, "model.n_positions must be at least data.seq_len")
        _require(not (self.checks.spot_check_every and self.averaging.overlap),
                 "checks.spot_check_every needs averaging.overlap = false (an overlapped round cannot be replayed)")

    @classmethod
    def from_toml(cls, text: str) -> RunConfig:
        """Parse RUN.toml text: ``[run] name``, then optional sections with defaults."""
        if sum(line.count(".") ** 2 for line in text.splitlines()) > _TOML_DOT_BUDGET:
            raise ConfigError("RUN.toml has too many '.' on single lines (a dotted key thousands of parts long?)")
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"malformed TOML: {error}") from None
        except ValueError as error:  # int()'s limit: an integer of more than 4300 digits
            raise ConfigError(f"malformed TOML: {str(error).split(';')[0]}") from None
        except RecursionError:
            raise ConfigError("malformed TOML: arrays or inline tables nested too deeply") from None
        known = {**_SECTIONS, **_OPTIONAL_SECTIONS}
        for key in doc:
            if key != "run" and key not in known:
                raise ConfigError(f"unknown table [{key}] (known: run, {', '.join(known)})")
        run = doc.get("run")
        if not isinstance(run, dict) or set(run) != {"name"}:
            raise ConfigError("[run] must hold exactly one key: name")
        tables = {name: dict(doc.get(name, {})) if isinstance(doc.get(name, {}), dict) else doc[name] for name in known}
        model, data = tables["model"], tables["data"]
        if isinstance(model, dict) and isinstance(model.get("config"), dict):  # the config's keys inline
            try:
                model["config"] = INLINE_PREFIX + json.dumps(model["config"], sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError, RecursionError) as error:  # a date or time, an int past 4300 digits
                raise ConfigError(f"[model.config] cannot be written as JSON: {str(error).split(';')[0]}") from None
        if isinstance(data, dict) and data.get("files") and "corpus" not in data:
            data["corpus"] = "files"
        sections = {name: _section(cls_, tables[name], name, complete=False) for name, cls_ in known.items()}
        return cls(name=run["name"], **sections)

    def to_toml(self) -> str:
        """RUN.toml text with every key written out; ``from_toml`` reads back an equal config."""
        lines = ["[run]", f"name = {json.dumps(self.name)}"]
        for name in (*_SECTIONS, *_OPTIONAL_SECTIONS):
            lines += ["", f"[{name}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in _section_wire(getattr(self, name)).items()]
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a TOML basic string
    return repr(value)  # ints, and finite floats (repr round-trips; TOML reads 1e-05 and 0.7)


@dataclass(frozen=True, kw_only=True)
class RunManifest:
    """A run config plus what the coordinator adds at launch; this is what gets signed."""

    version: int = PROTOCOL_VERSION
    config: RunConfig
    coordinator_key: str
    """The coordinator's Ed25519 public key (hex); it signs the manifest and the ledger."""
    genesis_root: str
    """Canonical root of the genesis checkpoint (a peer rebuilding genesis checks against it)."""
    created_at: float

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise MalformedRecord(f"manifest: protocol version {self.version} is not {PROTOCOL_VERSION}")
        if not is_hex(self.coordinator_key, 64):
            raise MalformedRecord("manifest: coordinator_key must be 64 hex digits")
        if not is_hex(self.genesis_root, 64):
            raise MalformedRecord("manifest: genesis_root must be 64 hex digits")
        model, data = self.config.model, self.config.data
        for name, value, allowed in (("model.init", model.init, ""), ("data.tokenizer", data.tokenizer, "bytes"),
                                     ("data.index", data.index, "")):
            if value != allowed and not is_blob_ref(value):
                raise MalformedRecord(f"manifest: {name} must be {allowed!r} or sha256:<64 hex digits>, not {value!r}")
        if model.config and not (is_blob_ref(model.config) or model.config.startswith(INLINE_PREFIX)):
            raise MalformedRecord(f"manifest: model.config must be '', sha256:<64 hex digits> or json:<config>, "
                                  f"not {model.config[:80]!r}")
        if data.corpus == "files" and not data.index:
            raise MalformedRecord("manifest: data.index must name the signed data index for corpus 'files'")
        if is_blob_ref(model.config) and model.parameters <= 0:
            raise MalformedRecord("manifest: model.parameters must be positive for a model.config file")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "name": self.config.name,
            "coordinator_key": self.coordinator_key,
            "genesis_root": self.genesis_root,
            "created_at": float(self.created_at),
        }
        for name in _SECTIONS:
            out[name] = _section_wire(getattr(self.config, name))
        for name, cls in _OPTIONAL_SECTIONS.items():
            if getattr(self.config, name) != cls():
                out[name] = _section_wire(getattr(self.config, name))
        return out

    @classmethod
    def from_wire(cls, mapping: Any) -> RunManifest:
        if not isinstance(mapping, dict):
            raise MalformedRecord("manifest: expected a map")
        optional = {n for n in _OPTIONAL_SECTIONS if n in mapping}
        expected = {"version", "name", "coordinator_key", "genesis_root", "created_at", *_SECTIONS, *optional}
        if set(mapping) != expected:
            odd = sorted(set(mapping) ^ expected)[0]
            raise MalformedRecord(f"manifest: missing or unknown field {odd!r}")
        if not is_wire_int(mapping["version"]) or mapping["version"] != PROTOCOL_VERSION:
            raise MalformedRecord(f"manifest: protocol version {mapping['version']!r} is not {PROTOCOL_VERSION}")
        for key, kind in (("name", str), ("coordinator_key", str), ("genesis_root", str)):
            if not isinstance(mapping[key], kind):
                raise MalformedRecord(f"manifest: field {key!r} must be a {kind.__name__}")
        if not _value_ok(mapping["created_at"], float):
            raise MalformedRecord("manifest: field 'created_at' must be a number")
        try:
            sections = {n: _section(c, mapping[n], n, complete=True) for n, c in _SECTIONS.items()}
            for name in optional:
                sections[name] = _section(_OPTIONAL_SECTIONS[name], mapping[name], name, complete=True)
                if sections[name] == _OPTIONAL_SECTIONS[name]():
                    raise ConfigError(f"{name} is written at its default (a manifest leaves it out)")
            config = RunConfig(name=mapping["name"], **sections)
        except ConfigError as error:
            raise MalformedRecord(f"manifest: {error}") from None
        return cls(
            config=config,
            coordinator_key=mapping["coordinator_key"],
            genesis_root=mapping["genesis_root"],
            created_at=float(mapping["created_at"]),
        )

    @property
    def run_id(self) -> str:
        return hashlib.sha256(canonical_bytes(self.to_wire())).hexdigest()[:16]

    def sign(self, key: SigningKey) -> SignedManifest:
        if key.public_key_hex != self.coordinator_key:
            raise InputError("the signing key is not the manifest's coordinator key")
        return SignedManifest(manifest=self, signature=key.sign(canonical_bytes(self.to_wire())))


@dataclass(frozen=True, kw_only=True)
class SignedManifest:
    """A manifest with the coordinator's signature; ``verify`` before trusting any field."""

    manifest: RunManifest
    signature: str

    def verify(self, expected_key: str | None = None) -> RunManifest:
        """Check the signature (and, if given, that it is by ``expected_key``); return the manifest."""
        key = self.manifest.coordinator_key
        if expected_key is not None and expected_key != key:
            raise SignatureError(f"manifest is signed by key {key_id(key)}, expected {key_id(expected_key)}")
        verify_signature(key, canonical_bytes(self.manifest.to_wire()), self.signature, what="manifest")
        return self.manifest

    def to_wire(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_wire(), "signature": self.signature}

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_wire())

    @classmethod
    def from_wire(cls, mapping: Any) -> SignedManifest:
        if not isinstance(mapping, dict) or set(mapping) != {"manifest", "signature"}:
            raise MalformedRecord("signed manifest: expected exactly the fields 'manifest' and 'signature'")
        if not isinstance(mapping["signature"], str):
            raise MalformedRecord("signed manifest: signature must be a hex string")
        return cls(manifest=RunManifest.from_wire(mapping["manifest"]), signature=mapping["signature"])

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedManifest:
        return cls.from_wire(decode_map(raw, what="signed manifest"))


"""The model: a decoder-only causal LM that transformers builds from the run's config.

A checkpoint holds the model's parameters by their transformers names (tied weights
once) plus the outer optimiser's momentum, so a run can resume from it exactly.

The run's transformers config is the JSON file the manifest names by sha256 (``model.config``),
or, without one, the byte-level GPT-2 of the manifest's five numbers (the demo). Only model
types transformers itself implements are built: a config that asks for remote code is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, PretrainedConfig, PreTrainedModel

from protocol.errors import ConfigError, HashMismatch, InputError, VerificationError
from protocol.manifest import INLINE_PREFIX, ModelConfig

__all__ = [
    "BYTES_PER_PARAMETER", "transformers_config", "build_model", "count_parameters", "check_memory",
    "available_memory", "parameters_by_name", "load_parameters", "heldout_loss", "batch_loss",
]

BYTES_PER_PARAMETER = {"cpu": 42, "cuda-host": 26, "cuda-device": 16}
"""What a peer holds per parameter. CPU: 41.6, measured as the slope of a running peer's memory
over two model sizes (docs/benchmarks.md §6, ``scripts/bench_peer_memory.py``): the model, its
gradient and AdamW's two moments (16), and float32 state on the CPU (the consensus θ_r and its
outer momentum, the round's start x_r, the state before the last round, the copy served to
joiners, the error-feedback residual). With ``--device cuda`` the first 16 move to the GPU
(activations come on top) and the rest stays in host memory: estimated from the CPU figure,
not measured (no GPU was lent)."""


def transformers_config(model: ModelConfig, config_json: bytes | None = None) -> PretrainedConfig:
    """The transformers config of the run's model: ``config_json`` (the file the manifest names), or
    the byte-level GPT-2 of the five numbers when the manifest names none. ``ConfigError`` names
    what is wrong with a config that is not a decoder-only causal LM transformers builds itself."""
    if not model.config:
        return GPT2Config(
            vocab_size=model.vocab_size,
            n_positions=model.n_positions,
            n_embd=model.n_embd,
            n_layer=model.n_layer,
            n_head=model.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=0,  # byte-level vocabulary: GPT-2's default ids (50256) do not exist here
            eos_token_id=0,
        )
    if config_json is None and model.config.startswith(INLINE_PREFIX):
        config_json = model.config[len(INLINE_PREFIX):].encode()
    if config_json is None:
        raise InputError("the run's model config file is needed to build its model")
    try:
        keys = json.loads(config_json)
    except ValueError as error:
        raise ConfigError(f"model config is not valid JSON ({error})") from None
    if not isinstance(keys, dict):
        raise ConfigError("model config must be a JSON object")
    if "auto_map" in keys or keys.get("trust_remote_code"):
        raise ConfigError("model config asks for remote code (auto_map); only transformers' own model types are built")
    model_type = keys.pop("model_type", model.family)
    if model_type != model.family:
        raise ConfigError(f"model config's model_type {model_type!r} is not model.family {model.family!r}")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                "attn_implementation", "_attn_implementation", "quantization_config"):
        keys.pop(key, None)  # every peer trains the same float32 weights with torch's own attention
    try:
        config = AutoConfig.for_model(model_type, **keys)
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"model config of family {model_type!r}: {' '.join(str(error).split())[:300]}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model family {model_type!r} is an encoder-decoder; a run trains a decoder-only causal LM")
    return config


def _instantiate(config: PretrainedConfig) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_config(config)  # float32: torch's default, no dtype in the config
    except ValueError as error:
        raise ConfigError(f"transformers has no causal LM for model family {config.model_type!r}: "
                          f"{str(error).splitlines()[0][:200]}") from None
    except (ImportError, TypeError) as error:
        raise ConfigError(f"transformers cannot build model family {config.model_type!r}: "
                          f"{' '.join(str(error).split())[:200]}") from None
    return model if all(p.dtype == torch.float32 for p in model.parameters()) else model.float()


def build_model(model: ModelConfig, config_json: bytes | None = None) -> PreTrainedModel:
    """The genesis model: same config and seed give bitwise the same parameters (on CPU)."""
    config = transformers_config(model, config_json)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.init_seed)
        built = _instantiate(config)
    return built


def count_parameters(model: ModelConfig, config_json: bytes | None = None, *, at_most: int | None = None) -> int:
    """Trainable parameters (tied tensors once), counted without allocating the model.

    With ``at_most`` (what the manifest states, and this peer's memory check allowed): a config
    that builds more is refused, ``VerificationError``. The count stops as soon as the parameters
    made so far pass a few times ``at_most`` (or the tensors ``_MAX_REGISTERED_TENSORS``), so a
    config of a million layers costs no more than one of ``at_most`` parameters."""
    config = transformers_config(model, config_json)
    with torch.device("meta"), _parameter_budget(at_most):
        built = _instantiate(config)
    count = sum(p.numel() for p in built.parameters())
    if at_most is not None and count > at_most:
        raise VerificationError(f"the run's model config builds {count:,} parameters, more than the {at_most:,} "
                                "its manifest states: refused")
    return count


_MAX_REGISTERED_TENSORS = 1 << 18
"""Parameter tensors registered while a model is built, tied weights' re-registrations included:
far more than any model a volunteer trains (a 70B llama has under 1,000)."""


@contextlib.contextmanager
def _parameter_budget(at_most: int | None) -> Iterator[None]:
    """Stop building a model, ``VerificationError``, once the parameters registered in this thread
    pass 4 × ``at_most`` + 2**20 values (tied weights are registered more than once while a model
    is built, so this is not the count, only a bound on the work) or ``_MAX_REGISTERED_TENSORS``
    tensors."""
    if at_most is None:
        yield
        return
    thread, made = threading.get_ident(), [0, 0]

    def count(_module: torch.nn.Module, _name: str, parameter: torch.nn.Parameter | None) -> None:
        if parameter is None or threading.get_ident() != thread:
            return
        made[0] += parameter.numel()
        made[1] += 1
        if made[0] > 4 * at_most + (1 << 20) or made[1] > _MAX_REGISTERED_TENSORS:
            raise VerificationError(f"the run's model config builds more than the {at_most:,} parameters its "
                                    "manifest states: refused")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()


def available_memory(device: str) -> int | None:
    """Bytes this peer can use on ``device``: MemAvailable (CPU) or the GPU's total; None if unknown."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_memory(parameters: int, device: str, max_memory: int | None = None) -> int:
    """The bytes a peer needs for ``parameters`` on ``device`` (on CUDA: in host memory, after the GPU
    is checked too); ``InputError`` with the estimate when that is more than ``max_memory``
    (default: what the machine has)."""
    checks = [("cpu", "cpu")] if not device.startswith("cuda") else [("cuda-device", device), ("cuda-host", "cpu")]
    needed = 0
    for kind, where in checks:
        per = BYTES_PER_PARAMETER[kind]
        needed = per * parameters
        limit = max_memory if max_memory is not None and where == "cpu" else available_memory(where)
        if limit is not None and needed > limit:
            named = "--max-memory" if max_memory is not None and where == "cpu" else f"available memory on {where}"
            raise InputError(f"this peer cannot hold the run's model: about {per} bytes per parameter × "
                             f"{parameters:,} parameters = {needed / 2**30:.2f} GiB, more than the "
                             f"{limit / 2**30:.2f} GiB of {named}")
    return needed


def parameters_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; tied tensors appear once (``named_parameters`` dedups)."""
    return dict(model.named_parameters())


@torch.no_grad()
def load_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters; the name sets and shapes must match."""
    own = parameters_by_name(model)
    if set(own) != set(tensors):
        odd = sorted(set(own) ^ set(tensors))[0]
        raise HashMismatch(f"state does not fit the model: tensor {odd!r} is missing or unexpected")
    for name, parameter in own.items():
        if tensors[name].shape != parameter.shape:
            raise HashMismatch(f"state does not fit the model: tensor {name!r} has shape {tuple(tensors[name].shape)}")
        parameter.copy_(tensors[name])


def batch_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of [B, T+1] windows."""
    logits = model(input_ids=windows[:, :-1]).logits  # [B, T, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean held-out loss (nats/token) over fixed windows, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.size(0), batch_size):
        chunk = windows[start : start + batch_size].to(device)
        total += batch_loss(model, chunk).item() * chunk.size(0)
    model.train(was_training)
    loss = total / windows.size(0)
    return loss if math.isfinite(loss) else float("inf")

"""A checkpoint's model config: config.json read and checked, whether transformers can build it, the fingerprint
of the architecture it describes (the same for every checkpoint of one run), and the attention route that measures
its family."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os

from ..errors import CheckpointError
from ..locations import join, read_bytes
from ..records import Checkpoint
from .weightfiles import CONFIG_NAME

# Keys that do not change the network a config describes: bookkeeping, runtime switches, the storage dtype.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "name_or_path",
        "use_cache",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "auto_map",  # where remote code lives, not what network it builds
    }
)


def read_config(ckpt: Checkpoint | str | os.PathLike) -> dict:
    """The checkpoint's config.json (or the .json file given) as a dict, checked to be a JSON object with a
    `model_type`.

    Raises:
        CheckpointError: config.json is missing, unreadable, not JSON, or names no model_type.
    """
    folder = ckpt.path if isinstance(ckpt, Checkpoint) else os.fspath(ckpt)
    path = folder if folder.endswith(".json") else join(folder, CONFIG_NAME)
    try:
        raw = read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(path, "config.json is missing: transformers cannot tell what model to build") from None
    except OSError as e:
        raise CheckpointError(path, f"config.json cannot be read ({e.strerror or e})") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"config.json is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        where = f"{e.msg}: line {e.lineno}, column {e.colno}"
        raise CheckpointError(path, f"config.json is not valid JSON ({where})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"config.json holds a JSON {type(config).__name__}, not an object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            path, "config.json has no model_type, so transformers cannot tell which architecture to build"
        )
    return config


def config_fingerprint(config: dict) -> str:
    """sha256 of the architecture a config describes, the same for the raw config.json and for `model.config.to_dict()`.

    Dropped before hashing: bookkeeping and runtime keys (transformers_version, dtype/torch_dtype, _name_or_path,
    use_cache, any `_`-prefixed key, ...) and keys equal to transformers' generic PreTrainedConfig defaults
    (which `to_dict()` adds and config.json omits). Known architectures are first filled in with their own
    defaults, so a config.json that omits a default and one that spells it out hash the same.
    """
    return hashlib.sha256(
        json.dumps(_normalise(config), sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def check_architecture(folder: str, config: dict, trust_remote_code: bool) -> None:
    """That transformers can build a causal language model from `config` (read from `folder`'s config.json, or
    the .json file given): a known model_type with a causal LM class, or remote code allowed and named.

    Raises:
        CheckpointError: naming config.json and what is missing.
    """
    import transformers
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    path = folder if folder.endswith(".json") else join(folder, CONFIG_NAME)
    model_type = config["model_type"]
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if model_type in CONFIG_MAPPING:
        if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING and not (
            trust_remote_code and "AutoModelForCausalLM" in auto_map
        ):
            raise CheckpointError(
                path,
                f"model_type {model_type!r} has no causal language model class in transformers "
                f"{transformers.__version__}",
            )
        return
    if not trust_remote_code:
        hint = (
            " config.json's auto_map points to modeling code shipped with the checkpoint: set "
            "replay.trust_remote_code=true to run it, only if you trust its source"
            if auto_map
            else ""
        )
        raise CheckpointError(
            path,
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} does not know this "
            f"architecture, and remote code is off (replay.trust_remote_code=false).{hint}",
        )
    missing = [k for k in ("AutoConfig", "AutoModelForCausalLM") if k not in auto_map]
    if missing:
        raise CheckpointError(
            path,
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} does not know this "
            f"architecture and config.json's auto_map names no {' or '.join(missing)} to load remote code from",
        )


SINKSTATS, EAGER = "sinkstats", "eager"


def attention_route(model_or_config) -> str:
    """How a family is measured: "sinkstats" (transformers' AttentionInterface, pipeline/replay/attention.py) where the
    family routes its attention through the interface, else "eager" (output_attentions=True, pipeline/replay/eager.py).
    Takes a model, a transformers config or a config.json dict; the model class is the one AutoModelForCausalLM
    builds (a config it cannot build gets "sinkstats", and loading reports the problem)."""
    cls = model_class(model_or_config)
    return SINKSTATS if cls is None or getattr(cls, "_supports_attention_backend", False) else EAGER


def model_class(model_or_config):
    """The class AutoModelForCausalLM builds for a model, a transformers config or a config.json dict (None: it
    builds none)."""
    from torch import nn

    if isinstance(model_or_config, nn.Module):
        return type(model_or_config)
    config = model_or_config
    if isinstance(config, dict):
        from transformers import CONFIG_MAPPING

        try:
            config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        except Exception:  # unknown or remote-code model_type, or a config transformers rejects: loading says why
            return None
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


@functools.cache
def _generic_defaults() -> dict:
    from transformers import PreTrainedConfig

    return PreTrainedConfig().to_dict()


def _normalise(config: dict) -> dict:
    config = copy.deepcopy(config)
    model_type = config.get("model_type")
    try:
        from transformers import CONFIG_MAPPING

        if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
            config = CONFIG_MAPPING[model_type].from_dict(config).to_dict()
    except Exception:  # an odd config still gets a fingerprint, from its raw keys
        pass
    return _strip(config)


def _strip(obj):
    if isinstance(obj, dict):
        generic = _generic_defaults() if "model_type" in obj else {}
        return {
            k: _strip(v)
            for k, v in obj.items()
            if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS and not (k in generic and generic[k] == v)
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj

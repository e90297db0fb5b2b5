"""How a trainer's tensor names become a transformers model's: one table-like module per framework.

Each map module holds `RULES` (or `rules(config)`), a table of (source name pattern, target name(s), layout
change), `SIGNATURE`, a pattern that only that framework's names match (for `checkpoints.key_map=auto`), and its
docstring cites the conversion code it follows. It may also hold `complete(tensors, config)`, which adds what the
trainer leaves out, and `saved_config(saved)`, which derives the Hugging Face config from what the trainer saved
beside its weights (`saved` is a pipeline.checkpoints.statedict.Saved) or returns None. `apply` runs a table over a
checkpoint's tensors: every tensor must be claimed by a rule, and the result must fill every tensor of the model,
or a CheckpointError lists the names: a model never runs with a weight left at its random initialisation.

This module loads no torch, so that the settings check can name the maps without it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import CheckpointError, some

if TYPE_CHECKING:
    import torch

# The registry: one module of this package per trainer, tried in this order by `auto` (the first whose SIGNATURE
# some tensor name matches wins; "none", for names that are transformers' already, is the fallback).
MAPS = ("torchtitan_llama", "olmo_core", "megatron_gpt", "nanochat", "litgpt", "nanogpt")
NAMES = ("none", *MAPS)


@dataclass(frozen=True)
class Rule:
    """Tensors whose name fully matches `source` become `targets` (templates filled with the match's groups as
    {0}, {1}, ...). `transform(tensor, config)` returns the new tensor, or one tensor per target; None keeps the
    tensor as it is. No targets: the tensor is known and deliberately dropped (a cached buffer, not a weight)."""

    source: str
    targets: str | tuple[str, ...]
    transform: Callable | None = None


def module(name: str):
    if name not in NAMES:
        raise ValueError(f"checkpoints.key_map={name!r}: choose auto or one of {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def detect(names) -> str:
    """The map whose SIGNATURE the tensor names show."""
    names = list(names)
    for candidate in MAPS:
        signature = re.compile(module(candidate).SIGNATURE)
        if any(signature.search(n) for n in names):
            return candidate
    return "none"


def apply(name: str, tensors: dict[str, torch.Tensor], config, where: str) -> dict[str, torch.Tensor]:
    """`tensors` renamed and reshaped by map `name` for a model of `config`. `where` names the checkpoint in errors.

    Raises:
        CheckpointError: a tensor no rule claims, or two tensors landing on one name.
    """
    mod = module(name)
    table = mod.rules(config) if hasattr(mod, "rules") else mod.RULES
    rules = [(re.compile(r.source), r) for r in table]
    out: dict[str, torch.Tensor] = {}
    unused = []
    for key, tensor in tensors.items():
        found = next(((m, rule) for pattern, rule in rules if (m := pattern.fullmatch(key))), None)
        if found is None:
            unused.append(key)
            continue
        m, rule = found
        targets = (rule.targets,) if isinstance(rule.targets, str) else rule.targets
        if not targets:
            continue
        result = tensor if rule.transform is None else rule.transform(tensor, config)
        results = result if isinstance(result, tuple) else (result,)
        for template, value in zip(targets, results, strict=True):
            target = template.format(*m.groups())
            if target in out:
                raise CheckpointError(where, f"key map {name}: two tensors become {target} (the second is {key})")
            out[target] = value
    if unused:
        raise CheckpointError(
            where,
            f"key map {name} leaves {len(unused)} tensors unused ({some(sorted(unused), 4)}): they belong to another "
            "framework or architecture; set checkpoints.key_map to the map of the trainer that wrote them",
        )
    if hasattr(mod, "complete"):
        mod.complete(out, config)
    return out


def split_rows(*parts: str):
    """A transform splitting a fused weight along its rows into parts sized by config attributes' products, e.g.
    split_rows("num_attention_heads*head_dim", ...)."""

    def sizes(config):
        return [_product(config, p) for p in parts]

    def transform(tensor, config):
        return tuple(t.contiguous() for t in tensor.split(sizes(config), dim=0))

    return transform


def split_grouped_qkv(w, config):
    """A fused attention weight holding, for each key/value group in turn, that group's query heads, then its key
    head, then its value head (Megatron-Core's linear_qkv, lit-gpt's attn.attn), split into q, k and v rows."""
    d, nq, nkv = head_dim(config), config.num_attention_heads, config.num_key_value_heads
    per = nq // nkv
    q, k, v = w.reshape(nkv, (per + 2) * d, w.shape[-1]).split([per * d, d, d], dim=1)
    return tuple(t.reshape(-1, w.shape[-1]).contiguous() for t in (q, k, v))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _product(config, expr: str) -> int:
    value = 1
    for factor in expr.split("*"):
        value *= (
            head_dim(config) if factor == "head_dim" else (int(factor) if factor.isdigit() else getattr(config, factor))
        )
    return value

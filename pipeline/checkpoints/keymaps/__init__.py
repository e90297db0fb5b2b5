"""How a trainer's tensor names become a transformers model's: one table-like module per framework.

Each map module holds `RULES` (or `rules(config)`), a table of (source name pattern, target name(s), layout
change), `SIGNATURE`, a pattern that only that framework's names match (for `checkpoints.key_map=auto`), and its
docstring cites the conversion code it follows. It may also hold `complete(tensors, config)`, which adds what the
trainer leaves out, and `saved_config(saved)`, which derives the Hugging Face config from what the trainer saved
beside its weights (`saved` is a pipeline.checkpoints.statedict.Saved) or returns None. `apply` runs a table over a
checkpoint's tensors: every tensor must be claimed by a rule, and the result must fill every tensor of the model,
or a CheckpointError lists the names: a model never runs with a weight left at its random initialisation.

`plan` runs the same table over the tensors' names and shapes alone (tensors on torch's meta device: no data, so a
transform uses torch operations only, never the values), for the layer-by-layer replay: which model tensors each
checkpoint tensor becomes, with `apply`'s errors, and `Plan.subset`, which maps only the checkpoint tensors feeding
some model tensors (one block's) into exactly those of `apply`'s output. A checkpoint tensor feeding several blocks
(Megatron's tensors stacked over layers) is read again for every block it feeds, and only that block's part is
kept: such a checkpoint costs one extra read of its stacked tensors per layer, and the whole stacked tensor is in
memory while a block's part is cut out. What `complete` adds is worked out where it falls, from the outputs of the
part being mapped and the planned (empty) rest.

A map that derives the config from what the trainer saved fails closed: its `hf_config` runs `check_settings`
over the trainer's settings with three declarations, `CARRIED` (the fields it turns into the transformers config),
`INERT` (fields that do not change the forward pass: dropout, initialisation, optimiser, data) and `DEFAULTS` (the
trainer's defaults of every other field it knows). A field outside the first two whose value is not its default,
or a field the map does not know at all, raises `Unmapped` naming the field, its value and the file: the network
sinktrace would build is not the one the trainer trained, and a measurement of another network is worse than none.

This module loads no torch (`plan` imports it when called), so that the settings check can name the maps without it.
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


class Unmapped(CheckpointError):
    """A trainer setting the key map cannot carry into a transformers config: the run is refused, not approximated."""


_UNSET = object()

# What every config a map derives says of special tokens: nothing the run did not say. The config classes' own
# defaults (OLMo 2's eos_token_id 50279, GPT-2's 50256) lie outside a small run's vocabulary, and transformers
# warns about them on every load.
NO_TOKEN_IDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


class Accepts(tuple):
    """In `check_settings`' defaults: several values that all mean the default (None and False for a flag)."""

    def __repr__(self) -> str:
        return " or ".join(repr(v) for v in self)


def check_settings(
    settings: dict, *, carried, inert, defaults: dict, where: str, trainer: str, prefix: str = ""
) -> None:
    """Refuse `settings` (a trainer's saved config, read from `where`) holding a field neither carried nor inert
    whose value is not the trainer's default (`defaults`), or a field the map does not know. Nested settings are
    checked by the caller, one mapping at a time; `prefix` names where they sit (e.g. "block.attention.").

    Raises:
        Unmapped: one line naming the first such field, its value and the file.
    """
    for field, value in settings.items():
        if field in carried or field in inert:
            continue
        default = defaults.get(field, _UNSET)
        if default is _UNSET:
            if value is None:  # a field a later release added, left unset
                continue
            raise Unmapped(
                where,
                f"{trainer} setting {prefix}{field}={value!r} is unknown to sinktrace's key map: "
                "it may change the network, so the run is not replayed",
            )
        if not same_value(value, default):
            raise unmapped(where, trainer, prefix + field, value, f"its default is {default!r}")


def unmapped(where: str, trainer: str, field: str, value, why: str) -> Unmapped:
    """The refusal of one setting, on one line."""
    return Unmapped(
        where,
        f"{trainer} setting {field}={value!r} has no exact equivalent in transformers ({why}): sinktrace would "
        "measure a different network, so the run is not replayed",
    )


def same_value(value, default) -> bool:
    if isinstance(default, Accepts):
        return any(same_value(value, d) for d in default)
    if value is None or default is None or isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) == default
    return value == default


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
    out, _ = _mapped(name, _rules(mod, config), tensors, config, where)
    if hasattr(mod, "complete"):
        mod.complete(out, config)
    return out


@dataclass(frozen=True)
class Plan:
    """What map `name` makes of a checkpoint, from its tensors' names and shapes alone. `sources`: each checkpoint
    tensor's model tensor names (none for a tensor dropped); `outputs`: `apply`'s output with every tensor on the
    meta device (names, shapes and dtypes, no data); `completed`: the names in it that `complete` adds."""

    name: str
    config: object
    where: str
    sources: dict[str, tuple[str, ...]]
    outputs: dict[str, torch.Tensor]
    completed: frozenset[str]

    def feeding(self, targets) -> list[str]:
        """The checkpoint tensors that some of these model tensors come from."""
        targets = set(targets)
        return [key for key, made in self.sources.items() if targets.intersection(made)]

    def subset(self, tensors: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
        """`apply`'s output for the model tensors `targets` (those of `completed` among them included), from the
        checkpoint tensors `feeding(targets)`. A part kept of a tensor that feeds other targets too is copied, so
        that the rest of it is freed."""
        targets = set(targets)
        mod = module(self.name)
        out, origin = _mapped(self.name, _rules(mod, self.config), tensors, self.config, self.where)
        got = {k: v.clone() if set(self.sources[origin[k]]) - targets else v for k, v in out.items() if k in targets}
        if targets & self.completed:
            whole = {k: v for k, v in self.outputs.items() if k not in self.completed} | out
            mod.complete(whole, self.config)
            got |= {k: whole[k] for k in targets & self.completed}
        return got


def plan(name: str, specs: dict[str, tuple], config, where: str) -> Plan:
    """The plan of map `name` over tensors given as {name: (shape, torch dtype)}; nothing is read.

    Raises:
        CheckpointError: as `apply`.
    """
    import torch

    meta = {key: torch.empty(tuple(shape), dtype=dtype, device="meta") for key, (shape, dtype) in specs.items()}
    mod = module(name)
    out, origin = _mapped(name, _rules(mod, config), meta, config, where)
    sources: dict[str, tuple[str, ...]] = {key: () for key in meta}
    for target, key in origin.items():
        sources[key] += (target,)
    mapped = set(out)
    if hasattr(mod, "complete"):
        mod.complete(out, config)
    return Plan(name, config, where, sources, out, frozenset(set(out) - mapped))


def _rules(mod, config) -> list:
    table = mod.rules(config) if hasattr(mod, "rules") else mod.RULES
    return [(re.compile(r.source), r) for r in table]


def _mapped(name: str, rules, tensors: dict, config, where: str) -> tuple[dict, dict[str, str]]:
    """The rules' output over `tensors`, and the checkpoint tensor each output comes from."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
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
            out[target], origin[target] = value, key
    if unused:
        raise CheckpointError(
            where,
            f"key map {name} leaves {len(unused)} tensors unused ({some(sorted(unused), 4)}): they belong to another "
            "framework or architecture; set checkpoints.key_map to the map of the trainer that wrote them",
        )
    return out, origin


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

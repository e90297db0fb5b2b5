"""The typed settings of every config group, registered with Hydra as structured configs.

Hydra checks each value against these types when it composes the config, so `replay.batch_size=abc` or a key
that does not exist stops the command before any work, naming the key. The YAML files in conf/ hold the
defaults and say which module each group configures; this module holds the types. It imports nothing heavy, so
that composing a config (and `stages=[report]`) never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class CheckpointsSettings:
    root: str | None = None
    quiet_seconds: float = 30.0


@dataclass
class RandomProbeSettings:
    kind: str = "random"
    name: str | None = None
    seq_len: int = 64
    rows: int = 64
    seed: int = 0
    first_token: str = "auto"


@dataclass
class TokensProbeSettings:
    kind: str = "tokens"
    name: str | None = None
    path: str = MISSING
    seed: int = 0
    first_token: str = "keep"


@dataclass
class ReplaySettings:
    """What a replay task needs to know (it travels to the Dask worker), and which steps the driver submits."""

    steps: list[int] | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    key_positions: int = 4
    trust_remote_code: bool = False
    max_device_memory: Any = "auto"  # a size ("24GB"), a byte count, "auto" or None


@dataclass
class StoreSettings:
    path: str | None = None


@dataclass
class ReportSettings:
    eps: float = 0.3
    out_dir: str | None = None


@dataclass
class Settings:
    """The whole command's config; `cluster` is whatever Hydra's `instantiate` builds (see conf/cluster/)."""

    checkpoints: Any = MISSING
    probe: Any = MISSING
    replay: Any = MISSING
    store: Any = MISSING
    report: Any = MISSING
    cluster: Any = MISSING
    stages: list[str] = field(default_factory=lambda: ["replay", "report"])


SCHEMAS = {
    ("checkpoints", "schema"): CheckpointsSettings,
    ("probe", "random_schema"): RandomProbeSettings,
    ("probe", "tokens_schema"): TokensProbeSettings,
    ("replay", "schema"): ReplaySettings,
    ("store", "schema"): StoreSettings,
    ("report", "schema"): ReportSettings,
}


def register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="settings_schema", node=Settings)
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)

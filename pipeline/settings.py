"""The typed settings of every config group, registered with Hydra as structured configs.

Hydra checks each value against these types when it composes the config, so `replay.batch_size=abc` or a key
that does not exist stops the command before any work, naming the key. The YAML files in conf/ hold the
defaults and say which module each group configures; this module holds the types. It imports nothing heavy, so
that composing a config (and `stages=[report]`) never loads torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from .checkpoints import keymaps  # the key-map registry (it loads no torch)
from .choices import CHECKPOINT_FORMATS, FIRST_TOKENS, PACKINGS, dtype_name
from .store.schema import MEASURE_GROUPS


@dataclass
class CheckpointsSettings:
    root: str | None = None
    quiet_seconds: float = 30.0
    format: str = "auto"
    model_config: str | None = None
    key_map: str = "auto"
    read_concurrency: int = 16
    # hf://<org>/<name> roots (pipeline/checkpoints/hub/)
    revision_pattern: str | None = None
    cache_limit: str = "30GB"
    keep_downloads: bool = False
    allow_torch_pickle: bool = False
    request_timeout: float = 60.0
    download_timeout: float = 3600.0
    max_read_size: str = "1GB"  # the most a file read whole may hold: configs, indexes, DCP .metadata


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
class TextProbeSettings:
    kind: str = "text"
    name: str | None = None
    path: str = MISSING
    tokenizer: str | None = None
    packing: str = "document"
    seq_len: int = 64
    rows: int = 64
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
    threads: Any = "auto"  # torch threads per replay: a count, or "auto" (this machine's cores / worker processes)
    watch: bool = False
    until_step: int | None = None
    idle_timeout: float = 3600.0
    poll_seconds: float = 10.0
    # groups of statistics beyond the sink's (MEASURE_GROUPS); mixing costs three more forward passes
    measure: list[str] = field(default_factory=lambda: ["outputs", "similarity", "loss"])


@dataclass
class StoreSettings:
    path: str | None = None


@dataclass
class ReportSettings:
    eps: float = 0.3
    out_dir: str | None = None
    tensorboard: str | None = None


@dataclass
class CompareSettings:
    stores: list[str] = field(default_factory=list)
    runs: Any = None  # run name -> store; untyped, so that a command-line dict replaces it whole
    group: str | None = None
    align: str = "step"
    out_dir: str | None = None


@dataclass
class Settings:
    """The whole command's config; `cluster.build` is whatever Hydra's `instantiate` builds (see conf/cluster/)."""

    checkpoints: Any = MISSING
    probe: Any = MISSING
    replay: Any = MISSING
    store: Any = MISSING
    report: Any = MISSING
    compare: Any = MISSING
    cluster: Any = MISSING
    stages: list[str] = field(default_factory=lambda: ["replay", "report"])
    verbose: bool = False


SCHEMAS = {
    ("checkpoints", "schema"): CheckpointsSettings,
    ("probe", "random_schema"): RandomProbeSettings,
    ("probe", "tokens_schema"): TokensProbeSettings,
    ("probe", "text_schema"): TextProbeSettings,
    ("replay", "schema"): ReplaySettings,
    ("store", "schema"): StoreSettings,
    ("report", "schema"): ReportSettings,
    ("compare", "schema"): CompareSettings,
}


CONF_MODULE = "pipeline.conf"
# what conf/cluster/'s groups hand the cluster they build, which moved under `cluster.build`
CLUSTER_BUILD_KEYS = (
    "n_workers",
    "threads_per_worker",
    "devices",
    "processes",
    "host",
    "dashboard_address",
    "worker_dashboard_address",
    "queue",
    "account",
    "cores",
    "memory",
    "gpus_per_job",
    "walltime",
    "interface",
)
# keys that moved into the group or node they configure: the old spelling still works
MOVED_KEYS = {
    "device": "replay.device",
    "dtype": "replay.dtype",
    **{f"cluster.{key}": f"cluster.build.{key}" for key in CLUSTER_BUILD_KEYS},
}


def new_spelling(arg: str) -> str:
    """`device=cuda` -> `replay.device=cuda` (and `dtype=`), `cluster.n_workers=4` -> `cluster.build.n_workers=4`."""
    key, eq, value = arg.partition("=")
    return f"{MOVED_KEYS[key]}={value}" if eq and key in MOVED_KEYS else arg


def compose(overrides: list[str] | None = None):
    """The config the command line would build (an omegaconf DictConfig), for use from Python: notebooks, tests,
    and `sinktrace check`."""
    from . import hydra_app

    register()
    return hydra_app.compose(CONF_MODULE, "config", overrides, rewrite=new_spelling)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="settings_schema", node=Settings)
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)


def known_keys() -> list[str]:
    """Every dotted key a command line may set: the schemas' fields and the keys of conf/cluster/'s groups (whose
    `build.*` and `security.*` hand their own keys to what they build, so their prefix stands for them)."""
    import dataclasses
    from importlib.resources import files

    from omegaconf import OmegaConf

    keys = {f.name for f in dataclasses.fields(Settings) if f.name not in GROUPS}
    for (group, _), schema in SCHEMAS.items():
        keys |= {f"{group}.{f.name}" for f in dataclasses.fields(schema)}
    for yaml in files(CONF_MODULE).joinpath("cluster").iterdir():
        if yaml.name.endswith(".yaml"):
            node = OmegaConf.create(yaml.read_text())
            keys |= {f"cluster.{k}" for k in node if k != "defaults"}
            keys |= {f"cluster.{k}.{inner}" for k in OPEN_CLUSTER_NODES if k in node for inner in node[k]}
    return sorted(keys - {"cluster.build._target_", "cluster.security._target_"})


GROUPS = ("checkpoints", "probe", "replay", "store", "report", "compare", "cluster")
OPEN_CLUSTER_NODES = ("build", "security")  # their keys are the arguments of what Hydra builds from them


def no_such_setting(key: str, known: list[str] | None = None) -> str:
    """`replay.batchsize: no such setting; did you mean replay.batch_size?`: the closest key, looked for among the
    keys of the same group when the group exists (its shared prefix would make any of them look close)."""
    import difflib

    known = known if known is not None else known_keys()
    group, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group] if group else []
    if siblings:
        close = [f"{group}.{k}" for k in difflib.get_close_matches(name, siblings, n=1, cutoff=0.7)]
        hint = f"did you mean {close[0]}?" if close else f"{group} has {', '.join(siblings)}"
    else:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
        hint = f"did you mean {close[0]}?" if close else "the README's Configuration table lists every key"
    return f"{key}: no such setting; {hint}"


def _first_leaf(node, prefix: str) -> str:
    """`checkpoint` holding {root: /x} -> `checkpoint.root`: the key as the command line spelt it."""
    from omegaconf import DictConfig

    while isinstance(node, DictConfig) and len(node):
        name = next(iter(node))
        prefix, node = f"{prefix}.{name}", node[name]
    return prefix


def _check_keys(cfg) -> None:
    """A key no schema knows, however it came in (`+verbos=true`, `+checkpoint.root=/x`, `+replay.anything=1`),
    stops the command: a typo must never leave a setting silently unread (and the demo replayed instead)."""
    import dataclasses

    from omegaconf import OmegaConf

    from .errors import UsageError

    known = known_keys()
    top = {f.name for f in dataclasses.fields(Settings)}
    for key in cfg:
        if key not in top:
            raise UsageError(no_such_setting(_first_leaf(cfg[key], str(key)), known))
    for group in GROUPS:
        node = cfg[group]
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            names = {f.name for f in dataclasses.fields(schema)}
        elif group == "cluster":
            names = {k.split(".")[1] for k in known if k.startswith("cluster.")}
        else:
            continue
        extra = [k for k in node if k not in names]
        if extra:  # suggested from this group's own keys: probe=random has no `probe.packing`, probe=text has
            own = sorted(f"{group}.{name}" for name in names)
            raise UsageError(no_such_setting(_first_leaf(node[extra[0]], f"{group}.{extra[0]}"), own))


STAGES = ("replay", "report", "compare")
ALIGNS = ("step", "tokens")  # compare.align: pipeline/runs.py
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
KEY_MAPS = ("auto", *keymaps.NAMES)  # the registry in pipeline/checkpoints/keymaps/ is the one list


def check(cfg) -> None:
    """Every setting checked before any work: UsageError naming the first bad key and what is allowed."""
    from omegaconf import OmegaConf

    from .errors import UsageError

    _check_keys(cfg)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise UsageError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    r = cfg.replay
    for key in ("batch_size", "key_positions"):
        if r[key] < 1:
            raise UsageError(f"replay.{key}={r[key]}: must be a whole number of at least 1")
    try:
        dtype_name(r.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_device(str(r.device))
    _check_threads(r.threads)
    if r.steps is not None and not all(isinstance(s, int) and s >= 0 for s in r.steps):
        raise UsageError(f"replay.steps={list(r.steps)}: give training steps, e.g. replay.steps=[0,1000]")
    for key in ("idle_timeout", "poll_seconds"):
        if r[key] <= 0:
            raise UsageError(f"replay.{key}={r[key]}: must be a positive number of seconds")
    if "replay" in cfg.stages:  # (pipeline.devices loads torch, which `stages=[report]` never needs)
        try:
            from .devices import device_budget

            device_budget(r.max_device_memory, "cpu")
        except ValueError as e:
            raise UsageError(str(e)) from None
    c = cfg.checkpoints
    if c.root is not None and not str(c.root).strip():  # `checkpoints.root=$UNSET` composes to "", not to None
        raise UsageError(
            "checkpoints.root= is empty (an unset shell variable?): give the run's checkpoint folder, or leave the "
            "key out to replay the demo run"
        )
    if c.quiet_seconds < 0:
        raise UsageError(f"checkpoints.quiet_seconds={c.quiet_seconds}: must be 0 or more")
    if c.format not in CHECKPOINT_FORMATS:
        raise UsageError(f"checkpoints.format={c.format}: choose from {', '.join(CHECKPOINT_FORMATS)}")
    for key in ("request_timeout", "download_timeout"):  # they bound every remote root's waits
        if not c[key] > 0:
            raise UsageError(f"checkpoints.{key}={c[key]}: must be a positive number of seconds")
    try:
        from dask.utils import parse_bytes

        parse_bytes(c.max_read_size)
    except (ValueError, TypeError):
        raise UsageError(f"checkpoints.max_read_size={c.max_read_size}: give a size like 1GB") from None
    if c.read_concurrency < 1:
        raise UsageError(f"checkpoints.read_concurrency={c.read_concurrency}: at least 1 (1 reads one range at a time)")
    if c.key_map not in KEY_MAPS:
        raise UsageError(f"checkpoints.key_map={c.key_map}: choose from {', '.join(KEY_MAPS)}")
    if c.model_config and not os.path.exists(os.path.expanduser(c.model_config)):
        raise UsageError(f"checkpoints.model_config={c.model_config}: no such file or folder")
    unknown = sorted(set(r.measure) - set(MEASURE_GROUPS))
    if unknown:
        raise UsageError(f"replay.measure: unknown group(s) {unknown}; choose from {list(MEASURE_GROUPS)}")
    p = cfg.probe
    if p.first_token not in FIRST_TOKENS:
        raise UsageError(f"probe.first_token={p.first_token}: choose from {', '.join(FIRST_TOKENS)}")
    if p.kind in ("random", "text") and (p.seq_len < 2 or p.rows < 1):
        raise UsageError(f"probe.seq_len={p.seq_len}, probe.rows={p.rows}: give at least 2 tokens and 1 row")
    if p.kind in ("tokens", "text") and OmegaConf.is_missing(p, "path"):
        what = "an integer .npy array [rows, T]" if p.kind == "tokens" else "a text file or JSON lines"
        raise UsageError(f"probe.path: probe={p.kind} needs one, {what}: give probe.path=/path/to/it")
    if p.kind == "text":
        if p.packing not in PACKINGS:
            raise UsageError(f"probe.packing={p.packing}: choose from {', '.join(PACKINGS)}")
        from .probe.text import check_text

        try:
            check_text(str(p.path))  # an unreadable text fails here, before any checkpoint is read
        except ValueError as e:
            raise UsageError(str(e)) from None
    if p.name is not None:
        _check_group_name(str(p.name))
    if not 0 < cfg.report.eps < 1:
        raise UsageError(f"report.eps={cfg.report.eps}: must lie between 0 and 1")
    outputs = {
        "report.tensorboard": cfg.report.tensorboard if {"replay", "report"} & set(cfg.stages) else None,
        "report.out_dir": cfg.report.out_dir if "report" in cfg.stages else None,
        "compare.out_dir": cfg.compare.out_dir if "compare" in cfg.stages else None,
    }
    for key, value in outputs.items():
        if value is not None:
            check_output_folder(key, str(value))
    if cfg.report.tensorboard is not None and {"replay", "report"} & set(cfg.stages):
        needs_tensorboard()
    _check_cluster(cfg.cluster)
    if "compare" in cfg.stages:
        _check_compare(cfg.compare)


def _check_device(device: str) -> None:
    from .errors import UsageError

    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"replay.device={device}: choose from {', '.join(DEVICES)}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"replay.device={device}: this torch ({torch.__version__}) sees no CUDA device")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"replay.device={device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


# the counts of conf/cluster/'s groups that start workers: with none, the run would wait for one forever
CLUSTER_COUNTS = ("build.n_workers", "build.threads_per_worker", "jobs")


def _check_cluster(cluster) -> None:
    from omegaconf import OmegaConf

    from .errors import UsageError

    for key in CLUSTER_COUNTS:
        value = OmegaConf.select(cluster, key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UsageError(f"cluster.{key}={value}: give at least 1 (with no worker the run would wait forever)")


def _check_threads(threads) -> None:
    from .errors import UsageError

    if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise UsageError(f"replay.threads={threads}: give a whole number of at least 1, or auto")


def _check_compare(c) -> None:
    from .errors import UsageError
    from .locations import exists

    if c.stores and c.runs:
        raise UsageError("compare.stores and compare.runs: give one of them (runs names each store)")
    stores = list(c.runs.values()) if c.runs else list(c.stores)
    if not stores:
        raise UsageError(
            "stages=[compare] needs the stores to compare: compare.stores=[A,B] or compare.runs={name: store}"
        )
    key = "compare.runs" if c.runs else "compare.stores"
    for store in stores:
        if not str(store).strip() or not exists(str(store)):
            raise UsageError(f"{key}: {store}: no sinktrace store there")
    if c.align not in ALIGNS:
        raise UsageError(f"compare.align={c.align}: choose from {', '.join(ALIGNS)}")


def _check_group_name(name: str) -> None:
    """A probe's name is its group in the store: one Zarr node name, never a path."""
    from .errors import UsageError

    if not name.strip() or set(name) <= {"."} or "/" in name or "\\" in name or name.startswith("__"):
        raise UsageError(
            f"probe.name={name}: not a group name (a name holds no slash, is not made of dots only and does not "
            "start with __); give a plain name, e.g. probe.name=wiki-keep"
        )


def check_output_folder(key: str, value: str) -> None:
    """UsageError, in one line, unless `value` is a folder sinktrace can write into or create (a URL is left to
    its filesystem)."""
    from .errors import UsageError
    from .locations import is_url, local_path

    if is_url(value):
        return
    if not value.strip():
        raise UsageError(f"{key}= is empty (an unset shell variable?): give a folder, or leave the key out")
    path = local_path(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{key}={value}: a file is there, not a folder; choose another {key}")
    existing = path
    while not os.path.exists(existing):  # the nearest folder that exists is where the new ones are made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{key}={value}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{key}={value}: {existing} is not writable by this user; choose another {key}")


def needs_tensorboard() -> None:
    """UsageError, in one line, where the `tensorboard` extra is not installed."""
    import importlib.util

    from .errors import UsageError

    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("report.tensorboard needs the tensorboard package: pip install 'sinktrace[tensorboard]'")

"""Discover stage: find a run's checkpoint folders and tell which are ready to replay.

A checkpoint folder is a direct child of the root named like one of the layouts trainers write:
`checkpoint-<N>` (Hugging Face Trainer), `step<N>` (OLMo-core), `step_<N>`, `step-<N>` (torchtitan, litgpt),
`iter_<N>` (Megatron, zero-padded too) or `global_step<N>` (DeepSpeed). A checkpoint may also be one file
directly in the root, named with its step: nanochat's `model_<N>.pt`, lit-gpt's `iter-<N>-ckpt.pth`, or any
`<name>_<N>` / `<name>-<N>` with `.pt`, `.pth` or `.ckpt` (`ckpt_<N>.pt`: nanoGPT's file kept per step). Other
folders and files are ignored. When the root holds none of these but is itself a checkpoint (it has a config.json,
weights, a trainer_state.json, a DCP `.metadata`, or nanoGPT's `ckpt.pt`), it is the one checkpoint.

Inside a folder the weights are, in this order (`checkpoints.format` narrows the choice): Hugging Face safetensors
(`hf`); a PyTorch Distributed Checkpoint (`dcp`) in the folder itself (torchtitan, Megatron-Core torch_dist), in
`model_and_optim/` (OLMo-core) or in `pytorch_model_fsdp_0/` (the Hugging Face Trainer with FSDP); one
`torch.save` file of any name (`*.pt`, `*.pth`, `*.ckpt`, training state aside), or litgpt's `lit_model.pth`
among several (`torch`); several other torch.save files make the folder ambiguous, and sinktrace does not guess.
DCP writes `.metadata` last, so data files without it are a checkpoint still being written; Megatron writes
`latest_checkpointed_iteration.txt` at the root after a checkpoint is finished, so an `iter_<N>` beyond the
iteration it names is one too.

The step comes from the folder name, else the file name, else a field inside (trainer_state.json's global_step,
which overrides a folder name as before; a torch.save file's iter_num or step); `step_source` records which.

Discovery answers "is this folder finished?", not "is it valid?": it lists files and reads only the two small
JSON files it needs (trainer_state.json, model.safetensors.index.json). A folder that is still being written
is reported with `complete=False` and a reason, and a later run picks it up. A finished folder whose weights
are damaged is reported complete; loading fails on it with a CheckpointError naming the file (pipeline/replay/load.py),
so the store records it as failed instead of waiting on it forever. A finished folder that holds files but no
weights sinktrace can read (another format than `checkpoints.format`, files of an unknown kind, several candidate
files) is `unreadable`: its reason names the files it holds.

Roots may be local paths or fsspec URLs (s3://, gs://, memory://, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import posixpath
import re
import time

from ..choices import CHECKPOINT_FORMATS as FORMATS
from ..errors import CheckpointError, some
from ..locations import is_url, local_path
from ..records import Checkpoint
from .formats.dcp import METADATA_NAME
from .weightfiles import (
    CONFIG_NAME,
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TRAINER_STATE_NAME,
    TRAINING_STATE,
    pickled_weights,
    pickles_refused,
    shard_names,
)

log = logging.getLogger(__name__)

# `(?P<tmp>...)` catches staging names: HF Trainer's old `tmp-checkpoint-N` (transformers #27820), OLMo-core's
# `stepN-tmp`, and `checkpoint-N.tmp` (what pipeline/demo.py writes before its rename).
_STAGING = r"tmp|temp|partial|incomplete|unfinished|in[-_]?progress"
STEP_DIR = re.compile(
    rf"^(?P<pre>tmp[-_])?(?:checkpoint-|global_step|step[-_]?|iter_)(?P<step>\d+)(?P<tmp>[-_.](?:{_STAGING}))?$",
    re.IGNORECASE,
)
LAYOUTS = (
    "checkpoint-<N>, step<N>, step_<N>, step-<N>, iter_<N>, global_step<N>, <name>_<N>.pt (or -<N>, .pth, .ckpt), "
    "iter-<N>-ckpt.pth, ckpt.pt, or a checkpoint folder itself"
)
# A file or folder inside a checkpoint whose name says it is still being written (`*.tmp`, `*.partial`, an
# `.incomplete` or `unfinished` marker, a `tmpXXXXXX` from tempfile). Names need a separator around the word, so
# `chat_template.jinja` or `temperature.json` do not match.
TEMP_NAME = re.compile(rf"(?:^|[-_.])(?:{_STAGING})(?:[-_.]|$)|^\.?tmp", re.IGNORECASE)
# Checkpoints that are single torch.save files in the run's folder, named with their step: nanochat's model_<N>.pt,
# lit-gpt's iter-<N>-ckpt.pth (TinyLlama's code), and a researcher's ckpt_<N>.pt, <name>-<N>.pth, ...
STEP_FILE = re.compile(r"^(?:iter-(?P<litgpt>\d+)-ckpt\.pth|.+?[-_](?P<step>\d+)\.(?:pt|pth|ckpt))$", re.IGNORECASE)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
NANOGPT_FILE = "ckpt.pt"  # nanoGPT overwrites one file; its step is the iter_num inside
TORCH_IN_FOLDER = ("lit_model.pth",)  # litgpt's step-<N>/lit_model.pth, the model among several torch.save files
# Where a step folder keeps its DCP: itself (torchtitan, Megatron-Core), OLMo-core, the HF Trainer with FSDP.
DCP_FOLDERS = ("", "model_and_optim", "pytorch_model_fsdp_0")
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"


def discover(
    root: str,
    *,
    quiet_seconds: float = 30.0,
    now: float | None = None,
    format: str = "auto",
    model_config: str | None = None,
    key_map: str = "auto",
) -> list[Checkpoint]:
    """Find the checkpoints under `root`, one record per training step, sorted by step.

    Args:
        root: the run's checkpoint folder, a local path or an fsspec URL.
        quiet_seconds: a folder counts as complete only when nothing in it changed for this long (a live
            training run may still be writing it). 0 turns the check off.
        now: the current time (seconds since the epoch) to measure quiet periods against; default time.time().
        format: `checkpoints.format`: auto (decided per checkpoint from its files), hf, dcp or torch.
        model_config, key_map: `checkpoints.model_config` and `checkpoints.key_map`, recorded on every checkpoint
            for the worker that loads it (pipeline/checkpoints/statedict.py); with a model_config, a Hugging Face folder
            needs no config.json of its own.

    Returns:
        One Checkpoint per step. Incomplete ones carry `complete=False` and a human `reason`.

    Raises:
        FileNotFoundError, NotADirectoryError: the root is missing or not a folder.
        CheckpointError: the root is a single checkpoint whose training step cannot be told.
    """
    if format not in FORMATS:
        raise ValueError(f"checkpoints.format={format!r}: choose one of {', '.join(FORMATS)}")
    now = time.time() if now is None else float(now)
    fs = _Folder.open(root)
    top = fs.list_top()
    by_name = {e.name: e for e in top}
    candidates, unnamed, step_files = [], [], []
    for e in top:
        m = STEP_DIR.match(e.name) if e.is_dir else None
        f = STEP_FILE.match(e.name) if not e.is_dir and format in ("auto", "torch") else None
        f = None if f and TRAINING_STATE.search(e.name) else f  # optimizer_<N>.pt is no model
        if m:
            staging = e.name if (m.group("pre") or m.group("tmp")) else None
            candidates.append((fs.child(e.name), int(m.group("step")), staging))
        elif f:
            step_files.append((e.name, int(f.group("litgpt") or f.group("step"))))
        elif e.is_dir and any(fs.child(e.name).has(n) for n in (CONFIG_NAME, *TORCH_IN_FOLDER)):
            unnamed.append(
                e.name
            )  # litgpt's `final/` too: the weights at the end of training, with no step in its name
    if unnamed:  # otherwise a run saved as `ckpt100/` or `epoch-3/` would just come back empty
        log.warning(
            "%s: ignoring %s: they hold a checkpoint, but their names give no step (%s); to replay one, set "
            "checkpoints.root to it",
            fs.url,
            some(sorted(unnamed)),
            LAYOUTS,
        )

    # The root is one checkpoint when it looks like one and its step-named children do not (DeepSpeed keeps
    # `global_step<N>/` optimizer shards inside `checkpoint-<N>/`). A root holding a model *and* checkpoint
    # folders is an HF Trainer output_dir with its final save_model(): the folders are the run.
    m = STEP_DIR.match(posixpath.basename(fs.path.rstrip("/")))
    if NANOGPT_FILE in by_name and format in ("auto", "torch") and not candidates and not step_files:
        return _read_with([_inspect_file(fs, NANOGPT_FILE, None, now, quiet_seconds)], model_config, key_map)
    if (
        _looks_like_checkpoint({e.name for e in top}) or (m and format in ("auto", "torch") and _torch_saves(by_name))
    ) and (m or not any(_holds_weights(folder) for folder, _, _ in candidates)):
        name_step = int(m.group("step")) if m else None
        staging = fs.path if m and (m.group("pre") or m.group("tmp")) else None
        found = _inspect(fs, name_step, staging, [], now, quiet_seconds, format, model_config is None)
        if found is None:
            raise CheckpointError(fs.url, "the folder vanished while it was being read")
        return _read_with([found], model_config, key_map)

    latest = _megatron_latest(fs) if MEGATRON_TRACKER in by_name else None
    found = [_inspect_file(fs, name, step, now, quiet_seconds) for name, step in step_files]
    for folder, name_step, staging in candidates:
        name = posixpath.basename(folder.path)
        # NeMo-style markers sit next to the folder: `step100-unfinished`, `checkpoint-100.incomplete`.
        siblings = [
            n
            for n, e in by_name.items()
            if not e.is_dir and n != name and n.startswith(name) and TEMP_NAME.fullmatch(n[len(name) :])
        ]
        ckpt = _inspect(folder, name_step, staging, siblings, now, quiet_seconds, format, model_config is None)
        if ckpt is not None and latest is not None and name.startswith("iter_") and ckpt.step > latest:
            ckpt = dataclasses.replace(
                ckpt,
                complete=False,
                reason="; ".join(
                    filter(
                        None,
                        [
                            ckpt.reason,
                            f"newer than the iteration {MEGATRON_TRACKER} names ({latest}): still being written",
                        ],
                    )
                ),
            )
        if ckpt is not None:  # None: rotated away by the trainer while we looked
            found.append(ckpt)
    return _read_with(_one_per_step(found), model_config, key_map)


# --------------------------------------------------------------------------------------------- one folder


def _read_with(found: list[Checkpoint], model_config: str | None, key_map: str) -> list[Checkpoint]:
    return [dataclasses.replace(c, model_config=model_config, key_map=key_map) for c in _storable(found)]


MAX_STEP = 2**63 - 1  # the store's step coordinate is int64


def _storable(found: list[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints whose step the store can hold; the others are skipped with a warning naming them."""
    for c in found:
        if not 0 <= c.step <= MAX_STEP:
            log.warning(
                "skipping %s: its step %d (from its %s) does not fit the store's step numbers (0 to 2**63-1)",
                c.path,
                c.step,
                c.step_source,
            )
    return [c for c in found if 0 <= c.step <= MAX_STEP]


def _inspect(
    folder,
    name_step,
    staging,
    sibling_markers,
    now,
    quiet_seconds,
    fmt="auto",
    needs_config=True,
) -> Checkpoint | None:
    try:
        entries = folder.walk()
    except FileNotFoundError:
        return None
    files = {e.name for e in entries if not e.is_dir and "/" not in e.name}
    problems = []

    step, tokens_seen, loss = name_step, None, None
    source = "folder name"
    if TRAINER_STATE_NAME in files:
        try:
            state = json.loads(folder.read_text(TRAINER_STATE_NAME))
            if isinstance(state.get("global_step"), int):
                step, source = state["global_step"], TRAINER_STATE_NAME
            tokens_seen = _tokens_seen(state, step)
            loss = _training_loss(state, step)
        except (ValueError, AttributeError) as e:  # a half-written file reads as bad JSON
            problems.append(f"{TRAINER_STATE_NAME} is not a valid JSON object ({e})")
        except CheckpointError as e:  # larger than checkpoints.max_read_size
            problems.append(e.problem)
        except FileNotFoundError:
            return None
    fmt, weight_files, weight_problems, unreadable = _weights(folder, files, entries, fmt)
    if step is None and fmt == "torch" and weight_files:
        step, source = _step_inside(weight_files[0])
    if step is None:
        raise CheckpointError(
            folder.url,
            "looks like a checkpoint, but its training step is unknown: it has no trainer_state.json with a "
            "global_step and its name does not end in a step number (rename it step<N>)",
        )

    unfinished = bool(problems)  # problems before what the folder holds, and after it, say it may change yet
    if CONFIG_NAME not in files and fmt == "hf" and needs_config:
        problems.append(f"{CONFIG_NAME} is missing")
    problems += weight_problems
    held = len(problems)

    if staging is not None:
        problems.append(f"its name {posixpath.basename(staging)!r} marks a checkpoint still being written")
    problems += [f"marker {n!r} next to it says it is still being written" for n in sibling_markers]
    markers = sorted(e.name for e in entries if TEMP_NAME.search(posixpath.basename(e.name)))
    if markers:
        problems.append(f"{some(markers)} {'marks' if len(markers) == 1 else 'mark'} files still being written")

    if TRAINER_STATE_NAME not in files and fmt != "torch" and any(TRAINING_STATE.search(n) for n in files):
        # the Trainer saves the model, then optimizer, scheduler and RNG states, and trainer_state.json last
        problems.append(
            f"still being written: it holds the Trainer's optimizer or scheduler state but no {TRAINER_STATE_NAME}, "
            "which the Trainer writes last"
        )

    quiet_in = None
    stamps = [e.mtime for e in entries if e.mtime is not None]
    if folder.mtime is not None:
        stamps.append(folder.mtime)
    if quiet_seconds > 0:
        if stamps:
            age = max(0.0, now - max(stamps))
            if age < quiet_seconds:
                if not problems:
                    quiet_in = quiet_seconds - age
                problems.append(f"modified {age:.0f} s ago; waiting {quiet_seconds:g} s quiet period")

    seen = sorted(e.name for e in entries if not e.is_dir)
    # finished, yet nothing in it can be read: waiting would not help (an empty folder is one about to be written)
    unreadable = unreadable and bool(seen) and not unfinished and len(problems) == held
    if unreadable:
        problems.append(f"it holds {some(seen, 6)}")
    return Checkpoint(
        step=step,
        path=folder.url,
        weight_files=tuple(weight_files),
        complete=not problems,
        unreadable=unreadable,
        reason="; ".join(problems) or None,
        tokens_seen=tokens_seen,
        quiet_in=quiet_in,
        modified=max(stamps) if stamps else None,
        format=fmt,
        step_source=source,
        loss=loss,
    )


def _inspect_file(fs, name: str, name_step: int | None, now: float, quiet_seconds: float) -> Checkpoint:
    """A checkpoint that is one torch.save file in the run's folder (nanochat, lit-gpt, nanoGPT's ckpt.pt)."""
    path = fs.file_url(name)
    step, source = (name_step, "file name") if name_step is not None else _step_inside(path)
    if step is None:
        raise CheckpointError(path, "its training step is unknown: the file records no iter_num or step")
    problems, quiet_in = [], None
    try:
        modified = os.stat(path).st_mtime if fs.fs is None else None
    except FileNotFoundError:
        modified = None
    if quiet_seconds > 0 and modified is not None:
        age = max(0.0, now - modified)
        if age < quiet_seconds:
            quiet_in = quiet_seconds - age
            problems.append(f"modified {age:.0f} s ago; waiting {quiet_seconds:g} s quiet period")
    return Checkpoint(
        step=step,
        path=path,
        weight_files=(path,),
        complete=not problems,
        reason="; ".join(problems) or None,
        quiet_in=quiet_in,
        modified=modified,
        format="torch",
        step_source=source,
    )


def _step_inside(path: str) -> tuple[int | None, str]:
    """The step a torch.save file records (its pickle read with torch.load(weights_only=True), no tensor data)."""
    from .formats import torchfile

    try:
        found = torchfile.step_field(torchfile.load(path))
    except CheckpointError as e:
        raise CheckpointError(path, f"its training step cannot be read: {e.problem}") from None
    return (found[0], f"{found[1]} field") if found else (None, "")


def _megatron_latest(fs) -> int | None:
    try:
        text = fs.read_text(MEGATRON_TRACKER).strip()
    except (OSError, UnicodeDecodeError, CheckpointError):
        return None
    return int(text) if text.isdigit() else None  # "release" marks a converted checkpoint, not a training step


def _weights(folder, files, entries, fmt="auto") -> tuple[str, list[str], list[str], bool]:
    """The checkpoint's format, its weights (safetensors files transformers would load, preferring
    model.safetensors over an index; the DCP folder; the torch.save file), problems, and whether those problems
    make the folder unreadable (what it holds cannot be read, however long one waits) rather than unfinished."""
    hf = fmt in ("auto", "hf")
    if hf and SAFE_WEIGHTS_NAME in files:
        return "hf", [folder.file_url(SAFE_WEIGHTS_NAME)], [], False
    if hf and SAFE_INDEX_NAME in files:
        try:
            shards = shard_names(json.loads(folder.read_text(SAFE_INDEX_NAME)))
        except ValueError as e:
            return "hf", [], [f"{SAFE_INDEX_NAME} is unusable: {e}"], False
        except CheckpointError as e:  # larger than checkpoints.max_read_size: waiting will not shrink it
            return "hf", [], [e.problem], True
        except FileNotFoundError:
            return "hf", [], [f"{SAFE_INDEX_NAME} vanished while it was read"], False
        present = {e.name for e in entries if not e.is_dir}
        problems = [f"{s} listed in {SAFE_INDEX_NAME} is missing" for s in shards if s not in present]
        return "hf", [folder.file_url(s) for s in shards], problems, False
    present = {e.name for e in entries if not e.is_dir}
    if fmt in ("auto", "dcp"):
        for sub in DCP_FOLDERS:
            prefix = f"{sub}/" if sub else ""
            data = [
                n for n in present if n.startswith(prefix) and "/" not in n[len(prefix) :] and n.endswith(".distcp")
            ]
            if prefix + METADATA_NAME in present:
                return "dcp", [folder.file_url(sub) if sub else folder.url], [], False
            if data:
                return (
                    "dcp",
                    [],
                    [
                        f"DCP data files in {sub or 'the folder'} but no {METADATA_NAME}, which DCP writes last: "
                        "still being written, or its writer failed"
                    ],
                    False,
                )
    saves = _torch_saves(files)
    if fmt in ("auto", "torch") and saves:
        chosen = [n for n in TORCH_IN_FOLDER if n in saves] or saves
        if len(chosen) == 1:
            return "torch", [folder.file_url(chosen[0])], [], False
        return (
            "torch",
            [],
            [
                f"{len(saves)} torch.save files ({some(saves)}) and sinktrace will not guess which one holds the "
                "model: keep one per step folder, or save them as <name>_<N>.pt in the run's folder"
            ],
            True,
        )
    if fmt in ("dcp", "torch"):
        wanted = "DCP (.metadata and *.distcp)" if fmt == "dcp" else "torch.save (*.pt, *.pth, *.ckpt)"
        return fmt, [], [f"no {wanted} weights (checkpoints.format={fmt})"], True

    if saves:  # checkpoints.format=hf
        return (
            "hf",
            [],
            [f"no safetensors weights, only torch.save files ({some(saves)}): set checkpoints.format=torch"],
            True,
        )
    pickles = pickled_weights(e.name for e in entries if not e.is_dir)
    if pickles:
        return "hf", [], [pickles_refused(pickles)], True
    other = sorted(n for n in files if n.endswith(".safetensors"))
    if other:
        return "hf", [], [f"no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} (found {some(other)})"], True
    return "hf", [], [f"no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}"], True


def _torch_saves(files) -> list[str]:
    """The folder's files that may hold a model saved with torch.save (training state and staging names aside)."""
    return sorted(
        n
        for n in files
        if n.lower().endswith(TORCH_SUFFIXES) and not TRAINING_STATE.search(n) and not TEMP_NAME.search(n)
    )


def _tokens_seen(state: dict, step: int | None) -> int | None:
    tokens = state.get("num_input_tokens_seen", state.get("tokens_seen"))
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)):
        return None
    # The HF Trainer always writes num_input_tokens_seen and leaves it 0 when token counting is off.
    if tokens == 0 and step:
        return None
    return int(tokens)


def _holds_weights(folder) -> bool:
    return any(folder.has(n) for n in (CONFIG_NAME, METADATA_NAME, *DCP_FOLDERS[1:], *TORCH_IN_FOLDER))


def _training_loss(state: dict, step: int | None) -> float | None:
    """The last training loss the trainer logged at or before `step` (its log_history entries with a "loss")."""
    history = state.get("log_history")
    if step is None or not isinstance(history, list):
        return None
    logged = [
        (e["step"], e["loss"])
        for e in history
        if isinstance(e, dict)
        and isinstance(e.get("step"), int)
        and isinstance(e.get("loss"), (int, float))
        and not isinstance(e.get("loss"), bool)
        and e["step"] <= step
    ]
    return float(max(logged)[1]) if logged else None


def _looks_like_checkpoint(names: set[str]) -> bool:
    markers = {
        CONFIG_NAME,
        SAFE_WEIGHTS_NAME,
        SAFE_INDEX_NAME,
        TRAINER_STATE_NAME,
        METADATA_NAME,
        *TORCH_IN_FOLDER,
        *DCP_FOLDERS[1:],
    }
    return bool(names & markers) or any(n.endswith(".safetensors") or n == "pytorch_model.bin" for n in names)


def _one_per_step(found: list[Checkpoint]) -> list[Checkpoint]:
    """One record per step. Several folders may claim one step (a copy, a staging folder beside its final name,
    trainer_state.json disagreeing with a name): exactly one complete claimant wins; several complete ones make
    the step an error, because guessing could replay the wrong weights."""
    by_step: dict[int, list[Checkpoint]] = {}
    for c in sorted(found, key=lambda c: (c.step, c.path)):
        by_step.setdefault(c.step, []).append(c)
    out = []
    for step, group in by_step.items():
        complete = [c for c in group if c.complete]
        if len(group) == 1:
            out.append(group[0])
        elif len(complete) == 1:
            others = [c.path for c in group if c is not complete[0]]
            log.info("step %d: using %s; ignoring incomplete %s", step, complete[0].path, ", ".join(others))
            out.append(complete[0])
        elif complete:
            names = ", ".join(posixpath.basename(c.path) for c in complete)
            out.append(
                dataclasses.replace(
                    complete[0],
                    complete=False,
                    unreadable=True,
                    reason=f"{len(complete)} complete checkpoints claim step {step} ({names}); sinktrace will not "
                    "guess which one to replay: remove or rename all but one",
                )
            )
        else:
            first, rest = group[0], group[1:]
            also = ", ".join(posixpath.basename(c.path) for c in rest)
            out.append(dataclasses.replace(first, reason=f"{first.reason}; step {step} is also claimed by {also}"))
    return out


# --------------------------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # relative to the folder listed, "/"-separated
    is_dir: bool
    mtime: float | None


class _Folder:
    """A folder on the local disk (plain os calls: exact and cheap) or behind fsspec (for URLs)."""

    def __init__(self, path: str, fs=None, mtime: float | None = None):
        self.path, self.fs, self.mtime = path, fs, mtime

    @classmethod
    def open(cls, root) -> _Folder:
        root = os.fspath(root)
        if is_url(root):
            import fsspec

            fs, path = fsspec.core.url_to_fs(root)
            path = path.rstrip("/") or "/"
            if not fs.exists(path):
                raise FileNotFoundError(f"checkpoint root {root} does not exist")
            if not fs.isdir(path):
                raise NotADirectoryError(f"checkpoint root {root} is not a folder")
            return cls(path, fs, _mtime(fs.info(path)))
        path = local_path(root)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint root {path} does not exist")
        if not os.path.isdir(path):
            raise NotADirectoryError(f"checkpoint root {path} is not a folder")
        return cls(path, None, os.stat(path).st_mtime)

    @property
    def url(self) -> str:
        return self.path if self.fs is None else self.fs.unstrip_protocol(self.path)

    def file_url(self, name: str) -> str:
        if self.fs is None:
            return os.path.join(self.path, *name.split("/"))
        return self.fs.unstrip_protocol(posixpath.join(self.path, name))

    def child(self, name: str) -> _Folder:
        if self.fs is None:
            path = os.path.join(self.path, name)
            try:
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:
                mtime = None
            return _Folder(path, None, mtime)
        path = posixpath.join(self.path, name)
        try:
            mtime = _mtime(self.fs.info(path))
        except FileNotFoundError:
            mtime = None
        return _Folder(path, self.fs, mtime)

    def list_top(self) -> list[_Entry]:
        # listings (here and in walk) are unbounded: fsspec lists a prefix whole and offers no count limit (s3fs's
        # max_items truncates silently and counts no subfolder); the README asks for the run's own prefix
        if self.fs is None:
            with os.scandir(self.path) as it:
                return [_Entry(d.name, d.is_dir(), None) for d in it]
        return [
            _Entry(posixpath.basename(i["name"].rstrip("/")), i.get("type") == "directory", None)
            for i in self.fs.ls(self.path, detail=True)
        ]

    def walk(self) -> list[_Entry]:
        """Every file and folder below, with modification times; FileNotFoundError if the folder is gone."""
        if self.fs is None:
            out = []
            self._walk_local(self.path, "", out)
            return out
        base = self.path.rstrip("/") + "/"
        found = self.fs.find(self.path, withdirs=True, detail=True)
        if not found and not self.fs.exists(self.path):
            raise FileNotFoundError(self.url)
        return [
            _Entry(name[len(base) :], info.get("type") == "directory", _mtime(info))
            for name, info in found.items()
            if name.startswith(base) and name != base
        ]

    def _walk_local(self, path: str, prefix: str, out: list) -> None:
        with os.scandir(path) as it:
            for d in it:
                name = prefix + d.name
                try:  # follow links: a linked shard counts with its target's time; a dangling link is missing
                    st = d.stat()
                except FileNotFoundError:
                    continue  # deleted while we walked, or a dangling link
                is_dir = d.is_dir()
                out.append(_Entry(name, is_dir, st.st_mtime))
                if is_dir and not d.is_symlink():
                    try:
                        self._walk_local(d.path, name + "/", out)
                    except FileNotFoundError:
                        pass

    def has(self, name: str) -> bool:
        if self.fs is None:
            return os.path.exists(os.path.join(self.path, name))
        return self.fs.exists(posixpath.join(self.path, name))

    def read_text(self, name: str) -> str:
        from ..locations import check_read_size

        if self.fs is None:
            path = os.path.join(self.path, name)
            with open(path, "rb") as f:
                check_read_size(path, os.fstat(f.fileno()).st_size)
                return f.read().decode("utf-8")
        path = posixpath.join(self.path, name)
        check_read_size(self.fs.unstrip_protocol(path), self.fs.size(path))
        return self.fs.cat_file(path).decode("utf-8")


def _mtime(info: dict) -> float | None:
    """Modification time from an fsspec info dict; each backend names it differently."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "mtime_ns", "created"):
        value = info.get(key)
        if value is None:
            continue
        if key == "mtime_ns":
            return float(value) / 1e9
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None

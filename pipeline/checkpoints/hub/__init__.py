"""A Hugging Face Hub repository's step revisions as checkpoints (`checkpoints.root=hf://<org>/<name>`).

Public training suites publish each intermediate checkpoint as a revision (a branch or tag) of one repository:
Pythia as `step<N>`, OLMo and OLMo 2 as `stage1-step<N>-tokens<M>B` (OLMo 1: `step<N>-tokens<M>B`). This module
is the source (`sources.Source`) of such a repository: it lists the revisions with `huggingface_hub`, reads each
one's training step (and tokens seen) from its name, and yields one Checkpoint record per step whose `path` is the
revision's snapshot folder in the Hugging Face cache. Replay reads that folder like any other checkpoint folder.

The files are not there yet: the driver asks this source to fetch them a few checkpoints ahead of the replay
(`start`, `arrived`) and to free them once the step is stored (`release`), so that a suite of a hundred checkpoints
of a large model never takes more disk than `checkpoints.cache_limit`. Only config.json and safetensors are
fetched; a revision with only pickled weights is skipped unless `checkpoints.allow_torch_pickle=true`, which
reads them with `torch.load(weights_only=True)` and writes a safetensors copy for replay.

Files land in the standard cache (HF_HUB_CACHE) in the layout `hf_hub_download` writes (`blobs/<hash>`, linked
from `snapshots/<commit>/<file>`, and `refs/<revision>`), but are fetched here: `hf_hub_download` names the blob and
the snapshot after the ETag and X-Repo-Commit headers of the answer, unchecked, and some of its requests wait
without limit. Here each file is fetched by the listed commit and named after the listed hash; the commit ids and
hashes a listing gives must have the Hub's shapes (40 and 64 hex digits), so no answer can name a path outside the
cache, and nothing is deleted outside the caches the run owns. The bytes are written to a temporary name and kept
only when their size and hash are the listed ones, so an interrupted or substituted download never passes for a
finished one. Every request has a timeout (`checkpoints.request_timeout`) and every file a deadline
(`checkpoints.download_timeout`); requests run in daemon threads that a timeout or Ctrl-C leaves behind, never joins.
Files that were in the cache before the run are never deleted. Offline (HF_HUB_OFFLINE=1, or when the Hub cannot
be reached), the revisions already in the cache (`models--<org>--<name>/refs/<revision>` and `snapshots/`) are
replayed and the others reported.

The modules: `revisions` (the listing read as step revisions and their records, plain functions), `cache` (the
files fetched ahead within the limit, the journal, the deletion), `convert` (pickled weights to safetensors) and
`transfer` (requests with a deadline, downloads checked against the listing); `HubRun` here composes them.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ...errors import CheckpointError, UsageError
from ...locations import check_read_size, sinktrace_home
from ...records import Checkpoint
from ..weightfiles import CONFIG_NAME
from .cache import AHEAD, STALE_PARTIAL, TRIES, HubCache
from .revisions import (
    BUILTIN_PATTERNS,
    COMMIT,
    HASHES,
    MAX_STEP,
    PICKLE_INDEX,
    PICKLE_WEIGHTS,
    PREFIX,
    TOKEN_UNITS,
    Revision,
    cached_refs,
    flag_duplicates,
    list_files,
    listed_refs_in_time,
    parse_revision,
    record,
    step_revisions,
)
from .transfer import LISTERS, NoAnswer, WrongBytes

__all__ = [
    "AHEAD",
    "BUILTIN_PATTERNS",
    "COMMIT",
    "HASHES",
    "LISTERS",
    "MAX_STEP",
    "PICKLE_INDEX",
    "PICKLE_WEIGHTS",
    "PREFIX",
    "RETRY_WAIT",
    "STALE_PARTIAL",
    "TOKEN_UNITS",
    "TRIES",
    "HubRun",
    "NoAnswer",
    "Revision",
    "WrongBytes",
    "is_hub",
    "parse_revision",
]

RETRY_WAIT = 2.0  # seconds before the second attempt, doubled for each further one


def is_hub(root) -> bool:
    return str(root).startswith(PREFIX)


class HubRun:
    """The step revisions of one Hub repository, and the files of those being replayed."""

    def __init__(self, root: str, settings):
        from dask.utils import parse_bytes
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.root = str(root)
        self.repo_id = self.root[len(PREFIX) :].strip("/")
        if self.repo_id.count("/") != 1 or "@" in self.repo_id:
            raise UsageError(f"checkpoints.root={self.root}: give a Hub model repository as hf://<org>/<name>")
        pattern = settings.revision_pattern
        if pattern:
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise UsageError(f"checkpoints.revision_pattern={pattern!r} is not a regular expression: {e}") from None
            if "step" not in compiled.groupindex:
                raise UsageError(f"checkpoints.revision_pattern={pattern!r} has no named group (?P<step>...)")
        self.patterns = (pattern,) if pattern else BUILTIN_PATTERNS
        try:
            limit = parse_bytes(settings.cache_limit)
        except (ValueError, TypeError):
            raise UsageError(f"checkpoints.cache_limit={settings.cache_limit!r}: give a size like 30GB") from None
        for key in ("request_timeout", "download_timeout"):
            if not settings[key] > 0:
                raise UsageError(f"checkpoints.{key}={settings[key]}: must be a positive number of seconds")
        self.request_timeout = float(settings.request_timeout)
        self.allow_pickle = bool(settings.allow_torch_pickle)
        self.cache_dir = constants.HF_HUB_CACHE
        self.storage = os.path.join(self.cache_dir, repo_folder_name(repo_id=self.repo_id, repo_type="model"))
        self.revisions: dict[int, Revision] = {}
        # commit -> its files: from the local cache when offline, else as listed (a commit's files never change)
        self._cached_files: dict[str, dict[str, tuple[int, str]]] = {}
        self.cache = HubCache(
            self.root,
            self.repo_id,
            self.storage,
            sinktrace_home() / "hub" / repo_folder_name(repo_id=self.repo_id, repo_type="model"),
            self.revisions,
            limit=limit,
            keep=bool(settings.keep_downloads),
            offline=bool(constants.HF_HUB_OFFLINE),
            request_timeout=self.request_timeout,
            download_timeout=float(settings.download_timeout),
            retry_wait=RETRY_WAIT,
        )

    def discover(self, steps=None) -> list[Checkpoint]:
        """One record per step revision, sorted by step; with `steps`, only those (a suite may have thousands of
        revisions, and each one's file list is a request).

        Raises:
            UsageError: the repository does not exist (or is not visible), or no revision matches a pattern.
        """
        cache = self.cache
        if cache.offline:
            refs = cached_refs(self.root, self.repo_id, self.cache_dir, self._cached_files)
        else:
            refs = listed_refs_in_time(self.root, self.repo_id, self.request_timeout)
        if refs is None:  # the Hub could not be reached: what the cache holds is all there is
            cache.offline = True
            refs = cached_refs(self.root, self.repo_id, self.cache_dir, self._cached_files)
        if not cache.offline:
            cache.remove_stale_partials()
        by_step = step_revisions(refs, self.patterns, self.root, cache.offline)
        wanted = set(by_step) if steps is None else {int(s) for s in steps}
        chosen = {step: group[0] for step, group in by_step.items() if step in wanted}
        list_files(self.repo_id, list(chosen.values()), self.request_timeout, self._cached_files, cache.offline)
        records = []
        for step, rev in sorted(chosen.items()):
            self.revisions[rev.step] = rev
            records.append(
                record(
                    rev,
                    by_step[step][1:],
                    self.repo_id,
                    self.storage,
                    cache.converted,
                    cache.offline,
                    self.allow_pickle,
                )
            )
        return flag_duplicates(records, self.root)

    def with_config(self, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` with its revision's config.json fetched (the run's probe is built from it); UsageError when it
        cannot be."""
        try:
            path = self.cache.download(self.revisions[ckpt.step], CONFIG_NAME)
        except CheckpointError as e:
            raise UsageError(
                f"checkpoints.root={self.root}: no revision's {CONFIG_NAME} could be fetched: {e}"
            ) from None
        return dataclasses.replace(ckpt, path=os.path.dirname(path))

    def fetch_files(self, step: int, names: list[str]) -> str:
        """Listed files of a step's revision beyond its weights (a text probe's tokenizer), fetched and checked like
        them and released with them; the snapshot folder holding them. CheckpointError naming a file not had."""
        rev = self.revisions[step]
        for name in names:  # read whole once fetched: the listing's size meets checkpoints.max_read_size first
            if name in rev.files:
                check_read_size(f"{PREFIX}{self.repo_id}@{rev.name}/{name}", rev.files[name][0])
        for name in names:
            self.cache.download(rev, name)
        return os.path.join(self.storage, "snapshots", rev.commit)

    def start(self, todo: list[Checkpoint]) -> None:
        """Fetch the checkpoints of `todo` in order, in the background, within the cache limit."""
        self.cache.start(todo)

    def arrived(self, wait: bool) -> list[tuple[Checkpoint, Exception | None]]:
        """The checkpoints fetched since the last call (in the order of `start`), each with None or why its fetch
        failed; `wait`: wait for the next one when none is."""
        return self.cache.arrived(wait)

    def release(self, ckpt: Checkpoint) -> None:
        """The step is stored (or failed): delete what this run downloaded for it, unless told to keep it."""
        self.cache.release(ckpt)

    def gone(self, ckpt: Checkpoint) -> bool:
        """Never: a revision's files are this run's copies, and a fetch that failed says so itself."""
        return False

    def close(self) -> None:
        """Stop fetching, and delete what was fetched and not released (unless told to keep it)."""
        self.cache.close()

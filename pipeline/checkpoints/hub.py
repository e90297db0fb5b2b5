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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

from ..errors import CheckpointError, UsageError, describe, some
from ..locations import sinktrace_home, write_json_atomic
from ..records import Checkpoint
from .weightfiles import CONFIG_NAME, SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME, pickled_weights, pickles_refused

log = logging.getLogger(__name__)

PREFIX = "hf://"
# The suites' own naming: Pythia's `step<N>`; OLMo 2's `stage1-step<N>-tokens<M>B` and OLMo 1's `step<N>-tokens<M>B`.
# OLMo 2's later stages (`stage2-ingredient1-step<N>-...`) restart their step count, so they need a pattern of
# their own (checkpoints.revision_pattern) and a run of their own.
BUILTIN_PATTERNS = (
    r"step(?P<step>\d+)",
    r"(?:stage1-)?step(?P<step>\d+)-tokens(?P<tokens>\d+[KMBT]?)",
)
TOKEN_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
AHEAD = 2  # checkpoints fetched ahead of the one being replayed
TRIES = 3  # attempts per file before its step fails
STALE_PARTIAL = 600  # seconds without a write after which a partial download is another run's leftover
RETRY_WAIT = 2.0  # seconds before the second attempt, doubled for each further one
LISTERS = 8  # file listings requested at once
# the shapes of the Hub's ids, the only ones used in paths: a commit (git sha1), a git blob id, an LFS sha256
COMMIT = re.compile(r"[0-9a-f]{40}")
HASHES = {40: re.compile(r"[0-9a-f]{40}"), 64: re.compile(r"[0-9a-f]{64}")}
MAX_STEP = 2**63 - 1  # steps are stored as int64


class NoAnswer(Exception):
    """A request to the Hub did not finish in the time it was given."""


class WrongBytes(Exception):
    """A download's bytes are not those the listing describes: another try would get the same."""


def is_hub(root) -> bool:
    return str(root).startswith(PREFIX)


def parse_revision(name: str, patterns) -> tuple[int, int | None] | None:
    """(step, tokens seen) from a revision name matching one of `patterns` in full, or None."""
    for pattern in patterns:
        m = re.fullmatch(pattern, name)
        if m:
            tokens = m.groupdict().get("tokens")
            return int(m.group("step")), _tokens(tokens) if tokens else None
    return None


def _tokens(text: str) -> int:
    unit = text[-1].upper() if text[-1].isalpha() else ""
    return int(text[: len(text) - len(unit)]) * TOKEN_UNITS[unit]


@dataclass
class Revision:
    """One step revision: what the listing said, and what this run downloaded of it."""

    name: str
    commit: str
    step: int
    tokens: int | None
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (size, sha256 or git blob id)
    fetch: list[str] = field(default_factory=list)  # the files replay needs, config first
    pickled: bool = False  # weights only as pickles, to be converted
    listing_error: str | None = None


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
            self.limit = parse_bytes(settings.cache_limit)
        except (ValueError, TypeError):
            raise UsageError(f"checkpoints.cache_limit={settings.cache_limit!r}: give a size like 30GB") from None
        for key in ("request_timeout", "download_timeout"):
            if not settings[key] > 0:
                raise UsageError(f"checkpoints.{key}={settings[key]}: must be a positive number of seconds")
        self.request_timeout = float(settings.request_timeout)
        self.download_timeout = float(settings.download_timeout)
        self.keep = bool(settings.keep_downloads)
        self.allow_pickle = bool(settings.allow_torch_pickle)
        self.cache_dir = constants.HF_HUB_CACHE
        self.storage = os.path.join(self.cache_dir, repo_folder_name(repo_id=self.repo_id, repo_type="model"))
        workdir = sinktrace_home() / "hub" / repo_folder_name(repo_id=self.repo_id, repo_type="model")
        self.converted = workdir / "converted"  # safetensors copies of pickled revisions
        # what sinktrace fetched and has not deleted yet: a killed run's files are this run's to delete
        self._journal = workdir / "fetched.json"
        self.offline = bool(constants.HF_HUB_OFFLINE)
        self.revisions: dict[int, Revision] = {}
        # commit -> its files: from the local cache when offline, else as listed (a commit's files never change)
        self._cached_files: dict[str, dict[str, tuple[int, str]]] = {}
        self._downloaded: dict[int, list[str]] = {}  # step -> cache files this run created
        # the fetch thread claims files while the driver deletes a stored step's: one at a time
        self._files_lock = threading.RLock()
        self._leftover: set[str] = set() if self.keep else _read_journal(self._journal)
        self._held: dict[int, int] = {}  # step -> bytes fetched and not yet released
        self._cond = threading.Condition()
        self._ready: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ discovery

    def discover(self, steps=None) -> list[Checkpoint]:
        """One record per step revision, sorted by step; with `steps`, only those (a suite may have thousands of
        revisions, and each one's file list is a request).

        Raises:
            UsageError: the repository does not exist (or is not visible), or no revision matches a pattern.
        """
        refs = self._cached_refs() if self.offline else self._listed_refs_in_time()
        if refs is None:  # the Hub could not be reached: what the cache holds is all there is
            self.offline = True
            refs = self._cached_refs()
        if not self.offline:
            self._remove_stale_partials()
        by_step: dict[int, list[Revision]] = {}
        unmatched = []
        for name, commit in sorted(refs.items()):
            parsed = parse_revision(name, self.patterns)
            if parsed is None:
                unmatched.append(name)
            elif not COMMIT.fullmatch(str(commit)):  # it would name the revision's folders
                log.warning(
                    "%s: skipped revision %s: the Hub gives its commit as %r, not 40 hex digits",
                    self.root,
                    name,
                    str(commit)[:80],
                )
            elif parsed[0] > MAX_STEP:
                log.warning("%s: skipped revision %s: its step does not fit in 64 bits", self.root, name)
            else:
                by_step.setdefault(parsed[0], []).append(Revision(name, commit, *parsed))
        if not by_step:
            where = "in the local Hugging Face cache" if self.offline else "on the Hub"
            found = f"its revisions ({some(sorted(refs))})" if refs else "no revision at all"
            raise UsageError(
                f"checkpoints.root={self.root}: {where} it has {found}, none named like a step "
                f"({' or '.join(self.patterns)}); give checkpoints.revision_pattern, a regex with a group (?P<step>...)"
            )
        if unmatched:
            log.warning(
                "%s: skipped %d revision(s) whose names match no revision pattern: %s",
                self.root,
                len(unmatched),
                some(unmatched),
            )
        wanted = set(by_step) if steps is None else {int(s) for s in steps}
        chosen = {step: group[0] for step, group in by_step.items() if step in wanted}
        self._list_files(list(chosen.values()))
        records = [self._record(rev, by_step[step][1:]) for step, rev in sorted(chosen.items())]
        return self._flag_duplicates(records)

    def _remove_stale_partials(self) -> None:
        """A download killed mid-file leaves `<blob>.<id>.incomplete`: never trusted (the client renames only a
        finished file), never resumed (each download writes a file of its own), so it would only take disk."""
        folder = os.path.join(self.storage, "blobs")
        for name in _blobs(self.storage):
            path = os.path.join(folder, name)
            try:
                if name.endswith(".incomplete") and time.time() - os.path.getmtime(path) > STALE_PARTIAL:
                    os.unlink(path)
                    log.info("%s: removed %s, left by an interrupted download", self.root, path)
            except OSError:
                pass

    def _listed_refs_in_time(self) -> dict[str, str] | None:
        importlib.import_module("huggingface_hub.hf_api")  # before the clock starts: it is not the Hub's time
        ((refs, error),) = _in_time({0: self._listed_refs}, self.request_timeout).values()
        if isinstance(error, NoAnswer):
            raise UsageError(
                f"checkpoints.root={self.root}: the Hub sent no list of revisions within "
                f"checkpoints.request_timeout={self.request_timeout:g} s"
            )
        if error is not None:
            raise error
        return refs

    def _listed_refs(self) -> dict[str, str] | None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        try:
            refs = HfApi().list_repo_refs(self.repo_id)
        except RepositoryNotFoundError:
            raise UsageError(
                f"checkpoints.root={self.root}: no model repository {self.repo_id} on the Hub (or it is private "
                "or gated: log in with `hf auth login`)"
            ) from None
        except HfHubHTTPError as e:
            raise UsageError(f"checkpoints.root={self.root}: the Hub refused the listing: {describe(e)}") from None
        except (*_transport_errors(), OSError) as e:  # no network: the cache, as the Hub's own client falls back to
            log.warning("%s: cannot reach the Hub (%s); replaying what the local cache holds", self.root, describe(e))
            return None
        return {r.name: r.target_commit for r in [*refs.branches, *refs.tags]}

    def _cached_refs(self) -> dict[str, str]:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            cache = scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            cache = None
        repos = cache.repos if cache is not None else ()
        repo = next((r for r in repos if r.repo_id == self.repo_id and r.repo_type == "model"), None)
        if repo is None:
            raise UsageError(
                f"checkpoints.root={self.root}: offline, and the local Hugging Face cache ({self.cache_dir}) holds "
                f"no revision of {self.repo_id}"
            )
        refs = {}
        for rev in repo.revisions:
            files = {
                f.file_path.relative_to(rev.snapshot_path).as_posix(): (f.size_on_disk, f.blob_path.name)
                for f in rev.files
            }
            self._cached_files[rev.commit_hash] = files
            for ref in rev.refs:
                refs[ref] = rev.commit_hash
        return refs

    def _list_files(self, revisions: list[Revision]) -> None:
        """Each revision's top-level files, with sizes and the Hub's sha256 of each weight file (LFS)."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi()

        def listing(rev):
            files = {}
            for e in api.list_repo_tree(self.repo_id, revision=rev.commit):
                if isinstance(e, RepoFile):
                    digest = e.lfs.sha256 if e.lfs else e.blob_id
                    # the blob's file name, and what the bytes are checked against
                    if not HASHES[64 if e.lfs else 40].fullmatch(str(digest)):
                        raise ValueError(f"the Hub lists {e.path} with hash {str(digest)[:80]!r}, not hex digits")
                    files[e.path] = (e.size, digest)
            return files

        new = [] if self.offline else [rev for rev in revisions if rev.commit not in self._cached_files]
        answers = _in_time({i: partial(listing, rev) for i, rev in enumerate(new)}, self.request_timeout)
        for i, (files, error) in sorted(answers.items()):
            rev = new[i]
            if error is None:
                self._cached_files[rev.commit] = files
            elif isinstance(error, Exception):  # this revision is retried by the next run
                rev.listing_error = describe(error)
            else:
                raise error
        for rev in revisions:
            rev.files = self._cached_files.get(rev.commit, {})

    def _record(self, rev: Revision, others: list[Revision]) -> Checkpoint:
        self.revisions[rev.step] = rev
        snapshot = os.path.join(self.storage, "snapshots", rev.commit)
        problems = []
        if rev.listing_error:
            problems.append(f"its file list could not be read: {rev.listing_error}")
        elif CONFIG_NAME not in rev.files:
            problems.append(f"{CONFIG_NAME} is {'not in the local cache' if self.offline else 'missing'}")
        weights, pickled = self._weight_names(rev.files)
        if not problems and not weights:
            pickles = pickled_weights(rev.files)
            if pickled and self.allow_pickle:
                rev.pickled = True
                weights = pickled
            elif pickles:
                problems.append(
                    pickles_refused(pickles) + ", or set checkpoints.allow_torch_pickle=true to read "
                    "them with torch.load(weights_only=True)"
                )
            elif self.offline:
                problems.append("its weights are not in the local Hugging Face cache (offline)")
            else:
                problems.append(f"no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
        if others:
            problems.append(
                f"revisions {', '.join(r.name for r in [rev, *others])} all claim step {rev.step}; "
                "narrow checkpoints.revision_pattern to one of them"
            )
        rev.fetch = [CONFIG_NAME, *weights] if not problems else []
        path = str(self.converted / rev.commit) if rev.pickled else snapshot
        # the Hub's own digests: sha256 of each LFS file (the weights), git's blob id of the others
        digested = sorted({*weights, *_shards(rev.files, weights)} & set(rev.files))
        digest = hashlib.sha256("".join(f"{n}:{rev.files[n][1]}\n" for n in digested).encode()).hexdigest()
        if rev.pickled:
            local = [SAFE_WEIGHTS_NAME]
        else:
            local = [n for n in digested if n.endswith(".safetensors")]
        return Checkpoint(
            step=rev.step,
            path=path,
            weight_files=tuple(os.path.join(path, n) for n in local),
            complete=not problems,
            reason=(f"revision {rev.name}: " + "; ".join(problems)) if problems else None,
            tokens_seen=rev.tokens,
            provenance={
                "repository": self.repo_id,
                "revision": rev.name,
                "commit": rev.commit,
                "weights_sha256": digest if digested else "",
            },
        )

    def _weight_names(self, files) -> tuple[list[str], list[str]]:
        """(safetensors files to fetch, pickled files to fetch), the way transformers picks them."""
        if SAFE_WEIGHTS_NAME in files:
            return [SAFE_WEIGHTS_NAME], []
        if SAFE_INDEX_NAME in files:  # the shards come from the index, read when it is fetched
            return [SAFE_INDEX_NAME], []
        if PICKLE_WEIGHTS in files:
            return [], [PICKLE_WEIGHTS]
        if PICKLE_INDEX in files:
            return [], [PICKLE_INDEX]
        return [], []

    def _flag_duplicates(self, records: list[Checkpoint]) -> list[Checkpoint]:
        """Steps whose revisions serve the same weights (the same commit, or the same sha256 for every weight
        file) are replayed all the same, and flagged: a suite that re-tagged one checkpoint would otherwise show
        a plateau that training never had."""
        by_digest: dict[str, list[Checkpoint]] = {}
        for c in records:
            if c.provenance["weights_sha256"]:
                by_digest.setdefault(c.provenance["weights_sha256"], []).append(c)
        for digest, group in by_digest.items():
            if len(group) > 1:
                steps = [c.step for c in group]
                log.warning(
                    "%s: steps %s (revisions %s) serve the same weights (sha256 %s)",
                    self.root,
                    ", ".join(map(str, steps)),
                    ", ".join(c.provenance["revision"] for c in group),
                    digest[:16],
                )
                for c in group:
                    c.provenance["same_weights_as"] = [s for s in steps if s != c.step]
        return records

    # ------------------------------------------------------------------------------------------ fetching

    def with_config(self, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` with its revision's config.json fetched (the run's probe is built from it); UsageError when it
        cannot be."""
        try:
            path = self._download(self.revisions[ckpt.step], CONFIG_NAME)
        except CheckpointError as e:
            raise UsageError(
                f"checkpoints.root={self.root}: no revision's {CONFIG_NAME} could be fetched: {e}"
            ) from None
        return dataclasses.replace(ckpt, path=os.path.dirname(path))

    def fetch_files(self, step: int, names: list[str]) -> str:
        """Listed files of a step's revision beyond its weights (a text probe's tokenizer), fetched and checked like
        them and released with them; the snapshot folder holding them. CheckpointError naming a file not had."""
        rev = self.revisions[step]
        for name in names:
            self._download(rev, name)
        return os.path.join(self.storage, "snapshots", rev.commit)

    def start(self, todo: list[Checkpoint]) -> None:
        """Fetch the checkpoints of `todo` in order, in the background, within the cache limit."""
        with self._cond:
            self._closed = False
        self._ready = queue.Queue()
        self._thread = threading.Thread(target=self._fetch_all, args=(list(todo),), daemon=True, name="hub-fetch")
        self._thread.start()

    def arrived(self, wait: bool) -> list[tuple[Checkpoint, Exception | None]]:
        """The checkpoints fetched since the last call (in the order of `start`), each with None or why its fetch
        failed; `wait`: wait for the next one when none is."""
        out = [self._ready.get()] if wait else []
        while True:
            try:
                out.append(self._ready.get_nowait())
            except queue.Empty:
                return out

    def release(self, ckpt: Checkpoint) -> None:
        """The step is stored (or failed): delete what this run downloaded for it, unless told to keep it."""
        if not self.keep:
            self._delete(ckpt.step)
        with self._cond:
            self._held.pop(ckpt.step, None)
            self._cond.notify_all()

    def gone(self, ckpt: Checkpoint) -> bool:
        """Never: a revision's files are this run's copies, and a fetch that failed says so itself."""
        return False

    def close(self) -> None:
        """Stop fetching, and delete what was fetched and not released (unless told to keep it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.keep:
            with self._files_lock:
                for step in list(self._downloaded):
                    self._delete(step)
                self._downloaded[-1], self._leftover = sorted(self._leftover), set()
                self._delete(-1)

    def _fetch_all(self, todo: list[Checkpoint]) -> None:
        for ckpt in todo:
            need = self._size(self.revisions[ckpt.step])
            with self._cond:
                self._cond.wait_for(
                    lambda need=need: (
                        self._closed
                        or not self._held
                        or (len(self._held) <= AHEAD and sum(self._held.values()) + need <= self.limit)
                    )
                )
                if self._closed:
                    return
                self._held[ckpt.step] = need
            if need > self.limit:
                log.warning(
                    "%s: revision %s takes %s, more than checkpoints.cache_limit; fetched alone",
                    self.root,
                    self.revisions[ckpt.step].name,
                    _size_text(need),
                )
            try:
                self._fetch(ckpt)
                with self._cond:  # what the files take on disk, whatever the listing said
                    if ckpt.step in self._held:
                        self._held[ckpt.step] = self._on_disk(ckpt.step)
                self._ready.put((ckpt, None))
            except Exception as e:  # the step fails; the others go on
                self._ready.put((ckpt, e))

    def _on_disk(self, step: int) -> int:
        total = 0
        with self._files_lock:
            paths = list(self._downloaded.get(step, ()))
        for path in paths:
            for folder, _, names in os.walk(path) if os.path.isdir(path) else [("", (), [path])]:
                for name in names:
                    try:
                        total += os.lstat(os.path.join(folder, name)).st_size
                    except OSError:
                        pass
        return total

    def _size(self, rev: Revision) -> int:
        size = sum(rev.files.get(n, (0, ""))[0] for n in rev.fetch)
        size += sum(rev.files[n][0] for n in _shards(rev.files, rev.fetch))
        return size * (2 if rev.pickled else 1)  # a converted copy beside the pickles

    def _fetch(self, ckpt: Checkpoint) -> None:
        rev = self.revisions[ckpt.step]
        for name in rev.fetch:
            path = self._download(rev, name)
            if name in (SAFE_INDEX_NAME, PICKLE_INDEX):
                for shard in _index_shards(path):
                    self._download(rev, shard)
        if rev.pickled:
            self._convert(rev, ckpt.path)

    def _download(self, rev: Revision, name: str) -> str:
        """One file into the cache, retried a few times; CheckpointError naming the file when it cannot be had."""
        snapshot = os.path.join(self.storage, "snapshots", rev.commit)
        pointer = os.path.join(snapshot, name)
        url = f"{PREFIX}{self.repo_id}@{rev.name}/{name}"
        # the blob's name is the listing's hash: the sha256 of an LFS file (the weights), else its git blob id
        blob = os.path.join(self.storage, "blobs", rev.files[name][1]) if name in rev.files else None
        with self._files_lock:
            # another step (two revisions of one commit, or of the same weights) or a killed run may have fetched
            # it: then it is ours to delete too, once every step that uses it is released
            present = os.path.exists(pointer)
            for path in (pointer, os.path.realpath(pointer)) if present else (blob,):
                if path is not None and (path in self._leftover or self._held_elsewhere(path)):
                    self._leftover.discard(path)
                    self._own(rev.step, path)
            if present:
                return pointer
            had_blob = blob is not None and os.path.exists(blob)
        if self.offline:
            raise CheckpointError(url, "not in the local Hugging Face cache, and the Hub is offline")
        if blob is None:  # an index's shard the listing lacks: no size or hash to check it against
            raise CheckpointError(url, "not in the revision's file listing")
        if not had_blob:
            self._fetch_blob(rev, name, url, blob)
            self._own(rev.step, blob)
        os.makedirs(snapshot, exist_ok=True)
        link = f"{pointer}.{uuid.uuid4().hex}.tmp"
        os.symlink(os.path.relpath(blob, snapshot), link)
        os.replace(link, pointer)
        self._own(rev.step, pointer)
        # the commit of the revision's name, for later offline runs (a branch name may hold slashes)
        refs = os.path.join(self.storage, "refs")
        ref = os.path.join(refs, rev.name)
        if _inside(ref, refs):
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(ref), exist_ok=True)
                with open(ref, "w") as f:
                    f.write(rev.commit)
        return pointer

    def _fetch_blob(self, rev: Revision, name: str, url: str, blob: str) -> None:
        """The file's bytes into `blob`, checked against the listing's size and hash, within the deadline."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        size, digest = rev.files[name]
        source = hf_hub_url(self.repo_id, name, revision=rev.commit)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        deadline = time.monotonic() + self.download_timeout
        for attempt in range(TRIES):
            tmp = f"{blob}.{uuid.uuid4().hex[:12]}.incomplete"
            stop = threading.Event()
            ((_, error),) = _in_time(
                {0: partial(_get, source, tmp, size, digest, self.request_timeout, stop)},
                deadline - time.monotonic(),
            ).values()
            stop.set()
            if error is None:
                os.replace(tmp, blob)
                return
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(error, NoAnswer):
                raise CheckpointError(
                    url, f"not downloaded within checkpoints.download_timeout={self.download_timeout:g} s"
                ) from None
            if isinstance(error, WrongBytes):
                raise CheckpointError(url, str(error)) from None
            if isinstance(error, HfHubHTTPError):
                status = error.response.status_code if error.response is not None else None
                if status is not None and 400 <= status < 500 and status != 429:
                    raise CheckpointError(url, f"the Hub refused it: {describe(error)}") from None
            if not isinstance(error, Exception):
                raise error
            if attempt + 1 < TRIES:
                time.sleep(min(RETRY_WAIT * 2**attempt, max(0.0, deadline - time.monotonic())))
        raise CheckpointError(url, f"download failed {TRIES} times, last: {describe(error)}")

    def _held_elsewhere(self, path: str) -> bool:
        with self._files_lock:
            return any(path in files for files in self._downloaded.values())

    def _own(self, step: int, path: str) -> None:
        with self._files_lock:
            self._downloaded.setdefault(step, []).append(path)
            self._write_journal()

    def _write_journal(self) -> None:
        if self.keep:
            return
        with self._files_lock:
            owned = sorted({*self._leftover, *(p for files in self._downloaded.values() for p in files)})
            if owned:
                self._journal.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self._journal, owned)
            else:
                self._journal.unlink(missing_ok=True)

    def _convert(self, rev: Revision, folder: str) -> None:
        """Pickled weights -> model.safetensors beside a copy of config.json, read with weights_only=True (no
        code runs while unpickling)."""
        import torch
        from safetensors.torch import save_file

        if os.path.exists(os.path.join(folder, SAFE_WEIGHTS_NAME)):  # converted by an earlier run
            self._own(rev.step, folder)
            return
        snapshot = os.path.join(self.storage, "snapshots", rev.commit)
        names = [PICKLE_WEIGHTS] if PICKLE_WEIGHTS in rev.fetch else _index_shards(os.path.join(snapshot, PICKLE_INDEX))
        state, seen = {}, set()
        for name in names:
            path = os.path.join(snapshot, name)
            try:
                try:
                    part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # files saved before torch 1.6 (not zip) cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(path, f"torch.load(weights_only=True) cannot read it: {describe(e)}") from None
            for key, tensor in part.items():
                # safetensors stores no shared storage: a tied weight is written as its own copy
                ptr = tensor.untyped_storage().data_ptr()
                state[key] = tensor.clone() if ptr in seen else tensor.contiguous()
                seen.add(ptr)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copyfile(os.path.join(snapshot, CONFIG_NAME), os.path.join(tmp, CONFIG_NAME))
        save_file(state, os.path.join(tmp, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        self._own(rev.step, folder)

    def _delete(self, step: int) -> None:
        with self._files_lock:
            self._delete_unlocked(step)

    def _delete_unlocked(self, step: int) -> None:
        files = self._downloaded.pop(step, [])
        others = [p for held in self._downloaded.values() for p in held]
        # a file or blob another held step uses (the same commit, or the same weights) stays until it is released
        still_used = {*others, *(os.path.realpath(p) for p in others)}
        for path in files:
            if path in still_used or (not os.path.islink(path) and os.path.realpath(path) in still_used):
                continue
            if not any(_inside(path, cache) for cache in (self.storage, str(self.converted))):
                log.warning("%s: left %s alone: it lies outside the caches this run writes", self.root, path)
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                    os.rmdir(os.path.dirname(path))  # an emptied snapshot folder goes too
                except OSError:
                    pass
        self._write_journal()


def _get(url: str, tmp: str, size: int, digest: str, timeout: float, stop: threading.Event) -> None:
    """The file at `url` into `tmp`; WrongBytes when its bytes are not the `size` bytes of hash `digest` (a
    sha256, or a git blob id: the sha1 of `blob <size>\\0` and the bytes)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    hasher = hashlib.sha256() if len(digest) == 64 else hashlib.sha1(b"blob %d\0" % size)
    got = 0
    with (
        open(tmp, "wb") as f,
        get_session().stream("GET", url, headers=build_hf_headers(), timeout=timeout, follow_redirects=True) as r,
    ):
        hf_raise_for_status(r)
        for chunk in r.iter_bytes():
            if stop.is_set():  # past the deadline: this thread was left behind
                return
            got += len(chunk)
            if got > size:
                raise WrongBytes(f"the Hub sent more than the {size} bytes its listing gave; nothing kept")
            hasher.update(chunk)
            f.write(chunk)
    if got < size:  # cut short: worth another try
        raise OSError(f"the transfer ended after {got} of {size} bytes")
    if hasher.hexdigest() != digest:
        kind = "sha256" if len(digest) == 64 else "git blob id"
        raise WrongBytes(f"the bytes served have {kind} {hasher.hexdigest()}, not the {digest} the listing gave")


def _in_time(calls: dict, seconds: float, at_once: int = LISTERS) -> dict:
    """{key: function} -> {key: (its result, None) or (None, what it raised)}, each call given `seconds` from its
    start, or NoAnswer. The calls run in daemon threads: one past its time is left behind, never joined, so
    neither a timeout nor Ctrl-C (in the main thread, which only waits here) waits for the Hub."""
    answers: queue.Queue = queue.Queue()
    todo, running, out = list(calls.items()), {}, {}

    def call(key, function):
        try:
            answers.put((key, (function(), None)))
        except BaseException as e:  # handed to the caller
            answers.put((key, (None, e)))

    while todo or running:
        while todo and len(running) < at_once:
            key, function = todo.pop(0)
            running[key] = time.monotonic() + seconds
            threading.Thread(target=call, args=(key, function), daemon=True, name="hub-request").start()
        try:
            key, answer = answers.get(timeout=max(0.0, min(running.values()) - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            for key in [k for k, due in running.items() if due <= now]:
                del running[key]
                out[key] = (None, NoAnswer(f"no answer within {seconds:g} s"))
            continue
        if running.pop(key, None) is not None:
            out[key] = answer
    return out


def _inside(path: str, folder: str) -> bool:
    """Whether `path` (itself, not what a link there points to) lies inside `folder`, both resolved."""
    here = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)))
    folder = os.path.realpath(folder)
    return here != folder and os.path.commonpath([here, folder]) == folder


def _transport_errors() -> tuple[type[Exception], ...]:
    """The connection errors (refused, timed out, dropped) of the HTTP library huggingface_hub talks through: httpx
    in 1.x, httpx2 in 2.x. `HfApi` calls raise them as they are; found through the client's public session, so the
    library is huggingface_hub's choice, not a dependency of ours."""
    import sys

    from huggingface_hub import get_session

    library = sys.modules.get(type(get_session()).__module__.partition(".")[0])
    error = getattr(library, "TransportError", None)
    return (error,) if isinstance(error, type) and issubclass(error, Exception) else ()


def _read_journal(path) -> set[str]:
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):  # none yet, or unreadable: nothing to adopt
        return set()


def _blobs(storage: str) -> list[str]:
    try:
        return os.listdir(os.path.join(storage, "blobs"))
    except FileNotFoundError:
        return []


def _shards(files, fetched) -> list[str]:
    """The shard files an index among `fetched` will list, told from the listing by transformers' shard names (the
    index itself is read only once fetched)."""
    if SAFE_INDEX_NAME in fetched:
        pattern = r"model-\d+-of-\d+\.safetensors"
    elif PICKLE_INDEX in fetched:
        pattern = r"pytorch_model-\d+-of-\d+\.bin"
    else:
        return []
    return [n for n in files if re.fullmatch(pattern, n)]


def _index_shards(index_path: str) -> list[str]:
    from .weightfiles import shard_names

    try:
        with open(index_path, encoding="utf-8") as f:
            return shard_names(json.load(f))
    except ValueError as e:
        raise CheckpointError(index_path, f"{os.path.basename(index_path)} is unusable: {e}") from None


def _size_text(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n)

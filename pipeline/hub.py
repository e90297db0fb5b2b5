"""A Hugging Face Hub repository's step revisions as checkpoints (`checkpoints.root=hf://<org>/<name>`).

Public training suites publish each intermediate checkpoint as a revision (a branch or tag) of one repository:
Pythia as `step<N>`, OLMo and OLMo 2 as `stage1-step<N>-tokens<M>B` (OLMo 1: `step<N>-tokens<M>B`). This module
is discovery for such a repository: it lists the revisions with `huggingface_hub`, reads each one's training step
(and tokens seen) from its name, and yields one Checkpoint record per step whose `path` is the revision's
snapshot folder in the Hugging Face cache. Replay reads that folder like any other checkpoint folder.

The files are not there yet: the driver asks this source to fetch them a few checkpoints ahead of the replay
(`start`, `ready`) and to free them once the step is stored (`release`), so that a suite of a hundred checkpoints
of a large model never takes more disk than `checkpoints.cache_limit`. Only config.json and safetensors are
fetched; a revision with only pickled weights is skipped unless `checkpoints.allow_torch_pickle=true`, which
reads them with `torch.load(weights_only=True)` and writes a safetensors copy for replay.

Downloads go through `hf_hub_download` into the standard cache (HF_HUB_CACHE), which writes each file to a
temporary name and renames it only when complete, so an interrupted download never passes for a finished one.
Files that were in the cache before the run are never deleted. Offline (HF_HUB_OFFLINE=1, or when the Hub cannot
be reached), the revisions already in the cache (`models--<org>--<name>/refs/<revision>` and `snapshots/`) are
replayed and the others reported.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

from .errors import CheckpointError, UsageError, describe, some
from .locations import sinktrace_home, write_json_atomic
from .records import Checkpoint
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
        refs = self._cached_refs() if self.offline else self._listed_refs()
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
            entries = api.list_repo_tree(self.repo_id, revision=rev.commit)
            return {e.path: (e.size, e.lfs.sha256 if e.lfs else e.blob_id) for e in entries if isinstance(e, RepoFile)}

        new = [] if self.offline else [rev for rev in revisions if rev.commit not in self._cached_files]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = {pool.submit(listing, rev): rev for rev in new}
            for future, rev in futures.items():
                try:
                    self._cached_files[rev.commit] = future.result()
                except Exception as e:  # this revision is retried by the next run
                    rev.listing_error = describe(e)
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

    def first_config(self, ready: list[Checkpoint]) -> str:
        """The folder of the first of `ready` whose config.json could be fetched (the run's probe is built from
        it); UsageError when none could."""
        errors = []
        for ckpt in ready:
            rev = self.revisions[ckpt.step]
            try:
                path = self._download(rev, CONFIG_NAME)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            return os.path.dirname(path)
        raise UsageError(
            f"checkpoints.root={self.root}: no revision's {CONFIG_NAME} could be fetched: {some(errors, 1)}"
        )

    def start(self, todo: list[Checkpoint]) -> None:
        """Fetch the checkpoints of `todo` in order, in the background, within the cache limit."""
        with self._cond:
            self._closed = False
        self._ready = queue.Queue()
        self._thread = threading.Thread(target=self._fetch_all, args=(list(todo),), daemon=True, name="hub-fetch")
        self._thread.start()

    def take(self) -> tuple[Checkpoint, Exception | None]:
        """The next checkpoint fetched (in the order of `start`), with None or why its fetch failed; waits for it."""
        return self._ready.get()

    def poll(self) -> list[tuple[Checkpoint, Exception | None]]:
        """The checkpoints fetched since the last call, without waiting."""
        out = []
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
                self._ready.put((ckpt, None))
            except Exception as e:  # the step fails; the others go on
                self._ready.put((ckpt, e))

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
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        snapshot = os.path.join(self.storage, "snapshots", rev.commit)
        pointer = os.path.join(snapshot, name)
        url = f"{PREFIX}{self.repo_id}@{rev.name}/{name}"
        # the blob's name is the file's etag: the sha256 the listing gave for an LFS file, else its git blob id
        known_blob = os.path.join(self.storage, "blobs", rev.files[name][1]) if name in rev.files else None
        with self._files_lock:
            # another step (two revisions of one commit, or of the same weights) or a killed run may have fetched
            # it: then it is ours to delete too, once every step that uses it is released
            present = os.path.exists(pointer)
            for path in (pointer, os.path.realpath(pointer)) if present else (known_blob,):
                if path is not None and (path in self._leftover or self._held_elsewhere(path)):
                    self._leftover.discard(path)
                    self._own(rev.step, path)
            if present:
                return pointer
            blobs_before = set(_blobs(self.storage))
        if self.offline:
            raise CheckpointError(url, "not in the local Hugging Face cache, and the Hub is offline")
        for attempt in range(TRIES):
            try:
                # by name, so that the cache records refs/<revision> for later offline runs
                path = hf_hub_download(self.repo_id, name, revision=rev.name, cache_dir=self.cache_dir)
                break
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status is not None and 400 <= status < 500 and status != 429:
                    raise CheckpointError(url, f"the Hub refused it: {describe(e)}") from None
                error = e
            except Exception as e:  # a dropped connection, a timeout, a full disk
                error = e
            if attempt + 1 < TRIES:
                time.sleep(RETRY_WAIT * 2**attempt)
        else:
            raise CheckpointError(url, f"download failed {TRIES} times, last: {describe(error)}")
        self._remember(rev.step, pointer, blobs_before)
        if os.path.realpath(os.path.dirname(path)) != os.path.realpath(snapshot):
            raise CheckpointError(
                url,
                f"the revision moved to another commit since it was listed "
                f"(was {rev.commit[:12]}); rerun to replay its new weights",
            )
        return path

    def _remember(self, step: int, pointer: str, blobs_before: set[str]) -> None:
        blob = os.path.realpath(pointer)
        with self._files_lock:
            if os.path.basename(blob) not in blobs_before and blob not in self._downloaded.get(step, ()):
                self._own(step, blob)
            self._own(step, pointer)

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
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                    os.rmdir(os.path.dirname(path))  # an emptied snapshot folder goes too
                except OSError:
                    pass
        self._write_journal()


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

"""A Hub repository's step revisions: their names read as steps, their files listed, each one's Checkpoint record."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from functools import partial

from ...errors import UsageError, describe, some
from ...records import Checkpoint
from ..weightfiles import CONFIG_NAME, SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME, pickled_weights, pickles_refused
from .transfer import NoAnswer, in_time, transport_errors

log = logging.getLogger(__package__)

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
# the shapes of the Hub's ids, the only ones used in paths: a commit (git sha1), a git blob id, an LFS sha256
COMMIT = re.compile(r"[0-9a-f]{40}")
HASHES = {40: re.compile(r"[0-9a-f]{40}"), 64: re.compile(r"[0-9a-f]{64}")}
MAX_STEP = 2**63 - 1  # steps are stored as int64


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


def step_revisions(refs: dict[str, str], patterns, root: str, offline: bool) -> dict[int, list[Revision]]:
    """The revisions of `refs` ({name: commit}) named like a step, by step; warns of those skipped.

    Raises:
        UsageError: no revision is named like a step.
    """
    by_step: dict[int, list[Revision]] = {}
    unmatched = []
    for name, commit in sorted(refs.items()):
        parsed = parse_revision(name, patterns)
        if parsed is None:
            unmatched.append(name)
        elif not COMMIT.fullmatch(str(commit)):  # it would name the revision's folders
            log.warning(
                "%s: skipped revision %s: the Hub gives its commit as %r, not 40 hex digits",
                root,
                name,
                str(commit)[:80],
            )
        elif parsed[0] > MAX_STEP:
            log.warning("%s: skipped revision %s: its step does not fit in 64 bits", root, name)
        else:
            by_step.setdefault(parsed[0], []).append(Revision(name, commit, *parsed))
    if not by_step:
        where = "in the local Hugging Face cache" if offline else "on the Hub"
        found = f"its revisions ({some(sorted(refs))})" if refs else "no revision at all"
        raise UsageError(
            f"checkpoints.root={root}: {where} it has {found}, none named like a step "
            f"({' or '.join(patterns)}); give checkpoints.revision_pattern, a regex with a group (?P<step>...)"
        )
    if unmatched:
        log.warning(
            "%s: skipped %d revision(s) whose names match no revision pattern: %s",
            root,
            len(unmatched),
            some(unmatched),
        )
    return by_step


def listed_refs_in_time(root: str, repo_id: str, request_timeout: float) -> dict[str, str] | None:
    """{revision name: commit} as the Hub lists them, or None when the Hub cannot be reached."""
    importlib.import_module("huggingface_hub.hf_api")  # before the clock starts: it is not the Hub's time
    ((refs, error),) = in_time({0: partial(listed_refs, root, repo_id)}, request_timeout).values()
    if isinstance(error, NoAnswer):
        raise UsageError(
            f"checkpoints.root={root}: the Hub sent no list of revisions within "
            f"checkpoints.request_timeout={request_timeout:g} s"
        )
    if error is not None:
        raise error
    return refs


def listed_refs(root: str, repo_id: str) -> dict[str, str] | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        refs = HfApi().list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        raise UsageError(
            f"checkpoints.root={root}: no model repository {repo_id} on the Hub (or it is private "
            "or gated: log in with `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise UsageError(f"checkpoints.root={root}: the Hub refused the listing: {describe(e)}") from None
    except (*transport_errors(), OSError) as e:  # no network: the cache, as the Hub's own client falls back to
        log.warning("%s: cannot reach the Hub (%s); replaying what the local cache holds", root, describe(e))
        return None
    return {r.name: r.target_commit for r in [*refs.branches, *refs.tags]}


def cached_refs(root: str, repo_id: str, cache_dir: str, cached_files: dict) -> dict[str, str]:
    """{revision name: commit} as the local Hugging Face cache holds them; each commit's files go to
    `cached_files`."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        cache = None
    repos = cache.repos if cache is not None else ()
    repo = next((r for r in repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise UsageError(
            f"checkpoints.root={root}: offline, and the local Hugging Face cache ({cache_dir}) holds "
            f"no revision of {repo_id}"
        )
    refs = {}
    for rev in repo.revisions:
        files = {
            f.file_path.relative_to(rev.snapshot_path).as_posix(): (f.size_on_disk, f.blob_path.name) for f in rev.files
        }
        cached_files[rev.commit_hash] = files
        for ref in rev.refs:
            refs[ref] = rev.commit_hash
    return refs


def list_files(
    repo_id: str, revisions: list[Revision], request_timeout: float, cached_files: dict, offline: bool
) -> None:
    """Each revision's top-level files, with sizes and the Hub's sha256 of each weight file (LFS)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()

    def listing(rev):
        files = {}
        for e in api.list_repo_tree(repo_id, revision=rev.commit):
            if isinstance(e, RepoFile):
                digest = e.lfs.sha256 if e.lfs else e.blob_id
                # the blob's file name, and what the bytes are checked against
                if not HASHES[64 if e.lfs else 40].fullmatch(str(digest)):
                    raise ValueError(f"the Hub lists {e.path} with hash {str(digest)[:80]!r}, not hex digits")
                files[e.path] = (e.size, digest)
        return files

    new = [] if offline else [rev for rev in revisions if rev.commit not in cached_files]
    answers = in_time({i: partial(listing, rev) for i, rev in enumerate(new)}, request_timeout)
    for i, (files, error) in sorted(answers.items()):
        rev = new[i]
        if error is None:
            cached_files[rev.commit] = files
        elif isinstance(error, Exception):  # this revision is retried by the next run
            rev.listing_error = describe(error)
        else:
            raise error
    for rev in revisions:
        rev.files = cached_files.get(rev.commit, {})


def record(
    rev: Revision, others: list[Revision], repo_id: str, storage: str, converted, offline: bool, allow_pickle: bool
) -> Checkpoint:
    """The revision's Checkpoint record; `others`: further revisions claiming its step."""
    snapshot = os.path.join(storage, "snapshots", rev.commit)
    problems = []
    if rev.listing_error:
        problems.append(f"its file list could not be read: {rev.listing_error}")
    elif CONFIG_NAME not in rev.files:
        problems.append(f"{CONFIG_NAME} is {'not in the local cache' if offline else 'missing'}")
    weights, pickled = weight_names(rev.files)
    if not problems and not weights:
        pickles = pickled_weights(rev.files)
        if pickled and allow_pickle:
            rev.pickled = True
            weights = pickled
        elif pickles:
            problems.append(
                pickles_refused(pickles) + ", or set checkpoints.allow_torch_pickle=true to read "
                "them with torch.load(weights_only=True)"
            )
        elif offline:
            problems.append("its weights are not in the local Hugging Face cache (offline)")
        else:
            problems.append(f"no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
    if others:
        problems.append(
            f"revisions {', '.join(r.name for r in [rev, *others])} all claim step {rev.step}; "
            "narrow checkpoints.revision_pattern to one of them"
        )
    rev.fetch = [CONFIG_NAME, *weights] if not problems else []
    path = str(converted / rev.commit) if rev.pickled else snapshot
    # the Hub's own digests: sha256 of each LFS file (the weights), git's blob id of the others
    digested = sorted({*weights, *shards(rev.files, weights)} & set(rev.files))
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
            "repository": repo_id,
            "revision": rev.name,
            "commit": rev.commit,
            "weights_sha256": digest if digested else "",
        },
    )


def weight_names(files) -> tuple[list[str], list[str]]:
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


def flag_duplicates(records: list[Checkpoint], root: str) -> list[Checkpoint]:
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
                root,
                ", ".join(map(str, steps)),
                ", ".join(c.provenance["revision"] for c in group),
                digest[:16],
            )
            for c in group:
                c.provenance["same_weights_as"] = [s for s in steps if s != c.step]
    return records


def shards(files, fetched) -> list[str]:
    """The shard files an index among `fetched` will list, told from the listing by transformers' shard names (the
    index itself is read only once fetched)."""
    if SAFE_INDEX_NAME in fetched:
        pattern = r"model-\d+-of-\d+\.safetensors"
    elif PICKLE_INDEX in fetched:
        pattern = r"pytorch_model-\d+-of-\d+\.bin"
    else:
        return []
    return [n for n in files if re.fullmatch(pattern, n)]

"""The tokenizer a text probe is tokenized with, where it comes from, and whether later checkpoints share it.

Looked for, in order: `probe.tokenizer` (a local folder, or a Hub repository id `org/name[@revision]` loaded through
transformers, which reads the Hub cache and works offline from it); the tokenizer files in the first checkpoint's
folder; those beside `checkpoints.model_config`; for `hf://` roots, those of the first revision, fetched into the
Hugging Face cache the way its weights are (pipeline/checkpoints/hub.py). None anywhere: a usage error naming
`probe.tokenizer`.

A tokenizer is identified by the sha256 of its vocabulary (every token and its id, added tokens included). Without
`probe.tokenizer`, a later checkpoint whose own tokenizer files give another vocabulary fails its step: the probe's
ids would mean other text to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, UsageError, describe
from ..locations import check_read_size, is_url, local_path
from ..records import Checkpoint, Probe

# The files transformers builds a tokenizer from; a folder holds a tokenizer when it has one of MAIN_FILES.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
HUB_ID = re.compile(r"(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")

# the vocabulary hash of each set of tokenizer files seen (keyed by the files' digest): each is loaded once
_VOCABS: dict[str, str] = {}


@dataclass
class Loaded:
    tokenizer: Any  # a transformers tokenizer
    name: str  # where it came from: a folder, a Hub repository id, hf://<org>/<name>@<revision>
    vocab_sha256: str


def vocab_sha256(tokenizer) -> str:
    """sha256 of the vocabulary as JSON `[[token, id], ...]` sorted by id (added tokens included)."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def probe_tokenizer(setting: str | None, first: Checkpoint, source=None, vocab: int | None = None) -> Loaded:
    """The tokenizer for a text probe: `probe.tokenizer` when set, else the first checkpoint's own (module
    docstring); UsageError when there is none, it cannot be loaded, or its files are far too large for a model of
    `vocab` ids."""
    if setting:
        return _pinned(str(setting), vocab)
    for folder, name, key in _candidates(first, source):
        if _has_tokenizer(folder):
            loaded = _load(folder, name, vocab)
            # the checkpoints whose tokenizer files are these (by bytes, or by the Hub's hashes) need no loading
            _VOCABS[key or _files_key(folder)] = loaded.vocab_sha256
            return loaded
    looked = [name for _, name, _ in _candidates(first, source, fetch=False)]
    raise UsageError(
        f"probe=text needs a tokenizer and found none (looked in {', '.join(looked)}): give probe.tokenizer= a "
        "folder with tokenizer.json (or the tokenizer's other files) or a Hub repository id"
    )


def changed_tokenizers(cfg, probe: Probe, checkpoints: list[Checkpoint], source=None) -> dict[int, str]:
    """{step: error} for the checkpoints whose own tokenizer files give another vocabulary than the one `probe` was
    tokenized with (never when `probe.tokenizer` pins one, or for other probe kinds)."""
    if probe.kind != "text" or cfg.get("tokenizer"):
        return {}
    changed = {}
    for ckpt in checkpoints:
        try:
            vocab = _vocab_of(ckpt, source)
        except Exception as e:  # a tokenizer that cannot be read cannot vouch for the probe's ids: the step fails
            changed[ckpt.step] = f"TokenizerError: its tokenizer could not be read ({describe(e)})"
            continue
        if vocab is not None and vocab != probe.vocab_sha256:
            changed[ckpt.step] = (
                f"TokenizerError: its tokenizer's vocabulary (sha256 {vocab[:12]}) differs from the one the probe was "
                f"tokenized with ({probe.tokenizer}, sha256 {(probe.vocab_sha256 or '')[:12]}); pin one with "
                "probe.tokenizer="
            )
    return changed


def _vocab_of(ckpt: Checkpoint, source) -> str | None:
    """The vocabulary hash of the tokenizer files in a checkpoint's own folder (None: it has none)."""
    if _from_hub(source):
        names, key = _listed(source, ckpt.step)
        if key is None:
            return None
        if key not in _VOCABS:
            folder = source.fetch_files(ckpt.step, names)
            _VOCABS[key] = _load(folder, folder).vocab_sha256
        return _VOCABS[key]
    with _local_copy(_folder(ckpt.path)) as folder:
        if folder is None or not _has_tokenizer(folder):
            return None
        key = _files_key(folder)
        if key not in _VOCABS:
            _VOCABS[key] = _load(folder, folder).vocab_sha256
        return _VOCABS[key]


def _from_hub(source) -> bool:
    """Whether `source` is a Hub repository: only the Hub lists a revision's tokenizer files with their hashes (so
    that identical files are not fetched again) and fetches them on demand; a folder's are on its path."""
    from ..checkpoints.hub import HubRun

    return isinstance(source, HubRun)


def _listed(source, step: int) -> tuple[list[str], str | None]:
    """A Hub revision's tokenizer files, and a digest of the hashes its listing gives them (None: it has none)."""
    rev = source.revisions.get(step)
    names = [n for n in TOKENIZER_FILES if rev is not None and n in rev.files]
    if not any(n in MAIN_FILES for n in names):
        return names, None
    return names, hashlib.sha256("".join(f"{n}:{rev.files[n][1]}\n" for n in names).encode()).hexdigest()


def _pinned(setting: str, vocab: int | None) -> Loaded:
    path = local_path(setting)
    if os.path.isdir(path):
        if not _has_tokenizer(path):
            raise UsageError(f"probe.tokenizer={setting}: that folder holds none of {', '.join(MAIN_FILES)}")
        return _load(path, path, vocab)
    match = HUB_ID.fullmatch(setting)
    if match is None:
        raise UsageError(f"probe.tokenizer={setting}: neither a folder nor a Hub repository id (org/name)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(match["repo"], revision=match["revision"])
    except Exception as e:
        raise UsageError(
            f"probe.tokenizer={setting}: no such folder, and the Hub repository {match['repo']} gave no tokenizer "
            f"(offline, it must be in the Hugging Face cache): {describe(e)}"
        ) from None
    return Loaded(tokenizer, setting.removeprefix("hf://"), vocab_sha256(tokenizer))


def _candidates(first: Checkpoint, source, fetch: bool = True):
    """(local folder, name, digest of the Hub's hashes of its files or None) of each place the first checkpoint's
    tokenizer may be, in order; lazily, since a Hub revision's files are fetched only when reached."""
    if _from_hub(source):
        rev = source.revisions.get(first.step)
        name = f"{source.root}@{rev.name}" if rev is not None else source.root
        names, key = _listed(source, first.step)
        if fetch and key is not None:
            yield source.fetch_files(first.step, names), name, key
        elif not fetch:
            yield None, f"the files of {name}", None
    elif is_url(first.path):
        if fetch:
            with _local_copy(first.path) as folder:
                if folder is not None and _has_tokenizer(folder):
                    yield folder, first.path, None
        else:
            yield None, first.path, None
    else:
        yield _folder(first.path), _folder(first.path), None
    if first.model_config:
        beside = _folder(first.model_config)
        yield beside, beside, None


class _local_copy:
    """A checkpoint folder's tokenizer files on the local disk: the folder itself, or for a URL a temporary copy."""

    def __init__(self, path: str):
        self.path, self.tmp = path, None

    def __enter__(self) -> str | None:
        if not is_url(self.path):
            return self.path if os.path.isdir(self.path) else None
        import fsspec

        fs, remote = fsspec.core.url_to_fs(self.path)
        self.tmp = tempfile.mkdtemp(prefix="sinktrace-tokenizer-")
        for name in TOKENIZER_FILES:
            path = posixpath.join(remote, name)
            if fs.isfile(path):
                _check_read_size(fs.unstrip_protocol(path), fs.size(path))  # before it is fetched and read whole
                fs.get_file(path, os.path.join(self.tmp, name))
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _folder(path: str) -> str:
    path = path if is_url(path) else local_path(path)
    return path if is_url(path) or not os.path.isfile(path) else os.path.dirname(path)


def _has_tokenizer(folder: str | None) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, n)) for n in MAIN_FILES)


def _files_key(folder: str) -> str:
    """A digest of the tokenizer files' names and bytes: equal files, equal tokenizer."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())  # read in blocks
    return h.hexdigest()


# A tokenizer's files take well under this per token id (the largest public ones, with their merges, about 130
# bytes): files larger than this for the model's vocabulary cannot be its tokenizer, and are never loaded.
BYTES_PER_ID = 1024
BYTES_SLACK = 16 << 20


def check_size(folder: str, name: str, vocab: int | None) -> None:
    """UsageError, before anything is loaded, when the tokenizer files in `folder` are larger than any tokenizer of
    `vocab` ids would be (a vocabulary that cannot fit the model, which loading would spend minutes and gigabytes
    on), or than `checkpoints.max_read_size` allows for a file read whole (every checkpoint's tokenizer)."""
    bound = BYTES_PER_ID * vocab + BYTES_SLACK if vocab is not None else None
    for file in TOKENIZER_FILES:
        path = os.path.join(folder, file)
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        _check_read_size(path, size)
        if bound is not None and size > bound:
            raise UsageError(
                f"probe.tokenizer: {os.path.join(name, file)} is {size:,} bytes, more than a tokenizer of the model's "
                f"{vocab:,} token ids takes (at most {bound:,}, from its config.json's vocab_size): its vocabulary "
                "cannot fit the model; give probe.tokenizer= the model's own tokenizer"
            )


def _check_read_size(path: str, size: int) -> None:
    """UsageError naming the file, its size and `checkpoints.max_read_size` when a tokenizer file exceeds it."""
    try:
        check_read_size(path, size)
    except CheckpointError as e:
        raise UsageError(f"probe.tokenizer: {e}") from None


def _load(folder: str, name: str, vocab: int | None = None) -> Loaded:
    from transformers import AutoTokenizer

    check_size(folder, name, vocab)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UsageError(
            f"probe.tokenizer: the tokenizer files in {name} could not be loaded ({describe(e)}); give "
            "probe.tokenizer= another folder or a Hub repository id"
        ) from None
    return Loaded(tokenizer, name, vocab_sha256(tokenizer))

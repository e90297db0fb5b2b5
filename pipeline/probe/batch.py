"""Build the probe: the fixed token batch every checkpoint is measured on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..choices import FIRST_TOKENS
from ..errors import CheckpointError, UsageError
from ..locations import check_read_size
from ..records import Checkpoint, Probe


def special_token_ids(model_config: dict) -> set[int]:
    ids = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = model_config.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                ids.add(v)
    return ids


def vocab_size(model_config: dict) -> int:
    size = model_config.get("vocab_size")
    if size is None and isinstance(model_config.get("text_config"), dict):
        size = model_config["text_config"].get("vocab_size")
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"config.json has no usable vocab_size (got {size!r})")
    return size


def resolve_first_token(policy: str, model_config: dict) -> str:
    if policy == "auto":
        return "bos" if isinstance(model_config.get("bos_token_id"), int) else "keep"
    if policy not in FIRST_TOKENS:
        raise ValueError(f"probe.first_token={policy!r}: expected one of {', '.join(FIRST_TOKENS)}")
    if policy == "bos" and not isinstance(model_config.get("bos_token_id"), int):
        raise ValueError("probe.first_token=bos, but the model's config.json names no bos_token_id")
    return policy


def tokens_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def build_probe(cfg, model_config: dict, first: Checkpoint | None = None, hub=None) -> Probe:
    """The probe for `cfg` (the `probe` config group) and a model config (the checkpoint's config.json). A text
    probe is tokenized with the tokenizer of `first`, the first checkpoint (a revision of `hub`, a HubRun), unless
    `probe.tokenizer` names one (`tokenizer`)."""
    vocab = vocab_size(model_config)
    first_token = resolve_first_token(cfg.first_token, model_config)
    rng = np.random.default_rng(cfg.seed)
    text = {}
    if cfg.kind == "random":
        if cfg.seq_len < 2 or cfg.rows < 1:
            raise ValueError(f"probe.seq_len must be >= 2 and probe.rows >= 1 (got {cfg.seq_len}, {cfg.rows})")
        tokens = rng.integers(0, vocab, size=(cfg.rows, cfg.seq_len), dtype=np.int64)
        source = None
        default_name = f"random-T{cfg.seq_len}-r{cfg.rows}-s{cfg.seed}-{first_token}"
    elif cfg.kind == "tokens":
        tokens = load_token_file(cfg.path, vocab)
        source = str(Path(cfg.path).resolve())
        default_name = f"tokens-{Path(cfg.path).stem}-{tokens_hash(tokens)[:8]}-{first_token}"
    elif cfg.kind == "text":
        tokens, text = text_tokens(cfg, first, hub, rng, vocab)
        check_in_vocab(tokens, vocab, f"probe.tokenizer ({text['tokenizer']}) on probe.path={cfg.path}")
        source = str(Path(cfg.path).expanduser().resolve())
        default_name = (
            f"text-{Path(cfg.path).stem}-{cfg.packing}-T{cfg.seq_len}-r{cfg.rows}-{tokens_hash(tokens)[:8]}-"
            f"{first_token}"
        )
    else:
        raise ValueError(f"probe.kind={cfg.kind!r}: expected random, tokens or text")

    tokens = apply_first_token(tokens, first_token, model_config, rng)
    return Probe(
        name=cfg.name or default_name,
        kind=cfg.kind,
        tokens=tokens,
        seed=cfg.seed,
        first_token=first_token,
        source=source,
        **text,
    )


def text_tokens(cfg, first: Checkpoint | None, hub, rng, vocab: int | None = None) -> tuple[np.ndarray, dict]:
    """The rows of a text probe and what identifies them (packing, text and vocabulary hashes, tokenizer)."""
    from .text import rows_of_text
    from .tokenizer import probe_tokenizer

    if first is None and not cfg.get("tokenizer"):
        raise UsageError("probe=text needs a tokenizer: give probe.tokenizer= a folder or a Hub repository id")
    loaded = probe_tokenizer(cfg.get("tokenizer"), first, hub, vocab)
    separator = loaded.tokenizer.eos_token_id
    tokens, text_sha256 = rows_of_text(
        str(cfg.path), loaded.tokenizer, cfg.packing, cfg.seq_len, cfg.rows, rng, separator
    )
    return tokens, {
        "packing": cfg.packing,
        "text_sha256": text_sha256,
        "tokenizer": loaded.name,
        "vocab_sha256": loaded.vocab_sha256,
    }


def apply_first_token(tokens: np.ndarray, policy: str, model_config: dict, rng) -> np.ndarray:
    tokens = tokens.copy()
    if policy == "bos":
        tokens[:, 0] = model_config["bos_token_id"]
    elif policy == "random":
        # a fresh non-special token per row: is the sink tied to position 0 or to the token there?
        special = special_token_ids(model_config)
        allowed = np.setdiff1d(np.arange(vocab_size(model_config)), np.fromiter(special, dtype=np.int64))
        tokens[:, 0] = rng.choice(allowed, size=tokens.shape[0])
    return tokens


def load_token_file(path: str, vocab: int) -> np.ndarray:
    try:
        check_read_size(path, os.path.getsize(path))  # np.load reads it whole
        tokens = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"probe.path={path}: no such file") from None
    except CheckpointError as e:
        raise ValueError(f"probe.path={path}: {e.problem}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"probe.path={path}: not a readable .npy array ({e})") from None
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"probe.path={path}: expected an integer array [rows, T], got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise ValueError(f"probe.path={path}: needs at least one row of at least 2 tokens, got shape {tokens.shape}")
    check_in_vocab(tokens, vocab, f"probe.path={path}")
    return tokens.astype(np.int64)


def check_in_vocab(tokens: np.ndarray, vocab: int, what: str) -> None:
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"{what}: token id {int(tokens[row, col])} at row {row}, position {col} is outside the model's "
            f"vocabulary [0, {vocab}) ({int(bad.sum())} ids out of range)"
        )


def probe_attrs(probe: Probe) -> dict:
    """The probe as store attributes (docs/data.md: kind, seed, length, rows, first-token policy, hash of ids)."""
    return {
        "probe_name": probe.name,
        "probe_kind": probe.kind,
        "probe_seed": probe.seed,
        "probe_seq_len": probe.seq_len,
        "probe_rows": probe.rows,
        "probe_first_token": probe.first_token,
        "probe_tokens_sha256": tokens_hash(probe.tokens),
        "probe_source": probe.source or "",
        **(
            {
                "probe_packing": probe.packing,
                "probe_text_sha256": probe.text_sha256,
                "probe_tokenizer": probe.tokenizer,
                "probe_vocab_sha256": probe.vocab_sha256,
            }
            if probe.kind == "text"
            else {}
        ),
    }


def open_store(location: str, probe: Probe):
    """The writer of `probe`'s group; UsageError when the group holds another probe's results (the same
    `probe.name` given to other token ids)."""
    from ..store.cube import SinkStore

    store = SinkStore(location, probe.name)
    stored = store.attrs().get("probe_tokens_sha256")
    if stored and stored != tokens_hash(probe.tokens):
        raise UsageError(
            f"store.path={location}: group {probe.name!r} holds the results of other probe token ids (sha256 "
            f"{stored[:12]}, this probe's {tokens_hash(probe.tokens)[:12]}); give this probe another probe.name"
        )
    return store

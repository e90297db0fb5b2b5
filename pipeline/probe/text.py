"""A probe of real text (`probe=text`): the documents of a text file, and the rows cut from their token ids.

The file is a text file whose documents are separated by blank lines, or JSON lines (`.jsonl`, `.ndjson`,
`.json`) with a `text` field per line. It is read whole and checked before any checkpoint is: a missing, empty or
binary file, or a JSON line without `text`, is a one-line error naming the file (and the line).

Two packings:

* `document`: each row is the first `seq_len` tokens of one document; the documents long enough are drawn with the
  probe's seed (without replacement, kept in file order);
* `stream`: the documents' token ids joined into one stream, the tokenizer's EOS id between two documents (as
  GPT-2-style pretraining data is packed), and each row cut at a seeded offset, so that position 0 holds whatever
  token falls there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from ..choices import PACKINGS

JSON_LINES = (".jsonl", ".ndjson", ".json")
BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def read_documents(path: str) -> tuple[list[str], str]:
    """The documents of the file at `path` and the sha256 of its bytes; ValueError naming the file (and the line)
    when it is missing, empty, binary or not the JSON lines its name says."""
    where = f"probe.path={path}"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: a folder, not a text file") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    if b"\0" in data:
        raise ValueError(f"{where}: a binary file (it holds NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start} cannot be decoded): a binary file?") from None
    if path.lower().endswith(JSON_LINES):
        documents = _json_lines(text, where)
    else:
        documents = [d.strip() for d in BLANK_LINE.split(text.replace("\r\n", "\n"))]
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"{where}: empty, no text in it")
    return documents, hashlib.sha256(data).hexdigest()


def _json_lines(text: str, where: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {number}: not JSON ({e.msg}); give one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{where}, line {number}: no "text" field holding a string')
        documents.append(record["text"])
    return documents


def pack(
    documents: list[list[int]], packing: str, seq_len: int, rows: int, rng, separator: int | None, where: str
) -> np.ndarray:
    """Rows of `seq_len` token ids [rows, seq_len] cut from each document's ids, as `packing` says (the module's
    docstring); ValueError naming `where` when the text is too short for them."""
    if packing == "document":
        long_enough = [i for i, ids in enumerate(documents) if len(ids) >= seq_len]
        if len(long_enough) < rows:
            raise ValueError(
                f"{where}: {len(long_enough)} of its {len(documents)} document(s) have at least probe.seq_len="
                f"{seq_len} tokens, and probe.rows={rows} needs {rows}: lower probe.rows or probe.seq_len, or use "
                "probe.packing=stream"
            )
        chosen = np.sort(rng.choice(np.asarray(long_enough), size=rows, replace=False))
        return np.asarray([documents[i][:seq_len] for i in chosen], dtype=np.int64)
    if packing == "stream":
        stream = []
        for i, ids in enumerate(documents):
            if i and separator is not None:
                stream.append(separator)
            stream.extend(ids)
        if len(stream) < seq_len:
            raise ValueError(f"{where}: {len(stream)} tokens in all, shorter than one row of probe.seq_len={seq_len}")
        starts = len(stream) - seq_len + 1
        offsets = rng.choice(starts, size=rows, replace=starts < rows)
        stream = np.asarray(stream, dtype=np.int64)
        return np.stack([stream[o : o + seq_len] for o in offsets])
    raise ValueError(f"probe.packing={packing}: choose from {', '.join(PACKINGS)}")

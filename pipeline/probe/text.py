"""A probe of real text (`probe=text`): the documents of a text file, and the rows cut from their token ids.

The file is a text file whose documents are separated by blank lines, or JSON lines (`.jsonl`, `.ndjson`,
`.json`) with a `text` field per line. It is checked before any checkpoint is: a missing, empty or binary file, or a
JSON line without `text`, is a one-line error naming the file (and the line).

Two packings:

* `document`: each row is the first `seq_len` tokens of one document; the documents long enough are drawn with the
  probe's seed (without replacement, kept in file order);
* `stream`: the documents' token ids joined into one stream, the tokenizer's EOS id between two documents (as
  GPT-2-style pretraining data is packed), and each row cut at a seeded offset, so that position 0 holds whatever
  token falls there.

The file is read in blocks and only what the rows need is kept and tokenized, so that memory stays a small multiple
of the probe whatever the file's size: of each document its first `CHARS_PER_TOKEN * seq_len` characters (a
document whose first characters hold fewer than `seq_len` tokens counts as too short), and with `stream` only the
first `rows * seq_len` tokens of the stream (a longer text's rows are cut from them).
"""

from __future__ import annotations

import array
import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..choices import PACKINGS

JSON_LINES = (".jsonl", ".ndjson", ".json")
BLOCK = 1 << 16  # bytes read at a time
# what of a document can reach a row: far more characters than any tokenizer's seq_len tokens take in real text
CHARS_PER_TOKEN = 32
# a JSON line is parsed whole: longer ones (a single document of tens of megabytes) belong in a plain text file
MAX_JSON_LINE = 64 << 20
HORIZONTAL_SPACE = " \t\r\f\v"  # a line of only these is blank, and separates two documents
TOKENIZE_AT_ONCE = 256  # documents handed to the tokenizer in one call


@dataclass
class Document:
    text: str  # the document, or its first characters
    cut: bool  # whether more of it followed


def check_text(path: str) -> None:
    """ValueError naming the file (and the line) when the text file at `path` is missing, empty, binary or not the
    JSON lines its name says. It is read through in blocks, holding no document: a bad line fails here, before any
    checkpoint is read, not in the middle of a run."""
    if not sum(1 for _ in documents(path, 0)):
        raise ValueError(f"probe.path={path}: empty, no text in it")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    for _ in _text_blocks(path, f"probe.path={path}", digest):
        pass
    return digest.hexdigest()


def documents(path: str, max_chars: int | None) -> Iterator[Document]:
    """Each document of the file (stripped), at most `max_chars` characters of it (None: whole); ValueError naming
    the file as `check_text` says."""
    where = f"probe.path={path}"
    lines = _lines(_text_blocks(path, where, None))
    if path.lower().endswith(JSON_LINES):
        yield from _json_documents(lines, max_chars, where)
    else:
        yield from _plain_documents(lines, max_chars)


def _text_blocks(path: str, where: str, digest) -> Iterator[str]:
    try:
        f = open(os.path.expanduser(path), "rb")  # noqa: SIM115 (closed below, after the generator's last block)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: a folder, not a text file") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset = 0
    with f:
        while True:
            try:
                block = f.read(BLOCK)
            except OSError as e:
                raise ValueError(f"{where}: cannot be read ({e.strerror or e})") from None
            if b"\0" in block:
                raise ValueError(f"{where}: a binary file (it holds NUL bytes), not text")
            if digest is not None:
                digest.update(block)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                raise ValueError(f"{where}: not UTF-8 text (byte {at} cannot be decoded): a binary file?") from None
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _lines(blocks: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """(a piece of a line without its end, whether the line ends there): a line longer than a block comes in
    pieces, so that no line is ever held whole."""
    rest = ""
    for text in blocks:
        parts = (rest + text).split("\n")
        rest = parts.pop()
        for part in parts:
            yield part.removesuffix("\r"), True
        if len(rest) >= BLOCK:
            yield rest, False
            rest = ""
    if rest:
        yield rest.removesuffix("\r"), True


def _plain_documents(lines, max_chars: int | None) -> Iterator[Document]:
    """The documents between blank lines, each stripped and at most `max_chars` characters long."""
    kept: list[str] = []
    size, cut = 0, False
    blank, spaces = True, ""  # whether the line so far holds only horizontal space, and that space

    def keep(text: str) -> None:
        nonlocal size, cut
        if not kept:
            text = text.lstrip()
        room = len(text) if max_chars is None else max(0, max_chars - size)
        if text[room:].strip():
            cut = True
        if text[:room]:
            kept.append(text[:room])
            size += min(room, len(text))

    for piece, ends in lines:
        if blank and not piece.strip(HORIZONTAL_SPACE):
            if not ends:
                spaces = (spaces + piece)[: BLOCK if max_chars is None else max_chars]
                continue
            if kept or cut:  # a blank line ends the document
                yield Document("".join(kept).rstrip() if not cut else "".join(kept), cut)
            kept, size, cut, spaces = [], 0, False, ""
            continue
        keep(spaces + piece + ("\n" if ends else ""))
        blank, spaces = ends, ""
    if kept or cut:
        yield Document("".join(kept).rstrip() if not cut else "".join(kept), cut)


def _limited(text: str, max_chars: int | None) -> Document:
    if max_chars is not None and len(text) > max_chars:
        return Document(text[:max_chars], True)
    return Document(text, False)


def _json_documents(lines, max_chars: int | None, where: str) -> Iterator[Document]:
    line: list[str] = []
    size, number = 0, 0
    for piece, ends in lines:
        line.append(piece)
        size += len(piece)
        if size > MAX_JSON_LINE:
            raise ValueError(
                f"{where}, line {number + 1}: longer than {MAX_JSON_LINE >> 20} MiB; put so long a document in a plain "
                "text file (documents separated by blank lines), which is read only as far as the probe needs"
            )
        if not ends:
            continue
        number += 1
        text, line, size = "".join(line), [], 0
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {number}: not JSON ({e.msg}); give one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{where}, line {number}: no "text" field holding a string')
        if record["text"].strip():
            yield _limited(record["text"], max_chars)


def token_ids(tokenizer, docs: list[Document], limit: int) -> list[list[int]]:
    """The first `limit` token ids of each document (fewer where it has fewer). Of a document cut short, the text is
    tokenized up to its last whitespace and the last token dropped, so that the ids kept are those of the whole
    document's start (no word is split where the characters were cut)."""
    texts = []
    for d in docs:
        text = d.text
        if d.cut:
            space = max(text.rfind(c) for c in " \n\t")
            text = text[:space] if space > len(text) // 2 else text
        texts.append(text)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(i[: min(limit, len(i) - 1)] if d.cut else i[:limit]) for d, i in zip(docs, ids)]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def rows_of_text(
    path: str, tokenizer, packing: str, seq_len: int, rows: int, rng, separator: int | None
) -> tuple[np.ndarray, str]:
    """Rows of `seq_len` token ids [rows, seq_len] cut from the text at `path` as `packing` says (the module's
    docstring), and the sha256 of the file; ValueError naming the file when the text is too short for them."""
    where = f"probe.path={path}"
    sha256 = file_sha256(path)
    if packing == "document":
        long_enough, count = array.array("q"), 0  # 8 bytes per document long enough, its index
        for batch in _batches(documents(path, CHARS_PER_TOKEN * seq_len), TOKENIZE_AT_ONCE):
            ids = token_ids(tokenizer, batch, seq_len)
            long_enough.extend(count + i for i, row in enumerate(ids) if len(row) >= seq_len)
            count += len(batch)
        if len(long_enough) < rows:
            raise ValueError(
                f"{where}: {len(long_enough)} of its {count} document(s) have at least probe.seq_len="
                f"{seq_len} tokens, and probe.rows={rows} needs {rows}: lower probe.rows or probe.seq_len, or use "
                "probe.packing=stream"
            )
        chosen = set(np.sort(rng.choice(np.asarray(long_enough), size=rows, replace=False)).tolist())
        picked = []
        for i, doc in enumerate(documents(path, CHARS_PER_TOKEN * seq_len)):
            if i in chosen:
                picked.append(doc)
                if len(picked) == rows:
                    break
        return np.asarray(token_ids(tokenizer, picked, seq_len), dtype=np.int64), sha256
    if packing == "stream":
        need = rows * seq_len
        stream: list[int] = []
        for doc in documents(path, CHARS_PER_TOKEN * need):
            if stream and separator is not None:
                stream.append(separator)
            stream += token_ids(tokenizer, [doc], need - len(stream))[0]
            if len(stream) >= need:
                break
        if len(stream) < seq_len:
            raise ValueError(f"{where}: {len(stream)} tokens in all, shorter than one row of probe.seq_len={seq_len}")
        starts = len(stream) - seq_len + 1
        offsets = rng.choice(starts, size=rows, replace=starts < rows)
        tokens = np.asarray(stream, dtype=np.int64)
        return np.stack([tokens[o : o + seq_len] for o in offsets]), sha256
    raise ValueError(f"probe.packing={packing}: choose from {', '.join(PACKINGS)}")

"""Text sources for `prime-eval ppl`: re-iterable streams of documents (str), described for the JSON's protocol.

    text_files(["a.txt", "b.jsonl"])          # .txt: one document per blank-line-separated paragraph (or per file)
    hf_dataset("json", data_files="x.jsonl", split="train[-1000:]", text_field="page")
    openwebtext()                              # MDLM's validation set: the last 100,000 train documents

Local files are checked when the source is made (before any model is loaded): a missing file, an unknown encoding
or a binary file (NUL bytes, or mostly control bytes, in its first 8 KiB) is a one-line `UserError`; a decoding
error while reading names the byte, the line and the fix.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prime_eval.errors import UserError

OWT_PATH = "Skylion007/openwebtext"
OWT_TRAIN_DOCS = 8_013_769  # documents in OpenWebText's single train split
OWT_VALID_DOCS = 100_000


@dataclass
class TextSource:
    """Documents as a stream. `factory()` returns a fresh iterator; `info` goes into the JSON's protocol."""

    factory: Callable[[], Iterator[str]]
    info: dict
    num_docs: int | None = None  # when known without reading (progress bar total)

    def __iter__(self) -> Iterator[str]:
        return self.factory()


def as_source(obj) -> TextSource:
    """A `TextSource` from a TextSource, a path (str/Path: a .txt/.jsonl file) or any iterable of strings."""
    if isinstance(obj, TextSource):
        return obj
    if isinstance(obj, (str, Path)):
        return text_files([obj])
    if isinstance(obj, Iterable):
        if isinstance(obj, Iterator):  # a one-shot generator: use it once
            return TextSource(lambda: obj, {"dataset": "<iterator>"})
        return TextSource(lambda: iter(obj), {"dataset": "<iterable>"},
                          num_docs=len(obj) if hasattr(obj, "__len__") else None)
    raise UserError(f"cannot read documents from {type(obj).__name__}; give a TextSource, a .txt/.jsonl path or "
                    "an iterable of strings")


def _iter_paragraphs(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """Blank-line-separated paragraphs (a line of only whitespace is blank); inner newlines kept; streamed."""
    lines: list[str] = []
    with _decoding(path, encoding), open(path, encoding=encoding) as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


@contextlib.contextmanager
def _decoding(path: Path, encoding: str):
    """Turn a UnicodeDecodeError while reading `path` into a UserError that says where and how to fix it."""
    try:
        yield
    except UnicodeDecodeError as e:
        where = _first_decode_error(path, encoding)
        at = f" at byte {where[0]:,} (line {where[1]:,}: byte 0x{where[2]:02x})" if where else ""
        raise UserError(f"{path} is not {encoding} text{at}; convert it (e.g. iconv -f LATIN1 -t UTF-8 "
                        f"{path.name} > fixed.txt) or give its encoding with --encoding (e.g. latin-1)") from e


def _first_decode_error(path: Path, encoding: str, chunk: int = 1 << 20) -> tuple[int, int, int] | None:
    """(byte offset, 1-based line, offending byte) of the first undecodable byte, read in 1 MiB chunks."""
    dec = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            try:
                dec.decode(data, final=not data)
            except UnicodeDecodeError as e:
                pos = offset + e.start - len(dec.getstate()[0])  # bytes the decoder held back belong before `data`
                pos = max(pos, offset)
                bad = data[pos - offset] if pos - offset < len(data) else 0
                return pos, line + data[:pos - offset].count(b"\n"), bad
            if not data:
                return None
            line += data.count(b"\n")
            offset += len(data)


BINARY_PROBE = 8192  # bytes read to tell text from binary
_TEXT_CONTROLS = set(b"\t\n\r\f\v\b\x1b")  # control bytes that plain text does contain


def binary_evidence(head: bytes) -> str | None:
    """Why `head` (a file's first bytes) is not text, or None: a NUL byte, or over 10% control bytes (other than
    tab, newline, carriage return, form feed, vertical tab, backspace and escape)."""
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul:,}"
    controls = sum(1 for c in head if (c < 32 or c == 127) and c not in _TEXT_CONTROLS)
    if head and controls > 0.10 * len(head):
        return f"{controls / len(head):.0%} control bytes"
    return None


def check_not_binary(path: Path, encoding: str = "utf-8") -> None:
    """UserError if `path` looks binary (`binary_evidence` on its first 8 KiB). UTF-16/32 text has NUL bytes by
    design, so those encodings are not checked."""
    if codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        return
    with open(path, "rb") as f:
        why = binary_evidence(f.read(BINARY_PROBE))
    if why:
        raise UserError(f"{path} is a binary file, not text ({why} in its first {BINARY_PROBE:,} bytes); give "
                        "plain-text .txt or .jsonl files (decompress or extract the text first)")


def _pick_field(row: dict, text_field: str | None, where: str) -> str:
    if text_field is None:
        strings = [k for k, v in row.items() if isinstance(v, str)]
        text_field = "text" if "text" in row else strings[0] if len(strings) == 1 else None
        if text_field is None:
            raise UserError(f"{where}: no 'text' field and {len(strings)} string fields ({', '.join(strings)}); "
                            "choose one with --text-field")
    if text_field not in row:
        raise UserError(f"{where}: no field {text_field!r}; fields are {', '.join(map(str, row))} "
                        "(choose one with --text-field)")
    value = row[text_field]
    return "" if value is None else str(value)


def _iter_jsonl(path: Path, text_field: str | None, encoding: str = "utf-8") -> Iterator[str]:
    with _decoding(path, encoding), open(path, encoding=encoding) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg}); .jsonl files hold one JSON object per line") from e
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            yield _pick_field(row, text_field, f"{path}:{n}")


def text_files(paths: Iterable[str | os.PathLike], *, text_field: str | None = None,
               txt_docs: str = "paragraph", encoding: str = "utf-8") -> TextSource:
    """Local files, read lazily in order. `.jsonl`: one document per line from `text_field` (default: `text`, or
    the only string field). `.txt` (any other suffix): `txt_docs="paragraph"` (default) gives one document per
    blank-line-separated paragraph, streamed; `"file"` gives one document per file (a file is then held in memory).
    """
    paths = [Path(p) for p in paths]
    if txt_docs not in ("paragraph", "file"):
        raise UserError(f"txt_docs must be 'paragraph' or 'file', got {txt_docs!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    for p in paths:
        if not p.is_file():
            raise UserError(f"text file not found: {p}")
        check_not_binary(p, encoding)

    def docs() -> Iterator[str]:
        for p in paths:
            if p.suffix == ".jsonl":
                yield from _iter_jsonl(p, text_field, encoding)
            elif txt_docs == "file":
                with _decoding(p, encoding):
                    yield p.read_text(encoding=encoding)
            else:
                yield from _iter_paragraphs(p, encoding)

    info = {"dataset": ",".join(str(p) for p in paths), "files": [str(p) for p in paths], "split": None,
            "text_field": text_field,
            "txt_docs": txt_docs if any(p.suffix != ".jsonl" for p in paths) else None,
            **({"encoding": encoding} if encoding.lower().replace("_", "-") not in ("utf-8", "utf8") else {})}
    return TextSource(docs, info)


def hf_dataset(path: str, *, name: str | None = None, split: str = "train", text_field: str = "text",
               streaming: bool = False, data_files=None, revision: str | None = None) -> TextSource:
    """A Hugging Face dataset (hub id, local folder, or a builder such as `json` with `data_files`).

    `split` may slice (`train[-100000:]`). Without streaming the split is prepared once (Arrow, memory-mapped) and
    read row by row, so memory does not grow with it. With `streaming=True` rows come over the network as they are
    read; a slice `split[a:b]` is then applied with `skip`/`take` (negative bounds need the split's size).
    """
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", split)
    if m is None:
        raise UserError(f"split {split!r}: expected NAME or NAME[a:b] (e.g. train[-100000:])")
    base, lo, hi = m.group(1), m.group(2), m.group(3)
    info = {"dataset": path, "dataset_name": name, "split": split, "text_field": text_field, "streaming": streaming,
            "data_files": data_files, "revision": revision}

    def load(**kw):
        import datasets

        try:
            return datasets.load_dataset(path, name, data_files=data_files, revision=revision, **kw)
        except Exception as e:  # noqa: BLE001 — any loading failure is a user-facing problem
            hint = ""
            if "scripts are no longer supported" in str(e):
                hint = (" The hub repository still holds a loading script; try --revision refs/convert/parquet "
                        "(check that its row count matches) or an older `datasets`.")
            raise UserError(f"cannot load dataset {path!r} (name={name!r}, split={split!r}): "
                            f"{type(e).__name__}: {str(e)[:400]}.{hint}") from e

    state: dict = {}

    def open_split():
        if "ds" not in state:
            if streaming:
                ds = load(split=base, streaming=True)
                if lo or hi:
                    n = None
                    if (lo and lo.startswith("-")) or (hi and hi.startswith("-")):
                        try:
                            n = ds.info.splits[base].num_examples
                        except Exception:  # noqa: BLE001
                            n = None
                        if not n:
                            raise UserError(f"split {split!r} with streaming: the size of {base!r} is unknown, so "
                                            "negative bounds cannot be resolved; drop --streaming")
                    a = int(lo) if lo else 0
                    b = int(hi) if hi else None
                    a = a + n if a < 0 else a
                    b = b + n if (b is not None and b < 0) else b
                    ds = ds.skip(a)
                    if b is not None:
                        ds = ds.take(max(0, b - a))
                    state["n"] = (b - a) if b is not None else None
            else:
                ds = load(split=split)
                state["n"] = len(ds)
            state["ds"] = ds
            try:
                state["split_size"] = ds.info.splits[base].num_examples
            except Exception:  # noqa: BLE001
                state["split_size"] = None
        return state["ds"]

    def docs() -> Iterator[str]:
        ds = open_split()
        for i, row in enumerate(ds):
            yield _pick_field(row, text_field, f"{path} {split} row {i}")

    src = TextSource(docs, info)
    src.open = open_split  # type: ignore[attr-defined]  (lets the caller learn num_docs before iterating)
    src.state = state  # type: ignore[attr-defined]
    return src


def openwebtext(*, path: str = OWT_PATH, streaming: bool = False, revision: str | None = None,
                num_docs: int = OWT_VALID_DOCS) -> TextSource:
    """MDLM's OpenWebText validation set: the last `num_docs` (100,000) documents of the single train split."""
    src = hf_dataset(path, split=f"train[-{num_docs}:]", text_field="text", streaming=streaming, revision=revision)
    src.info.update(dataset="openwebtext", path=path,
                    preset="openwebtext: MDLM's openwebtext-split, validation = the last 100,000 train documents")
    return src




def open_source(src: TextSource) -> None:
    """Prepare a hub source before reading (learns `num_docs`; warns when an OpenWebText split is not the one
    MDLM's validation set is cut from); a no-op for other sources."""
    if not hasattr(src, "open"):
        return
    src.open()  # type: ignore[attr-defined]
    src.num_docs = src.state.get("n")  # type: ignore[attr-defined]
    size = src.state.get("split_size")  # type: ignore[attr-defined]
    if src.info.get("preset") and size and size != OWT_TRAIN_DOCS:
        warnings.warn(f"this OpenWebText train split has {size} documents, not {OWT_TRAIN_DOCS}: its last "
                      f"{OWT_VALID_DOCS} documents are not MDLM's validation set")

"""Bound perplexity of ARM, MDM and MDM-Prime models on OpenWebText or any text (MDLM's protocol, method.md §2).

    source = openwebtext()                                     # HF `Skylion007/openwebtext`, train[-100000:]
    result = evaluate_perplexity(net, tokenizer, source, Protocol(L=1024, num_samples=1, eps=1e-3, seed=0))
    result["results"]["ppl"], result["results"]["ppl_ci95"]

Protocol (each step an option of `Protocol`):

1. Data: documents from a `TextSource` — a Hugging Face dataset (OpenWebText's validation set is the **last 100,000
   documents** of its single train split), local `.txt` files (one document per blank-line-separated paragraph, or
   one per file) or `.jsonl` files (one document per line, from a text field), or any iterable of strings.
2. Blocks (`wrap=True`): each document is tokenized without special tokens and gets EOS appended; the stream is cut
   into blocks of L-2 tokens, each framed as [BOS] block [EOS] (GPT-2: both 50256); the remainder is dropped and
   counted. `wrap=False`: one block per document, [BOS] doc [EOS], truncated to L (the cut tokens are counted as
   dropped); shorter blocks are never padded: each forward pass holds blocks of one length
   (`distributed.forward_rows_batch_invariant`), so no number depends on which blocks share a pass.
3. Scores, per block x (nats):
     ARM         -Σ_{i=1}^{L-1} log p(x^i | x^{<i})             exact, L-1 scored positions (the BOS is context)
     MDM/Prime   NELBO(x) of all L positions (BOS and EOS included, as MDLM), K Monte Carlo samples, their mean.
4. Per token of the original tokenizer (never per sub-token): NLL = Σ_blocks score / Σ_blocks scored positions,
   PPL = exp(NLL) — a ratio of sums, as MDLM's torchmetrics `MeanMetric`.

Time sampling (MDM/Prime): "stratified across the batch as MDLM does", made independent of the batch size. Blocks
are grouped by *index* into fixed groups of `strata` blocks (default 16, MDLM's eval batch). The G·K samples of a
group get one stratum each of [0, 1), in a random order (a permutation drawn from the group's own generator), with
independent jitter inside the stratum: u = (stratum + v)/(G·K). Every sample is marginally U(0,1) — so every block's
estimate is unbiased on its own, unlike a fixed stratum per batch position — and the group's sum has the variance of
stratified sampling. Then t = ε + (1-ε)u (ε floor, MDLM 1e-3) or t = ⌈uT⌉/T (T-step bound). All randomness of
block i comes from generators seeded by (seed, i) and (seed, group of i): batch size and order never change a number.
With ε > 0 the estimate is a bound only up to O(ε) (the dropped [0, ε) and the 1/(1-ε) rescaling); ε = 0 is exact.

Standard errors (`nll_stderr`, the "Monte Carlo" SE of the headline and its 95% interval):
  * deterministic estimators (ARM, chain_rule): 0.
  * K > 1: from the within-block sample variances, SE² = Σ_b s_b²/K / (Σ_b n_b)². Blocks are independent given the
    data, so this is the MC uncertainty of the bound *on the blocks scored*. Conservative under stratification.
  * K = 1: a block's MC variance cannot be estimated from one draw, so the between-block SE below is used. Since
    E[between-block variance] = Var_data + E[Var_MC] ≥ E[Var_MC], it over-covers the MC error (it also includes the
    variation of the data) — conservative, and the right SE if the scored blocks are read as a sample of a corpus.
  `nll_stderr_sampling` is always that between-block SE: the delta-method SE of the ratio Σv/Σn treating blocks as an
  i.i.d. sample (data + MC noise). `--target-se` stops on it, because a run stopped early *is* a sample of the corpus.
  A Poisson(1) bootstrap over blocks (`bootstrap` replicates, own generator per block) gives a percentile interval
  as a check (the resampling unit is the block, which is the document with `wrap=False`).

Bits per byte = Σ NLL / ln 2 / Σ bytes, where the bytes of a block are the UTF-8 bytes of the source text covered by
its tokens (BOS/EOS: 0 bytes). A document's bytes (its UTF-8 length, exactly) are split over its tokens by the end
offsets of the fast tokenizer's offset mapping; a token that ends inside a character gets 0 bytes, the token that
completes it gets them all. Only a block cut inside a multi-token character can move bytes between blocks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators import get_estimator
from prime_eval.estimators.rows import Rows

OWT_PATH = "Skylion007/openwebtext"
OWT_TRAIN_DOCS = 8_013_769  # documents in OpenWebText's single train split
OWT_VALID_DOCS = 100_000
Z95 = 1.959963984540054
ALLOWED = {"arm": ("exact",), "mdm": ("mc", "exact_count", "chain_rule"),
           "prime": ("mc", "exact_count", "legacy_joint")}


# ================================================================================================================
# Sources: re-iterable streams of documents (str), described for the JSON
# ================================================================================================================
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
    import codecs

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
        import codecs

        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    for p in paths:
        if not p.is_file():
            raise UserError(f"text file not found: {p}")

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
    import re

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


# ================================================================================================================
# Tokenization and blocks
# ================================================================================================================
def _token_bytes(text: str, offsets) -> np.ndarray:
    """(n,) UTF-8 bytes per token: the document's exact byte length split at the tokens' end offsets."""
    raw = text.encode("utf-8", errors="surrogatepass")
    n = len(offsets)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=n)
    if len(raw) != len(text):  # non-ASCII: char index -> byte index
        cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        nb = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
        ends = np.concatenate([[0], np.cumsum(nb)])[np.clip(ends, 0, len(text))]
    ends = np.maximum.accumulate(np.minimum(ends, len(raw)))
    ends[-1] = len(raw)  # trailing text the offsets trim (whitespace) belongs to the last token
    return np.diff(ends, prepend=0)


def _token_bytes_slow(tokenizer, text: str, ids: list[int]) -> np.ndarray:
    """Tokenizers without offsets: per-token decoded length, the last token absorbing the document's remainder."""
    per = np.array([len(tokenizer.decode([i]).encode("utf-8", errors="surrogatepass")) for i in ids], np.int64)
    if len(per):
        per[-1] += len(text.encode("utf-8", errors="surrogatepass")) - per.sum()
        per[-1] = max(per[-1], 0)
    return per


def tokenize_documents(docs: Iterable[str], tokenizer, *,
                       doc_batch: int = 64) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (ids, bytes per token) for each document, tokenized without special tokens, `doc_batch` at a time."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    it = iter(docs)
    while True:
        texts = list(islice(it, doc_batch))
        if not texts:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
        for k, text in enumerate(texts):
            ids = list(enc["input_ids"][k])
            per = (_token_bytes(text, enc["offset_mapping"][k]) if fast
                   else _token_bytes_slow(tokenizer, text, ids))
            yield ids, per


@dataclass
class Block:
    """One scored block: `ids` (n,) LongTensor framed [BOS] ... [EOS]; `bytes` of source text it covers."""

    index: int
    ids: torch.Tensor
    bytes: int


class BlockStream:
    """Documents -> blocks, streamed (memory: one doc batch plus one block). Counters fill as it is consumed.

    wrap=True:  tokens + EOS per document, concatenated, cut every L-2 tokens, framed [BOS] chunk [EOS]; the tail
                shorter than L-2 is dropped (`dropped_tokens`, `dropped_bytes`, known once the stream is exhausted).
    wrap=False: [BOS] doc [EOS] per document, the document cut to its first L-2 tokens (the rest is dropped).
    """

    def __init__(self, docs: Iterable[str], tokenizer, *, L: int, wrap: bool, bos_id: int, eos_id: int,
                 doc_batch: int = 64):
        if L < 3:
            raise UserError(f"L = {L}: a block needs at least 3 tokens ([BOS] token [EOS])")
        self.docs, self.tokenizer, self.L, self.wrap = docs, tokenizer, L, wrap
        self.bos_id, self.eos_id, self.doc_batch = bos_id, eos_id, doc_batch
        self.num_docs = self.data_tokens = self.dropped_tokens = self.dropped_bytes = self.truncated_docs = 0
        self.total_bytes = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[Block]:
        n = self.L - 2
        index = 0
        buf_ids: list[int] = []
        buf_bytes: list[int] = []
        for ids, per in tokenize_documents(self.docs, self.tokenizer, doc_batch=self.doc_batch):
            self.num_docs += 1
            self.total_bytes += int(per.sum())
            if not self.wrap:
                keep = ids[:n]
                if len(ids) > n:
                    self.truncated_docs += 1
                    self.dropped_tokens += len(ids) - n
                    self.dropped_bytes += int(per[n:].sum())
                self.data_tokens += len(ids)
                x = torch.tensor([self.bos_id, *keep, self.eos_id], dtype=torch.long)
                yield Block(index, x, int(per[:n].sum()))
                index += 1
                continue
            buf_ids.extend(ids)
            buf_ids.append(self.eos_id)
            buf_bytes.extend(per.tolist())
            buf_bytes.append(0)
            self.data_tokens += len(ids) + 1
            start = 0
            while len(buf_ids) - start >= n:
                chunk = buf_ids[start:start + n]
                x = torch.tensor([self.bos_id, *chunk, self.eos_id], dtype=torch.long)
                yield Block(index, x, int(sum(buf_bytes[start:start + n])))
                index += 1
                start += n
            if start:
                del buf_ids[:start], buf_bytes[:start]
        self.dropped_tokens += len(buf_ids)
        self.dropped_bytes += int(sum(buf_bytes))
        self.exhausted = True


# ================================================================================================================
# Protocol
# ================================================================================================================
@dataclass
class Protocol:
    """Every choice that changes a number. `eps`/`T` apply to MDM/Prime only (`T` > 0: the T-step bound)."""

    L: int = 1024
    wrap: bool = True
    num_samples: int = 1  # K Monte Carlo samples per block
    eps: float = 1e-3
    T: int | None = None
    seed: int = 0
    strata: int = 16  # blocks per stratification group (MDLM: its eval batch of 16)
    max_tokens: int | None = None  # stop once this many positions are scored
    target_se: float | None = None  # stop once nll_stderr_sampling / nll <= target_se
    min_blocks: int = 32  # --target-se never stops before this many blocks
    bootstrap: int = 1000  # Poisson bootstrap replicates (0: none)
    bos_id: int | None = None  # default: tokenizer BOS, else EOS (GPT-2: both 50256)
    eos_id: int | None = None

    def __post_init__(self):
        if self.num_samples < 1:
            raise UserError(f"--samples must be >= 1, got {self.num_samples}")
        if self.strata < 1:
            raise UserError(f"--strata must be >= 1, got {self.strata}")
        if not 0.0 <= self.eps < 1.0:
            raise UserError(f"--eps must lie in [0, 1), got {self.eps}")
        if self.T is not None and self.T < 1:
            self.T = None
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.target_se is not None and not self.target_se > 0:
            raise UserError(f"--target-se must be > 0 (a relative standard error, e.g. 0.001), got {self.target_se}")


# ================================================================================================================
# Sufficient statistics (update / compute, torchmetrics-style)
# ================================================================================================================
class PerplexityStats:
    """Σ over blocks of the per-block score v_b (mean of its K samples) and scored positions n_b, plus what the
    standard errors need. `update` adds one block, `merge` adds another accumulator, `compute` gives the numbers.

    Between-block variance of the ratio R = Σv/Σn is kept as centred sums around a reference r0 (the first block's
    v/n): w_b = v_b - r0·n_b, Σw², Σwn, Σn² — exact algebra, no cancellation at r0 ≈ R.
    """

    def __init__(self, bootstrap: int = 0):
        self.blocks = self.tokens = self.bytes = self.samples = 0
        self.sum_v = 0.0
        self.r0: float | None = None
        self.sw = self.sw2 = self.swn = 0.0
        self.sn2 = 0.0
        self.mc_var = 0.0  # Σ_b s_b²/K_b over blocks with K_b > 1
        self.mc_blocks = 0
        self.boot_v = np.zeros(bootstrap)
        self.boot_n = np.zeros(bootstrap)

    def update(self, values: torch.Tensor, tokens: int, n_bytes: int = 0, boot_weights: np.ndarray | None = None):
        """values: (K,) per-sample NLL of one block (nats); tokens: its scored positions; n_bytes: its text bytes."""
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        k = values.numel()
        v = float(values.mean())
        if self.r0 is None:
            self.r0 = v / tokens if tokens else 0.0
        w = v - self.r0 * tokens
        self.blocks += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.samples += k
        self.sum_v += v
        self.sw += w
        self.sw2 += w * w
        self.swn += w * tokens
        self.sn2 += float(tokens) * tokens
        if k > 1:
            self.mc_var += float(values.var(unbiased=True)) / k
            self.mc_blocks += 1
        if self.boot_v.size:
            bw = np.ones(self.boot_v.size) if boot_weights is None else boot_weights
            self.boot_v += bw * v
            self.boot_n += bw * tokens

    def _rebased(self, r: float) -> tuple[float, float, float]:
        """(Σw, Σw², Σwn) with w = v - r·n."""
        d = r - (self.r0 or 0.0)
        return (self.sw - d * self.tokens, self.sw2 - 2 * d * self.swn + d * d * self.sn2, self.swn - d * self.sn2)

    def merge(self, other: PerplexityStats) -> PerplexityStats:
        if other.blocks == 0:
            return self
        if self.blocks == 0:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return self
        sw, sw2, swn = other._rebased(self.r0)
        self.blocks += other.blocks
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.samples += other.samples
        self.sum_v += other.sum_v
        self.sw, self.sw2, self.swn = self.sw + sw, self.sw2 + sw2, self.swn + swn
        self.sn2 += other.sn2
        self.mc_var += other.mc_var
        self.mc_blocks += other.mc_blocks
        self.boot_v = self.boot_v + other.boot_v
        self.boot_n = self.boot_n + other.boot_n
        return self

    @property
    def nll(self) -> float:
        return self.sum_v / self.tokens if self.tokens else float("nan")

    def stderr_sampling(self) -> float:
        """Delta-method SE of R = Σv/Σn over i.i.d. blocks: sqrt(B/(B-1) Σ(v_b - R n_b)²) / Σn."""
        if self.blocks < 2 or not self.tokens:
            return float("nan")
        _, sw2, _ = self._rebased(self.nll)
        return math.sqrt(max(sw2, 0.0) * self.blocks / (self.blocks - 1)) / self.tokens

    def stderr_mc_within(self) -> float | None:
        """MC SE from the within-block variances (only when every block has K > 1)."""
        if self.mc_blocks == 0 or self.mc_blocks != self.blocks:
            return None
        return math.sqrt(self.mc_var) / self.tokens

    def compute(self, *, deterministic: bool = False) -> dict:
        nll = self.nll
        sampling = self.stderr_sampling()
        within = self.stderr_mc_within()
        if deterministic:
            se, method = 0.0, "exact (deterministic estimator: no Monte Carlo error)"
        elif within is not None:
            se, method = within, "within-block (K > 1): sqrt(Σ s_b²/K)/Σn"
        else:
            se, method = sampling, "between-block (K = 1; conservative: includes data variation)"
        lo, hi = nll - Z95 * se, nll + Z95 * se
        ln2 = math.log(2.0)
        bpb = self.sum_v / ln2 / self.bytes if self.bytes else None
        out = {
            "nll": nll, "nll_stderr": se, "nll_ci95": [lo, hi],
            "ppl": _exp(nll), "ppl_ci95": [_exp(lo), _exp(hi)],
            "bits_per_byte": bpb,
            "bits_per_byte_ci95": ([lo * self.tokens / ln2 / self.bytes, hi * self.tokens / ln2 / self.bytes]
                                   if self.bytes else None),
            "nll_stderr_method": method,
            "nll_stderr_sampling": sampling, "nll_stderr_mc_within": within,
            "nll_total": self.sum_v, "tokens": self.tokens, "blocks": self.blocks, "bytes": self.bytes,
            "samples": self.samples,
        }
        if self.boot_v.size and self.blocks >= 2:
            ok = self.boot_n > 0
            r = self.boot_v[ok] / self.boot_n[ok]
            out["nll_ci95_bootstrap"] = [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]
            out["bootstrap_replicates"] = int(self.boot_v.size)
        return out


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(values: Iterable, tokens: Iterable[int], n_bytes: Iterable[int] | None = None, *,
               deterministic: bool = False) -> dict:
    """Functional form: compute ∘ update over per-block (K,) values, scored positions and bytes (one shot)."""
    stats = PerplexityStats()
    for v, n, b in zip(values, tokens, n_bytes if n_bytes is not None else itertools.repeat(0)):
        stats.update(torch.as_tensor(v), int(n), int(b))
    return stats.compute(deterministic=deterministic)


# ================================================================================================================
# Sampling: per-block generators and stratified uniforms
# ================================================================================================================
_TAG_GROUP, _TAG_BLOCK, _TAG_BOOT = 1, 2, 3


def block_generator(seed: int, tag: int, index: int) -> torch.Generator:
    """A generator owned by (seed, tag, index) alone (numpy SeedSequence hashing), so no batch shares one."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, tag, int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def block_uniforms(seed: int, index: int, num_samples: int, strata: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(K,) float64 u ~ U(0,1) for block `index`, stratified over its group of `strata` blocks (module docstring).

    The group's G·K strata are assigned by a permutation from the group's generator; the jitter inside the stratum
    comes from the block's own `generator` (its first draw).
    """
    g, p = divmod(index, strata)
    n = strata * num_samples
    perm = torch.randperm(n, generator=block_generator(seed, _TAG_GROUP, g))
    cells = perm[p * num_samples:(p + 1) * num_samples].double()
    v = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    return (cells + v) / n


def block_rows(est, x: torch.Tensor, target: torch.Tensor, u: torch.Tensor | None,
               generator: torch.Generator) -> Rows:
    """Rows of one block: the estimator's own rows with the block's uniforms `u` (K,) (None: deterministic), through
    the one sampler every command uses (`estimators.sampler`): identical uniforms give identical masks."""
    if est.family == "arm" or getattr(est, "deterministic", False):
        return est.rows(x, target, generator, 1)
    if est.name not in ALLOWED.get(est.family, ()):
        raise UserError(f"estimator {est.name!r} is not available for perplexity of a {est.family} model; choose "
                        f"one of {', '.join(ALLOWED.get(est.family, ()))}")
    return est.rows(x, target, generator, u.numel(), u=u)


# ================================================================================================================
# Evaluation
# ================================================================================================================
def build_estimator(net, name: str | None = None, *, eps: float = 1e-3, T: int | None = None, subtokenizer=None,
                    **options):
    """The estimator for `net.family` with the protocol's ε and T; Prime needs the sub-tokenizer (ℓ, b, π)."""
    family = getattr(net, "family", None)
    if family not in ALLOWED:
        raise UserError(f"network family {family!r} is not one of arm, mdm, prime")
    name = name or {"arm": "exact", "mdm": "mc", "prime": "mc"}[family]
    if name not in ALLOWED[family]:
        raise UserError(f"estimator {name!r} is not available for perplexity of a {family} model; choose one of "
                        f"{', '.join(ALLOWED[family])} (importance-weighted and other scoring estimators are for "
                        "`prime-eval score`)")
    if options.get("cfg"):
        raise UserError("cfg (classifier-free guidance) is not a likelihood: a whole block has no context to guide on")
    if family == "arm":
        return get_estimator("arm", "exact")
    if family == "mdm":
        return get_estimator("mdm", name, mask_id=net.mask_id, eps=eps, T=T, **options)
    if subtokenizer is None:
        from prime_eval.subtokenizer import SubTokenizer

        subtokenizer = SubTokenizer(net.vocab_size, ell=net.ell, base=net.base)
    if (subtokenizer.ell, subtokenizer.base) != (net.ell, net.base):
        raise UserError(f"sub-tokenizer ℓ={subtokenizer.ell}, b={subtokenizer.base} does not match the network's "
                        f"ℓ={net.ell}, b={net.base}")
    options.setdefault("carry_over", bool(getattr(net, "carry_over", False)))
    return get_estimator("prime", name, subtokenizer=subtokenizer, eps=eps, T=T, **options)


def _rows_per_block(est, K: int, L: int) -> int:
    if est.family == "arm":
        return 1
    if getattr(est, "deterministic", False):
        return L
    return K * (2 if getattr(est, "cfg", 0) else 1)


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prime-eval", "torch", "transformers", "tokenizers", "datasets", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _tokenizer_info(tokenizer) -> dict:
    return {"name": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
            "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "is_fast": bool(getattr(tokenizer, "is_fast", False))}


def evaluate_perplexity(net, tokenizer, source, protocol: Protocol | None = None, *, estimator=None,
                        estimator_options: dict | None = None, batch_size: int = 16, model: dict | None = None,
                        progress: bool | object = False, on_block: Callable | None = None,
                        doc_batch: int = 64, cache_dir: str | os.PathLike | None = None) -> dict:
    """Score `source` with `net` under `protocol`; returns the perplexity JSON (docs/ARCHITECTURE.md) as a dict.

    Args:
      net: a network of the contract (family arm/mdm/prime), e.g. from `checkpoints.load_network`.
      tokenizer: the model's tokenizer (HF, fast for exact bytes); must fit `net.vocab_size`.
      source: a `TextSource` (`openwebtext()`, `hf_dataset(...)`, `text_files(...)`), a path or strings.
      estimator: an estimator object, or a name (default: exact / mc / mc); `estimator_options` go to
        `build_estimator` (Prime: `subtokenizer`, `carry_over`, `legacy_scope`, ...).
      batch_size: network rows per forward pass (blocks per pass when K = 1); never changes a number.
      model: {"name", "checkpoint", "checkpoint_sha256", "params", ...} recorded in the JSON.
      progress: True (a rich bar on stderr) or a rich Console to draw on.
      on_block: called as on_block(block, values, tokens) after each scored block (values: (K,) nats).
      cache_dir: resumable cache of per-block values (`prime_eval.cache`), keyed by the checkpoint's hash, the
        estimator, K, seed, strata and the block (index and token ids): a killed run restarted with the same
        arguments recomputes only the blocks it had not stored.

    Data-parallel (docs/scale-out.md): inside a torch.distributed process group (torchrun), every rank reads and
    tokenizes the whole stream, scores the blocks with index ≡ rank (mod world size) of each global step, and the
    per-block values are all-gathered and accumulated in block order on every rank, with the stopping rules checked
    after each block as in one process. Numbers are then identical for any world size (only timings differ).
    """
    p = protocol or Protocol()
    src = as_source(source)
    if estimator is None or isinstance(estimator, str):
        est = build_estimator(net, estimator, eps=p.eps, T=p.T, **(estimator_options or {}))
    else:
        est = estimator
    if est.family != getattr(net, "family", est.family):
        raise UserError(f"estimator family {est.family!r} does not match the network's {net.family!r}")
    deterministic = est.family == "arm" or bool(getattr(est, "deterministic", False))
    K = 1 if deterministic else p.num_samples
    if deterministic and p.num_samples > 1:
        warnings.warn(f"{est.family} {est.name} is deterministic: --samples {p.num_samples} ignored (K = 1)")
    if est.family == "mdm" and est.name == "chain_rule":
        warnings.warn("chain_rule costs L forward rows per block and is the exact NLL of a left-to-right decoding "
                      "process, not the NELBO; prefer mc for the bound")

    bos = p.bos_id if p.bos_id is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                                 else tokenizer.eos_token_id)
    eos = p.eos_id if p.eos_id is not None else tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UserError("the tokenizer has no EOS token; give bos_id and eos_id in the protocol")
    V = getattr(net, "vocab_size", None)
    if V is not None and max(bos, eos) >= V:
        raise UserError(f"BOS/EOS ids {bos}/{eos} are outside the network's vocabulary of {V}")
    if V is not None and len(tokenizer) > V:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the network only {V} outputs; pass the "
                        "model's own tokenizer")
    max_len = getattr(net, "max_length", None)
    if max_len is not None and p.L > max_len:
        raise UserError(f"L = {p.L} exceeds the network's maximum length of {max_len} tokens")

    if hasattr(src, "open"):
        src.open()  # type: ignore[attr-defined]
        src.num_docs = src.state.get("n")  # type: ignore[attr-defined]
        size = src.state.get("split_size")  # type: ignore[attr-defined]
        if src.info.get("preset") and size and size != OWT_TRAIN_DOCS:
            warnings.warn(f"this OpenWebText train split has {size} documents, not {OWT_TRAIN_DOCS}: its last "
                          f"{OWT_VALID_DOCS} documents are not MDLM's validation set")
    from prime_eval import distributed as D

    dist = D.active_info()
    stream = BlockStream(src, tokenizer, L=p.L, wrap=p.wrap, bos_id=bos, eos_id=eos, doc_batch=doc_batch)
    stats = PerplexityStats(bootstrap=p.bootstrap)
    blocks_per_step = max(1, batch_size // _rows_per_block(est, K, p.L)) * dist.world_size  # global, all ranks
    forward_rows_total = scored_data_tokens = 0
    stopped = None
    cache = _open_cache(cache_dir, net, est, p, K, deterministic, bos, eos, model, dist) if cache_dir else None
    cache_hits = 0
    t0 = time.perf_counter()

    bar = _Progress(progress if dist.is_main else False, src.num_docs, p.max_tokens)
    blocks = iter(stream)
    with bar, (cache if cache is not None else contextlib.nullcontext()):
        while stopped is None:
            batch: list[Block] = []
            planned = stats.tokens
            for b in blocks:
                batch.append(b)
                planned += _scored(est, b)
                if len(batch) >= blocks_per_step or (p.max_tokens and planned >= p.max_tokens):
                    break
            if not batch:
                break
            scored, hits = _score_blocks(net, est, [b for b in batch if b.index % dist.world_size == dist.rank],
                                         p, K, deterministic, batch_size, cache)
            if dist.enabled:  # every rank gets every block's values, to accumulate in block order
                scored = {i: v for part in D.all_gather_object(scored) for i, v in part.items()}
                hits = sum(D.all_gather_object(hits))
            cache_hits += hits
            for b in batch:
                values, n_rows = scored[b.index]
                forward_rows_total += n_rows
                n = _scored(est, b)
                boot = (torch.poisson(torch.ones(p.bootstrap, dtype=torch.float64),
                                      generator=block_generator(p.seed, _TAG_BOOT, b.index)).numpy()
                        if p.bootstrap else None)
                stats.update(values, n, b.bytes, boot)
                scored_data_tokens += b.ids.numel() - 2
                if on_block is not None:
                    on_block(b, values, n)
                if p.max_tokens and stats.tokens >= p.max_tokens:
                    stopped = "max_tokens"
                elif (p.target_se and stats.blocks >= max(2, p.min_blocks)
                      and stats.stderr_sampling() <= p.target_se * abs(stats.nll)):
                    stopped = "target_se"  # checked after every block: independent of the batch size
                if stopped:
                    break
            bar.update(stream.num_docs, stats)
    if stats.blocks == 0:
        raise UserError(f"no block to score: the source gave {stream.num_docs} documents and {stream.data_tokens} "
                        f"tokens, fewer than one block of L-2 = {p.L - 2}; use a smaller --L or more text")
    seconds = time.perf_counter() - t0
    res = stats.compute(deterministic=deterministic)
    res.update({
        # read but not scored: the remainder (wrap) or the truncated tails (no wrap); after an early stop also the
        # read-ahead of the last doc batch
        "dropped_tokens": stream.data_tokens - scored_data_tokens,
        "dropped_bytes": stream.total_bytes - stats.bytes,
        "truncated_docs": stream.truncated_docs if not p.wrap else None,
        "documents": stream.num_docs, "data_tokens_read": stream.data_tokens,
        "samples_per_block": K, "forward_rows": forward_rows_total,
        "processes": dist.world_size, "cached_blocks": cache_hits if cache is not None else None,
        "stopped": stopped or "end_of_data", "seconds": seconds,
        "tokens_per_second": res["tokens"] / seconds if seconds > 0 else None,
    })
    est_cfg = est.config()
    protocol = {
        **{k: v for k, v in src.info.items()},
        "tokenizer": _tokenizer_info(tokenizer),
        "L": p.L, "wrap": p.wrap, "bos_id": bos, "eos_id": eos,
        "scored_positions": "L-1 per block (BOS is context)" if est.family == "arm" else "L per block (all positions)",
        "estimator": est.name, "estimator_options": est_cfg,
        "num_samples": K, "eps": None if est.family == "arm" else getattr(est, "eps", None),
        "T": None if est.family == "arm" else getattr(est, "T", None),
        "strata": None if deterministic else p.strata,
        "seed": p.seed, "max_tokens": p.max_tokens, "target_se": p.target_se, "min_blocks": p.min_blocks,
        "bootstrap": p.bootstrap, "batch_size": batch_size,
        "bytes_method": "offsets" if getattr(tokenizer, "is_fast", False) else "decoded-token lengths (approximate)",
    }
    kind = est.bound_kind
    m = dict(model or {})
    m.setdefault("name", m.get("checkpoint") or type(net).__name__)
    m.setdefault("family", est.family)
    m.setdefault("checkpoint", None)
    m.setdefault("checkpoint_sha256", None)
    m.setdefault("params", sum(t.numel() for t in net.parameters()))
    return {"kind": "prime-eval/ppl", "version": 1, "model": m, "protocol": protocol,
            "is_bound": BK.is_bound(kind), "bound_kind": kind,
            "results": res, "versions": package_versions()}


def _score_blocks(net, est, blocks: list[Block], p: Protocol, K: int, deterministic: bool, batch_size: int,
                  cache) -> tuple[dict[int, tuple[torch.Tensor, int]], int]:
    """{block index: ((K,) float64 CPU values, forward rows)} for `blocks`, from the cache where stored; the rest
    are computed in passes of rows of one length (`forward_rows_batch_invariant`, so a block's values never depend
    on which blocks share its pass: resumed and data-parallel runs give the same bits) and stored in one
    transaction. Returns (values, number of cache hits)."""
    from prime_eval.estimators.rows import forward_rows_batch_invariant

    out: dict[int, tuple[torch.Tensor, int]] = {}
    keys = [{"index": b.index, "ids": b.ids.tolist()} for b in blocks]
    stored = cache.get_many("ppl_block", keys) if cache is not None else [None] * len(blocks)
    todo = []
    for b, key, hit in zip(blocks, keys, stored):
        if hit is not None:
            out[b.index] = (torch.tensor(hit["values"], dtype=torch.float64), int(hit["rows"]))
        else:
            todo.append((b, key))
    rows = []
    for b, _ in todo:
        g = block_generator(p.seed, _TAG_BLOCK, b.index)
        target = torch.ones(b.ids.numel(), dtype=torch.bool)
        if est.family == "arm":
            target[0] = False
        u = (block_uniforms(p.seed, b.index, K, p.strata, g) if not deterministic else None)
        rows.append(block_rows(est, b.ids, target, u, g))
    logits = forward_rows_batch_invariant(net, rows, batch_size) if rows else []
    new = []
    for (b, key), r, lg in zip(todo, rows, logits):
        values = est.cost(r, lg).detach().to("cpu", torch.float64)
        n_rows = int(r.logits_at.any(1).sum())
        out[b.index] = (values, n_rows)
        new.append((key, {"values": values.tolist(), "rows": n_rows}))
    if cache is not None and new:
        cache.put_many("ppl_block", new)
    return out, len(blocks) - len(todo)


def _open_cache(cache_dir, net, est, p: Protocol, K: int, deterministic: bool, bos: int, eos: int,
                model: dict | None, dist):
    """The result cache of this run: its identity is everything a block's values depend on besides the block."""
    from prime_eval.cache import ResultCache, estimator_identity, run_identity, state_dict_sha256

    sha = (model or {}).get("checkpoint_sha256") or state_dict_sha256(net)
    param = next(iter(net.parameters()), None)
    ident = run_identity(checkpoint_sha256=sha, estimator=estimator_identity(est), num_samples=K, seed=p.seed,
                         kind="ppl", strata=None if deterministic else p.strata, L=p.L, wrap=p.wrap, bos_id=bos,
                         eos_id=eos, dtype=str(param.dtype) if param is not None else None,
                         device_type=param.device.type if param is not None else "cpu")
    return ResultCache(cache_dir, ident, rank=dist.rank)


def _scored(est, block: Block) -> int:
    return block.ids.numel() - (1 if est.family == "arm" else 0)


class _Progress:
    """A rich progress bar with the running estimate (no-op when disabled)."""

    def __init__(self, progress, total_docs: int | None, max_tokens: int | None):
        self.p = None
        if not progress:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console = progress if not isinstance(progress, bool) else Console(stderr=True)
        self.by_tokens = bool(max_tokens)
        total = max_tokens if max_tokens else total_docs
        self.p = Progress(SpinnerColumn(), TextColumn("[bold]ppl[/]"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[est]}"), console=console, transient=False)
        self.task = self.p.add_task("ppl", total=total, unit="tokens" if self.by_tokens else "docs",
                                    est="")

    def __enter__(self):
        if self.p:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.p:
            self.p.__exit__(*exc)

    def update(self, docs: int, stats: PerplexityStats):
        if not self.p:
            return
        se = stats.stderr_sampling()
        est = f"NLL {stats.nll:.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "") + \
              f"  PPL {_exp(stats.nll):.3f}  blocks {stats.blocks}  tokens {stats.tokens:,}"
        self.p.update(self.task, completed=stats.tokens if self.by_tokens else docs, est=est)


# ================================================================================================================
# Output
# ================================================================================================================
def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write atomically (`prime_eval.io.write_json`: a temporary file in the same folder, fsync, os.replace)."""
    from prime_eval.io import write_json as atomic_write_json

    return atomic_write_json(path, result, default=_json_default)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def summary_table(result: dict):
    """A rich Table of the result (what `prime-eval ppl` prints at the end)."""
    from rich.table import Table

    r, pr, m = result["results"], result["protocol"], result["model"]
    le = "≤ " if result["bound_kind"] == "upper_bound" else ""
    title = f"perplexity · {m.get('name')} ({m.get('family')}, {pr['estimator']}"
    title += ", NOT a bound: not a likelihood)" if not BK.is_likelihood(result["bound_kind"]) else ")"
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("95% interval", justify="right")
    t.add_row("NLL (nats/token)", f"{le}{r['nll']:.4f} ± {r['nll_stderr']:.4f}",
              f"[{r['nll_ci95'][0]:.4f}, {r['nll_ci95'][1]:.4f}]")
    t.add_row("perplexity", f"{le}{r['ppl']:.3f}", f"[{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}]")
    if r.get("bits_per_byte") is not None:
        t.add_row("bits per byte", f"{le}{r['bits_per_byte']:.4f}",
                  f"[{r['bits_per_byte_ci95'][0]:.4f}, {r['bits_per_byte_ci95'][1]:.4f}]")
    if r.get("nll_ci95_bootstrap"):
        b = r["nll_ci95_bootstrap"]
        t.add_row("NLL bootstrap (blocks)", "", f"[{b[0]:.4f}, {b[1]:.4f}]")
    t.add_row("SE method", r["nll_stderr_method"], "")
    if r.get("nll_stderr_sampling") is not None and math.isfinite(r["nll_stderr_sampling"]):
        t.add_row("SE between blocks (data+MC)", f"{r['nll_stderr_sampling']:.4f}", "")
    t.add_row("tokens / blocks / bytes", f"{r['tokens']:,} / {r['blocks']:,} / {r['bytes']:,}", "")
    t.add_row("dropped tokens", "—" if r["dropped_tokens"] is None else f"{r['dropped_tokens']:,}", "")
    t.add_row("samples per block (K)", str(r["samples_per_block"]), "")
    t.add_row("protocol", f"L={pr['L']} wrap={pr['wrap']} eps={pr['eps']} T={pr['T']} seed={pr['seed']}", "")
    t.add_row("stopped", r["stopped"], "")
    t.add_row("time", f"{r['seconds']:.1f} s ({(r['tokens_per_second'] or 0):,.0f} tokens/s)", "")
    return t


__all__ = ["Protocol", "TextSource", "text_files", "hf_dataset", "openwebtext", "as_source", "BlockStream", "Block",
           "tokenize_documents", "PerplexityStats", "perplexity", "block_generator", "block_uniforms",
           "block_rows", "build_estimator", "evaluate_perplexity", "write_json",
           "summary_table", "package_versions"]

"""Documents -> tokens -> scored blocks (MDLM's protocol, method.md §2.3), streamed, with the bytes each block covers.

    wrap=True:  each document tokenized without special tokens, EOS appended; the stream cut every L-2 tokens and
                framed [BOS] chunk [EOS] (GPT-2: both 50256); the tail shorter than L-2 is dropped and counted.
    wrap=False: [BOS] doc [EOS] per document, the document cut to its first L-2 tokens (the rest counted as dropped).

Bytes: a document's UTF-8 length (exactly) is split over its tokens at the end offsets of the fast tokenizer's
offset mapping; a token that ends inside a character gets 0 bytes, the token that completes it gets them all.
BOS/EOS cover 0 bytes. Only a block cut inside a multi-token character can move bytes between blocks.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from prime_eval.errors import UserError


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



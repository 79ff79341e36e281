"""Tokenizers for checkpoints: load one (directory, file or hub id) and check its size against the vocabulary."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prime_eval.errors import UserError

TOKENIZER_HINTS = {
    32000: "Llama-2 SentencePiece, 32000 (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T)",
    50257: "GPT-2 BPE, 50257 (gpt2)",
}


def load_tokenizer(spec: str | os.PathLike, *, vocab_size: int | None = None, exact: bool = True):
    """A transformers tokenizer from a local directory, a SentencePiece `*.model` file, a `tokenizer.json`, or a
    hub id. With `vocab_size`, check that `len(tokenizer)` equals it (`exact=False`: at most it, for HF ARMs whose
    output rows are padded).

    Llama-2 `tokenizer.model` -> `LlamaTokenizer` (32000); a directory with `vocab.json` + `merges.txt` ->
    `GPT2Tokenizer` (50257; transformers 5's fast GPT-2 class cannot be built from those files alone).
    """
    from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    s = str(spec)
    p = Path(s)
    try:
        if p.is_file() and p.suffix == ".model":
            with tempfile.TemporaryDirectory() as tmp:
                os.symlink(p.resolve(), Path(tmp) / "tokenizer.model")
                tok = LlamaTokenizer.from_pretrained(tmp)
        elif p.is_file() and p.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=s)
        elif p.is_dir():
            files = {q.name for q in p.iterdir()}
            if files & {"tokenizer.json", "tokenizer_config.json"}:
                tok = AutoTokenizer.from_pretrained(s)
            elif "tokenizer.model" in files:
                tok = LlamaTokenizer.from_pretrained(s)
            elif {"vocab.json", "merges.txt"} <= files:
                tok = GPT2Tokenizer.from_pretrained(s)
            else:
                raise UserError(f"tokenizer directory {s} has no tokenizer.json, tokenizer_config.json, "
                                "tokenizer.model or vocab.json + merges.txt")
        elif p.exists():
            raise UserError(f"tokenizer {s}: expected a directory, a SentencePiece .model or a tokenizer.json file")
        else:
            tok = AutoTokenizer.from_pretrained(s)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load tokenizer {s!r}: {type(e).__name__}: {str(e)[:300]}. Pass a local "
                        "directory (or tokenizer.model file), or a hub id that is cached / reachable.") from e
    if vocab_size is not None:
        check_tokenizer_vocab(tok, vocab_size, exact=exact, name=s)
    return tok


def check_tokenizer_vocab(tokenizer, vocab_size: int, *, exact: bool = True, name: str = "tokenizer") -> None:
    """UserError unless len(tokenizer) == vocab_size (exact=False: at most vocab_size), naming the expected one."""
    n = len(tokenizer)
    if n == vocab_size or (not exact and n <= vocab_size):
        return
    hint = TOKENIZER_HINTS.get(vocab_size)
    raise UserError(f"tokenizer {name} has {n} tokens but the checkpoint's vocabulary is {vocab_size}"
                    + (f"; this checkpoint family uses the {hint} tokenizer" if hint else "")
                    + ". Pass the matching tokenizer (tokenizer=DIR).")

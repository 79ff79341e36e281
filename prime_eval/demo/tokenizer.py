"""The demo's tokenizer (a byte-level BPE trained on the synthetic corpus) and the length model of its blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIAL = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE of exactly `vocab_size` tokens (id 0 = `<|endoftext|>`, used as BOS and EOS), saved as a
    transformers tokenizer folder; returns the loaded `PreTrainedTokenizerFast`. Deterministic when
    TOKENIZERS_PARALLELISM=false (one thread: the same merges every run)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, not {vocab_size}: the corpus is too "
                           "small for this vocabulary")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL,
                                 model_max_length=2048)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    loaded = AutoTokenizer.from_pretrained(str(out_dir))
    if len(loaded) != vocab_size:
        raise RuntimeError(f"saved tokenizer has {len(loaded)} tokens, expected {vocab_size}")
    return loaded


def encode_texts(tokenizer, texts: list[str], batch: int = 4096) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out += [list(x) for x in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]]
    return out


def length_model(token_docs: list[list[int]], max_len: int) -> np.ndarray:
    """log q̂(L) for block lengths L = tokens + 2 in [0, max_len]: add-one smoothing over 3..max_len.

    A diffusion model scores a block of known length L, so its NELBO bounds −log q(x | L); adding −log q̂(L) gives a
    bound on −log q(x) of a proper distribution over documents (`prime_eval.demo` docstring)."""
    counts = np.zeros(max_len + 1)
    for d in token_docs:
        if len(d) + 2 <= max_len:
            counts[len(d) + 2] += 1
    counts[3:] += 1.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())

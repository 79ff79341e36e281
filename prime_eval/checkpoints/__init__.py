"""Checkpoint detection and loading: released files as they are, no conversion step.

    net, info = load_network("mdm-prime-v2-3300flops-weight-only.pth")   # lit_gpt TransEncoder, ℓ=15, b=2
    info = inspect_checkpoint("checkpoint.ckpt")                          # shapes only; no tensor data is read
    sha = checkpoint_sha256("model.safetensors", extra={"tokenizer": tok_dir})

| module | holds |
|---|---|
| `containers.py` | reading files, folders and hub ids: keys, shapes, dtypes, hyper-parameters, streamed tensors |
| `unpickle.py` | the stub unpickler for Lightning `.ckpt` (no omegaconf / transformers / Lightning; no code run) |
| `spec.py` | `Spec`: what will be built, with the inferred and assumed config fields |
| `detect.py` | the architecture from key names; dispatch to `detect_lit_gpt.py` / `detect_mdlm.py` |
| `load.py` | build on meta, strict key/shape check with hints, `load_network`, `inspect_checkpoint`, the `info` dict |
| `tokenizers.py` | `load_tokenizer`, `check_tokenizer_vocab` |
| `identity.py` | `checkpoint_sha256`: the content identity of a checkpoint (+ tokenizer, permutation) |

Architectures (`info["arch"]`): `lit_gpt` (`prime_eval.networks.lit_gpt`), `mdlm` (`prime_eval.networks.mdlm_dit`),
`hf` (`prime_eval.networks.hf_causal`). See docs/checkpoints.md.
"""
from prime_eval.checkpoints.identity import checkpoint_sha256
from prime_eval.checkpoints.load import inspect_checkpoint, load_network
from prime_eval.checkpoints.tokenizers import TOKENIZER_HINTS, check_tokenizer_vocab, load_tokenizer

__all__ = ["load_network", "inspect_checkpoint", "load_tokenizer", "check_tokenizer_vocab", "checkpoint_sha256",
           "TOKENIZER_HINTS"]

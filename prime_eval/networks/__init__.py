"""Networks, one architecture per file. Every network satisfies the contract in docs/ARCHITECTURE.md:
attributes `family`, `vocab_size`, `mask_id`, `ell`, `base`, `max_length`; the trunk `hidden(idx, *,
attention_mask=None, at=None)` -> final hidden states (N, d) and the output head `head(h, inputs=None)` -> fp32 logits
over exactly `vocab_size` classes; `forward(idx, *, attention_mask=None, logits_at=None)` = head ∘ hidden
(`contract.HiddenHead`).

| file | classes | upstream |
|---|---|---|
| `lit_gpt.py` | `GPT` (arm), `TransEncoder` (mdm ℓ=1, prime ℓ>1) | SMDM / MDM-Prime-v2 SlimPajama (`Diff_LLaMA_*M`) |
| `mdlm_dit.py` | `DIT` (mdm), `PerceiverDIT` (prime), `AR` (arm) | MDLM / MDM-Prime v1 OpenWebText |
| `megatron.py` | `GPTModel` (arm), `MaskedDiffModel` (mdm ℓ=1, prime ℓ>1) | MDM-Prime-v2 Megatron C4 scaling runs |
| `hf_causal.py` | `HFCausalLM` (arm) | any transformers `AutoModelForCausalLM` |

`contract.py` holds the halves' glue (`HiddenHead`, `position_inputs`); `kv_cache.py` the key/value caches of the
causal networks; `toy.py` the tiny float64 networks of the audits and tests.

Checkpoint detection and loading live in `prime_eval.checkpoints` (`load_network`, `inspect_checkpoint`); Megatron's
file layouts in `prime_eval.checkpoints.megatron_files`.
"""
from prime_eval.networks.hf_causal import HFCausalLM
from prime_eval.networks.lit_gpt import GPT, Config as LitGPTConfig, TransEncoder
from prime_eval.networks.mdlm_dit import AR, DIT, DiTConfig, PerceiverDIT
from prime_eval.networks.megatron import GPTModel, MaskedDiffModel, MegatronConfig

__all__ = ["GPT", "TransEncoder", "LitGPTConfig", "DIT", "PerceiverDIT", "AR", "DiTConfig", "HFCausalLM",
           "GPTModel", "MaskedDiffModel", "MegatronConfig"]

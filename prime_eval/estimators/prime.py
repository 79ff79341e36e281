"""MDM-Prime likelihood estimators over sub-tokens y = f_ℓ(π(x)) (method.md §2.3–2.4, §3.3, §5).

The network sees L·ℓ sub-tokens (mask = b) and outputs a V-way softmax p̃_θ(c | y_t) per token. The **valid**
bound charges each masked sub-token the -log of its marginal:

    NELBO_Prime(x) = ∫_0^1 (1/t) E_{y_t} [ Σ_i Σ_{j: y_t^{i,j} = m} -log p_θ(y^{i,j} = digit_j(π(x^i)) | y_t) ] dt
    p_θ(y^{i,j} = v | y_t) = Σ_{c: Digits[c, j] = v} p̃_θ(c | y_t)              (one matmul: P @ onehot(Digits))

p̃ is the plain softmax, or with `carry_over` the softmax restricted to tokens consistent with the token's visible
digits (MDM-Prime v1). Both are valid bounds. Estimators:
- `mc`           (default) sub-tokens of the target masked independently at stratified rate t, weight 1/t.
- `exact_count`  l ~ stratified over 1..nℓ masked sub-tokens, weight nℓ/l (same expectation).
- `sqrt_count`   l ~ q(l) ∝ l^(-1/2) over 1..nℓ (stratified through its inverse CDF), weight 1/(q(l)·l) (same
                 expectation, lower variance: few masked sub-tokens carry the large weights).
- `levels`       K random orders of the nℓ sub-tokens, every level l = nℓ..1 once, Σ_l (1/l) Σ_{masked} -log marginal.
- `legacy_joint` the *published* form: (1/(t+1e-6)) Σ_{target tokens} -log p̃_θ(x^i | y_t), the joint token CE
                 charged once per token (v2 lit_gpt: every target token; `legacy_scope="masked"`: only tokens with a
                 masked sub-token, as V1 with carry-over). Optional CFG, temperature τ(t) = (1-temp)t + temp and
                 chunked masking "points/sizes" as in evaluate_prime.py. It is **not** an upper bound on NLL (it
                 misses the conditional total correlation among a token's masked sub-tokens): `is_bound = False`.
With ℓ = 1 and π = id, `mc`, `exact_count` and `sqrt_count` reproduce the MDM estimators exactly (same seed, same
draws).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prime_eval import bound_kind as BK
from prime_eval.errors import UserError
from prime_eval.estimators.rows import Rows, matmul_fixed_rows
from prime_eval.estimators.sampler import MaskDraw, MaskSampler
from prime_eval.subtokenizer import SubTokenizer


def parse_chunk(spec: str | None) -> list[tuple[float, int]]:
    """"0.0_0.75/1_15" -> [(0.0, 1), (0.75, 15)]: for t >= point use chunks of that many sub-tokens."""
    if not spec:
        return [(0.0, 1)]
    try:
        points, sizes = spec.split("/")
        pairs = [(float(p), int(s)) for p, s in zip(points.split("_"), sizes.split("_"), strict=True)]
    except ValueError as e:
        raise UserError(f"bad chunk spec {spec!r}: expected 'points/sizes' such as '0.0_0.75/1_15'") from e
    if any(s < 1 for _, s in pairs):
        raise UserError(f"bad chunk spec {spec!r}: chunk sizes must be >= 1")
    return sorted(pairs)


class PrimeEstimator:
    """Estimators of an MDM-Prime network. `subtokenizer` fixes V, ℓ, b and π; the mask id is b."""

    family = "prime"

    def __init__(self, name: str, *, subtokenizer: SubTokenizer, carry_over: bool = False, eps: float = 0.0,
                 T: int | None = None, cfg: float = 0.0, temperature: float | None = None,
                 chunk: str | None = None, legacy_scope: str = "all"):
        if name not in ("mc", "exact_count", "sqrt_count", "levels", "legacy_joint"):
            raise UserError(f"unknown Prime estimator {name!r}; choose mc (valid bound), exact_count, sqrt_count, "
                            "levels or legacy_joint")
        if name != "legacy_joint" and (cfg or temperature is not None or chunk):
            raise UserError("cfg, temperature and chunk are not likelihoods; they are accepted only with "
                            "estimator=legacy_joint (to reproduce published numbers)")
        if legacy_scope not in ("all", "masked"):
            raise UserError(f"legacy_scope must be 'all' or 'masked', got {legacy_scope!r}")
        self.name, self.st, self.carry_over = name, subtokenizer, carry_over
        self.eps, self.T, self.cfg, self.temperature = eps, T, float(cfg), temperature
        self.chunks = parse_chunk(chunk)
        self.chunk = chunk
        self.sampler = MaskSampler.for_estimator("prime", name, eps=eps, T=T, chunks=tuple(self.chunks))
        self.legacy_scope = legacy_scope
        self.mask_id = subtokenizer.base
        # onehot[c, j*b + v] = 1[digit_j(π(c)) = v]  (V, ℓ·b); ℓ = 1 uses a gather instead (b = V).
        if subtokenizer.ell > 1:
            self.onehot = subtokenizer.digit_onehot()
        self._on_device: dict = {}

    def _onehot(self, like: torch.Tensor) -> torch.Tensor:
        """The one-hot digit table on the logits' device and dtype (cached)."""
        key = (like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = self.onehot.to(device=like.device, dtype=like.dtype)
        return self._on_device[key]

    @property
    def bound_kind(self) -> str:
        """`prime_eval.bound_kind`: the published joint form is not a likelihood; the marginal forms are NELBOs."""
        return BK.NOT_A_LIKELIHOOD if self.name == "legacy_joint" else BK.UPPER_BOUND

    @property
    def is_bound(self) -> bool:
        return BK.is_bound(self.bound_kind)

    deterministic = False

    def config(self) -> dict:
        st = self.st
        return {"family": self.family, "estimator": self.name, "ell": st.ell, "base": st.base,
                "vocab_size": st.vocab_size, "permutation": "identity" if st.is_identity else "shuffled",
                "carry_over": self.carry_over, "eps": self.eps, "T": self.T, "cfg": self.cfg,
                "temperature": self.temperature, "chunk": self.chunk,
                "legacy_scope": self.legacy_scope if self.name == "legacy_joint" else None,
                "bound_kind": self.bound_kind, "is_bound": self.is_bound}

    # -- rows and costs -----------------------------------------------------------------------------------------
    def draw(self, target: torch.Tensor, generator: torch.Generator | None, num_samples: int, *,
             u: torch.Tensor | None = None) -> MaskDraw:
        """K mask sets over the n·ℓ target sub-tokens from `self.sampler` (`estimators.sampler`): the per-sample
        uniforms u (K,) are drawn from `generator` unless given (`ppl` gives its block-stratified u)."""
        return self.sampler.draw_for(target, generator, num_samples, units_per_token=self.st.ell, u=u)

    def rows(self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None, num_samples: int, *,
             u: torch.Tensor | None = None) -> Rows:
        """Rows of K samples: `rows_from_draw` of `draw`."""
        return self.rows_from_draw(x, target, self.draw(target, generator, num_samples, u=u))

    def rows_from_draw(self, x: torch.Tensor, target: torch.Tensor, draw: MaskDraw) -> Rows:
        """Rows of a mask draw (or of a slice of one, `MaskDraw.samples`)."""
        x, target = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(target, dtype=torch.bool)
        return self.rows_from_masks(x, target, draw.masks, draw.weights, t=draw.t)

    def rows_from_masks(self, x: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor,
                        t: torch.Tensor | None = None) -> Rows:
        """Rows for given (K, n·ℓ) masks over the target sub-tokens and (K,) weights (t: for the temperature)."""
        ell = self.st.ell
        y = self.st.encode(x)  # (L·ℓ,)
        sub_target = target.repeat_interleave(ell)  # (L·ℓ,)
        sub_pos = torch.nonzero(sub_target).flatten()
        K = masks.shape[0]
        noisy = torch.zeros(K, y.numel(), dtype=torch.bool)
        noisy[:, sub_pos] = masks
        inputs = torch.where(noisy, torch.full_like(y, self.mask_id), y.expand(K, -1))
        tok_noisy = noisy.view(K, -1, ell).any(-1)  # (K, L) tokens with a masked sub-token
        if self.name == "legacy_joint" and self.legacy_scope == "all":
            score = target.expand(K, -1).clone()  # every target token, masked or not (evaluate_prime.py)
        else:
            score = tok_noisy
        rps = sub_pos.numel() if self.name == "levels" else 1  # rows summed into one sample value
        data = {"x": x, "y": y, "noisy": noisy, "weights": weights, "score": score, "t": t, "sub_pos": sub_pos,
                "rows_per_sample": rps}
        if self.cfg:
            uncond = inputs.clone()
            uncond[:, ~sub_target] = self.mask_id  # prompt sub-tokens masked for the unconditional pass
            return Rows(inputs=torch.cat([inputs, uncond]), logits_at=torch.cat([score, score]), num_samples=K,
                        data=data)
        return Rows(inputs=inputs, logits_at=score, num_samples=K // rps, data=data)

    def log_probs(self, logits: torch.Tensor, visible_digits: torch.Tensor | None) -> torch.Tensor:
        """log p̃(c | y_t), (N, V) in the logits' dtype and device; with carry-over restricted to the classes
        consistent with the visible digits (`SubTokenizer.consistent`).

        visible_digits: (N, ℓ) digit or -1 where masked.
        """
        if self.carry_over and visible_digits is not None:
            consistent = self.st.consistent(visible_digits.to(logits.device))  # (N, V)
            logits = logits.masked_fill(~consistent, float("-inf"))
        return F.log_softmax(logits, dim=-1)

    @property
    def row_local(self) -> bool:
        """Whether each logit row's terms depend on that row alone (not with CFG, which pairs two rows)."""
        return not self.cfg

    def _scored(self, rows: Rows, logits: torch.Tensor, start: int = 0):
        """CFG-combined logits and, for logit rows start..start+C: their row, token, masked digits (C, ℓ), true
        digits (C, ℓ) and visible digits (C, ℓ; -1 where masked)."""
        d = rows.data
        K, ell = d["noisy"].shape[0], self.st.ell
        if self.cfg:
            cond, un = logits.chunk(2)
            logits = un + (self.cfg + 1.0) * (cond - un)
        row_of, tok_of = torch.nonzero(d["score"], as_tuple=True)  # (N,) row-major like the logits
        row_of, tok_of = row_of[start:start + logits.shape[0]], tok_of[start:start + logits.shape[0]]
        sub_noisy = d["noisy"].view(K, -1, ell)[row_of, tok_of]  # (C, ℓ) which digits are masked
        digits = d["y"].view(-1, ell)[tok_of]  # (C, ℓ) true digits
        visible = torch.where(sub_noisy, torch.full_like(digits, -1), digits)
        return logits, row_of, tok_of, sub_noisy, digits, visible

    def logit_terms(self, rows: Rows, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Per-position values of logit rows start..start+C (row-major over `logits_at`), float64 on the CPU:
        (C, ℓ) -log of the true digits' marginals, 0 at visible digits; legacy_joint: (C,) the joint token CE
        -log p̃(x^i | y_t) (with its temperature). The cost needs nothing else, so a caller may reduce the logits
        chunk by chunk and free them (`estimators.rows.forward_terms`); the whole request at once with CFG."""
        logits, row_of, tok_of, sub_noisy, digits, visible = self._scored(rows, logits, start)
        dev = logits.device
        if self.name == "legacy_joint":
            lg = logits
            if self.temperature is not None:  # τ(t) = (1-temp)·t + temp
                t = rows.data["t"][row_of]
                lg = lg / ((1.0 - self.temperature) * t + self.temperature)[:, None].to(lg)
            logp = self.log_probs(lg, visible)  # carry-over: a fully visible token costs exactly 0
            return -logp.gather(1, rows.data["x"][tok_of][:, None].to(dev)).squeeze(1).double().cpu()  # joint CE
        ell = self.st.ell
        logp = self.log_probs(logits, visible)
        if ell == 1:
            nll = -logp.gather(1, rows.data["x"][tok_of][:, None].to(dev))  # (C, 1)
        else:
            # (C, ℓ·b): p(y^{i,j} = v | y_t) = Σ_{c: Digits[c,j]=v} p̃(c), in blocks of fixed shape: the same bits
            # whatever chunks the caller reduces the logits in
            marg = matmul_fixed_rows(logp.exp(), self._onehot(logp))
            cols = (digits + torch.arange(ell) * self.st.base).to(dev)
            q = marg.gather(1, cols).clamp_min(torch.finfo(marg.dtype).tiny)  # (C, ℓ) true-digit marginals
            nll = -q.log()
        return nll.double().cpu() * sub_noisy.double()  # only masked digits pay

    def masked_nll_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(K, n·ℓ) float64: the marginal terms placed at their target sub-tokens, 0 elsewhere."""
        if self.name == "legacy_joint":
            raise ValueError("legacy_joint has no per-sub-token terms (it charges the joint token CE)")
        d = rows.data
        K, ell = d["noisy"].shape[0], self.st.ell
        row_of, tok_of = torch.nonzero(d["score"], as_tuple=True)
        full = torch.zeros(K, d["noisy"].shape[1] // ell, ell, dtype=torch.float64)
        full[row_of, tok_of] = terms
        return full.flatten(1)[:, d["sub_pos"]]

    def masked_nll(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(K, n·ℓ) float64: -log p_θ(y^{i,j} | y_t) (marginal) at each masked target sub-token, 0 elsewhere."""
        if self.name == "legacy_joint":
            raise ValueError("legacy_joint has no per-sub-token terms (it charges the joint token CE)")
        return self.masked_nll_from_terms(rows, self.logit_terms(rows, logits))

    def cost_from_terms(self, rows: Rows, terms: torch.Tensor) -> torch.Tensor:
        """(K,) float64 per-sample values: weight_k · Σ of the sample's terms."""
        d = rows.data
        if self.name != "legacy_joint":
            values = d["weights"] * self.masked_nll_from_terms(rows, terms).sum(1)
            return values.view(-1, d["rows_per_sample"]).sum(1)
        row_of = torch.nonzero(d["score"], as_tuple=True)[0]
        return d["weights"] * torch.zeros(d["noisy"].shape[0], dtype=torch.float64).index_add_(0, row_of, terms)

    def cost(self, rows: Rows, logits: torch.Tensor) -> torch.Tensor:
        """(K,) float64 per-sample values from the logits at `rows.logits_at` (N, V)."""
        return self.cost_from_terms(rows, self.logit_terms(rows, logits))


def digit_marginals(st: SubTokenizer, log_probs: torch.Tensor) -> torch.Tensor:
    """(N, V) log p̃ -> (N, ℓ, b) marginals p(y^j = v) = Σ_{c: Digits[c,j]=v} p̃(c)  (for greedy decoding / audit)."""
    N, V = log_probs.shape
    out = torch.zeros(N, st.ell, st.base, dtype=torch.float64)
    p = log_probs.double().exp()
    for j in range(st.ell):
        out[:, j].index_add_(1, st.digit_table[:, j], p)
    return out


__all__ = ["PrimeEstimator", "parse_chunk", "digit_marginals"]

"""The MDM-Prime sub-tokenizer y = f_ℓ(π(x)): index shuffling π, then base-b digits (method.md §1.1–1.3).

    digit_j(c) = floor(c / b^(ℓ-1-j)) mod b,   j = 0..ℓ-1 (most significant first)
    encode:  x (…, L) -> y (…, L·ℓ), token-major: y[…, i·ℓ + j] = digit_j(π(x_i))
    decode:  x_i = π^{-1}(Σ_j y[i·ℓ+j] b^(ℓ-1-j))

b = ceil(V^(1/ℓ)) when ℓ is given, ℓ = ceil(log_b V) when b is given; binary encoding is b=2, ℓ=ceil(log2 V).
The b^ℓ - V codes c with π^{-1}(c) >= V are *invalid*: no token maps to them.

The digit table Digits[c, j] = digit_j(π(c)) (V, ℓ) is the one home of two rules every caller shares:
    consistency (carry-over, MDM-Prime v1):  c is consistent with visible digits y  ⇔  ∀ visible j: Digits[c, j] = y_j
    digit marginals:                         p(y^j = v) = Σ_{c: Digits[c, j] = v} p̃(c)   (P @ digit_onehot())

Permutation files (upstream): a torch-saved int64 tensor `perm` of length b^ℓ, encoding x -> perm[x].
The lit_gpt (SlimPajama) release permutes ids [0, V) among themselves and leaves [V, b^ℓ) fixed; the megatron (C4)
release permutes all b^ℓ codes.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from prime_eval.errors import UserError


def base_from_ell(vocab_size: int, ell: int) -> int:
    """Smallest b with b^ℓ >= V (upstream: ceil(V ** (1/ℓ)), corrected for float round-off)."""
    if ell < 1:
        raise UserError(f"ℓ (ell) must be >= 1, got {ell}")
    b = max(2, math.ceil(vocab_size ** (1.0 / ell))) if ell > 1 else vocab_size
    while b > 2 and (b - 1) ** ell >= vocab_size:
        b -= 1
    while b**ell < vocab_size:
        b += 1
    return b


def ell_from_base(vocab_size: int, base: int) -> int:
    """Smallest ℓ with b^ℓ >= V; binary encoding: ell_from_base(V, 2) = ceil(log2 V)."""
    if base < 2:
        raise UserError(f"base b must be >= 2, got {base}")
    ell = 1
    while base**ell < vocab_size:
        ell += 1
    return ell


class SubTokenizer:
    """f_ℓ∘π for a vocabulary of V tokens. Holds `perm` (π), `inv_perm` (π^-1) and `digit_table` (V, ℓ).

    Args:
        vocab_size: V.
        ell / base: give one (the other is derived) or both (must satisfy b^ℓ >= V).
        perm: LongTensor (b^ℓ,) permutation of the codes, or None for the identity.
    """

    def __init__(self, vocab_size: int, *, ell: int | None = None, base: int | None = None,
                 perm: torch.Tensor | None = None):
        if ell is None and base is None:
            raise UserError("give ℓ (ell) or b (base) for the sub-tokenizer, e.g. ell=15 or base=2")
        if ell is None:
            ell = ell_from_base(vocab_size, base)
        if base is None:
            base = base_from_ell(vocab_size, ell)
        if base**ell < vocab_size:
            raise UserError(f"b^ℓ = {base}^{ell} = {base**ell} codes cannot hold V = {vocab_size} tokens; "
                            f"use ell >= {ell_from_base(vocab_size, base)} for base {base}")
        self.vocab_size, self.ell, self.base = vocab_size, ell, base
        self.num_codes = base**ell
        if perm is None:
            perm = torch.arange(self.num_codes)
        check_permutation(perm, self.num_codes)
        self.perm = perm.to(torch.long)
        self.inv_perm = torch.empty_like(self.perm)
        self.inv_perm[self.perm] = torch.arange(self.num_codes)
        self.powers = base ** torch.arange(ell - 1, -1, -1, dtype=torch.long)  # (ℓ,) b^(ℓ-1-j)
        self.digit_table = self.digits(self.perm[:vocab_size])  # (V, ℓ): Digits[c, j] = digit_j(π(c))
        self._tables: dict = {}  # device -> digit_table there

    @property
    def is_identity(self) -> bool:
        return bool(torch.equal(self.perm, torch.arange(self.num_codes)))

    @property
    def num_invalid_codes(self) -> int:
        return self.num_codes - self.vocab_size

    def invalid_codes(self) -> torch.Tensor:
        """Codes k with π^-1(k) >= V (no token encodes to them), sorted."""
        return torch.nonzero(self.inv_perm >= self.vocab_size).flatten()

    def digits(self, codes: torch.Tensor) -> torch.Tensor:
        """(…,) codes -> (…, ℓ) base-b digits, most significant first."""
        return torch.div(codes.unsqueeze(-1), self.powers.to(codes.device), rounding_mode="floor") % self.base

    def digit_table_on(self, device) -> torch.Tensor:
        """`digit_table` (V, ℓ) on `device` (cached)."""
        key = torch.device(device)
        if key not in self._tables:
            self._tables[key] = self.digit_table.to(key)
        return self._tables[key]

    def digit_onehot(self) -> torch.Tensor:
        """(V, ℓ·b) float64 with onehot[c, j·b + v] = 1[Digits[c, j] = v]: P (N, V) @ onehot gives the per-digit
        marginals p(y^j = v) = Σ_{c: Digits[c, j] = v} P[c]."""
        onehot = torch.zeros(self.vocab_size, self.ell * self.base, dtype=torch.float64)
        cols = self.digit_table + torch.arange(self.ell) * self.base
        return onehot.scatter_(1, cols, 1.0)

    def consistent(self, visible: torch.Tensor) -> torch.Tensor:
        """Carry-over rule: (…, ℓ) visible digits (-1 where masked) -> (…, V) bool, True for the classes c with
        Digits[c, j] = visible_j at every visible j (all classes where nothing is visible).

        Computed as Σ_{j visible} Digits[c, j]·b^(ℓ-1-j) = Σ_{j visible} visible_j·b^(ℓ-1-j): one float64 matrix
        product per 256 rows, exact (integers below b^ℓ ≤ 2^52), instead of ℓ passes over (…, V)."""
        if self.num_codes > 2**52:  # beyond exact float64 integers: digit by digit
            table = self.digit_table_on(visible.device)  # (V, ℓ)
            ok = torch.ones(*visible.shape[:-1], self.vocab_size, dtype=torch.bool, device=visible.device)
            for j in range(self.ell):
                yj = visible[..., j, None]  # (…, 1)
                ok &= (yj < 0) | (table[:, j] == yj)
            return ok
        key = ("float64", torch.device(visible.device))
        if key not in self._tables:
            self._tables[key] = self.digit_table.to(visible.device, torch.float64).T.contiguous()  # (ℓ, V)
        table_t = self._tables[key]
        flat = visible.reshape(-1, self.ell)  # (N, ℓ)
        seen = (flat >= 0).double() * self.powers.to(visible.device, torch.float64)  # (N, ℓ) b^(ℓ-1-j) if visible
        target = (flat.clamp_min(0).double() * seen).sum(1, keepdim=True)  # (N, 1)
        ok = torch.empty(flat.shape[0], self.vocab_size, dtype=torch.bool, device=visible.device)
        for s in range(0, flat.shape[0], 256):
            ok[s:s + 256] = (seen[s:s + 256] @ table_t) == target[s:s + 256]
        return ok.view(*visible.shape[:-1], self.vocab_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (…, L) -> sub-token ids (…, L·ℓ), token-major."""
        x = torch.as_tensor(x, dtype=torch.long)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise UserError(f"token id out of range [0, {self.vocab_size}): min {int(x.min())}, max {int(x.max())}; "
                            "does the tokenizer match the model's vocabulary?")
        y = self.digits(self.perm.to(x.device)[x])  # (…, L, ℓ)
        return y.flatten(-2)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """Sub-token ids (…, L·ℓ) -> token ids (…, L); an invalid code decodes to -1."""
        y = torch.as_tensor(y, dtype=torch.long)
        if y.shape[-1] % self.ell:
            raise ValueError(f"length {y.shape[-1]} is not a multiple of ℓ={self.ell}")
        codes = (y.unflatten(-1, (-1, self.ell)) * self.powers.to(y.device)).sum(-1)
        x = self.inv_perm.to(y.device)[codes]
        return torch.where(x < self.vocab_size, x, torch.full_like(x, -1))

    def __repr__(self) -> str:
        kind = "identity" if self.is_identity else "shuffled"
        return f"SubTokenizer(V={self.vocab_size}, ℓ={self.ell}, b={self.base}, π={kind})"


def check_permutation(perm: torch.Tensor, num_codes: int, source: str = "permutation") -> None:
    """Raise UserError unless `perm` is a 1-D integer permutation of range(num_codes)."""
    if not isinstance(perm, torch.Tensor):
        raise UserError(f"{source}: expected a torch tensor of length {num_codes}, got {type(perm).__name__}")
    if perm.dim() != 1 or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise UserError(f"{source}: expected a 1-D integer tensor, got dtype {perm.dtype} and shape {tuple(perm.shape)}")
    if perm.numel() != num_codes:
        raise UserError(f"{source}: length {perm.numel()} but b^ℓ = {num_codes} codes are needed; "
                        "the file belongs to another (V, b, ℓ) — e.g. perm_32768.pt is for b=2, ℓ=15")
    seen = torch.zeros(num_codes, dtype=torch.bool)
    p = perm.to(torch.long)
    if int(p.min()) < 0 or int(p.max()) >= num_codes:
        raise UserError(f"{source}: values must lie in [0, {num_codes}), found [{int(p.min())}, {int(p.max())}]")
    seen[p] = True
    if not bool(seen.all()):
        missing = int((~seen).sum())
        raise UserError(f"{source}: not a permutation ({missing} codes never appear, so others repeat); "
                        "the file is corrupt or not a permutation file")


def load_permutation(path: str | Path, num_codes: int | None = None) -> torch.Tensor:
    """Load an upstream permutation file (torch-saved int64 tensor, or a dict holding one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"permutation file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure is a bad file
        raise UserError(f"cannot read permutation file {path}: {e}. Expected a torch-saved int64 tensor "
                        "(torch.save(perm, path))") from e
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise UserError(f"permutation file {path} holds a dict with {len(tensors)} tensors; expected one")
        obj = tensors[0]
    if num_codes is None and isinstance(obj, torch.Tensor):
        num_codes = obj.numel()
    check_permutation(obj, num_codes, source=f"permutation file {path}")
    return obj.to(torch.long)


def save_permutation(perm: torch.Tensor, path: str | Path) -> None:
    """Save in the upstream format (a plain torch-saved int64 tensor)."""
    check_permutation(perm, perm.numel())
    torch.save(perm.to(torch.long).clone(), Path(path))


def make_permutation(num_codes: int, vocab_size: int, *, seed: int, style: str = "lit_gpt",
                     random_ratio: float = 1.0) -> torch.Tensor:
    """A new permutation from an explicit seed.

    style="lit_gpt": shuffle ids [0, V) among themselves, codes [V, b^ℓ) fixed (the SlimPajama release's layout).
    style="megatron": shuffle the first floor(random_ratio·b^ℓ) codes among themselves (ratio 1.0 = all codes).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.arange(num_codes)
    if style == "lit_gpt":
        perm[:vocab_size] = torch.randperm(vocab_size, generator=g)
    elif style == "megatron":
        n = int(random_ratio * num_codes)
        perm[:n] = torch.randperm(n, generator=g)
    else:
        raise UserError(f"unknown permutation style {style!r}; use 'lit_gpt' or 'megatron'")
    return perm


def resolve_permutation(file: str | Path | None, num_codes: int, *, saved: torch.Tensor | None = None,
                        required: bool = False, hint: str | None = None) -> tuple[torch.Tensor | None, str]:
    """The index-shuffling permutation π of a Prime network and where it came from: (π or None for the identity,
    source).

    saved: π stored with the weights (Megatron `subtokenizer.perm`), used when present; a given `file` must then
    equal it. file: a permutation file, "identity", or None. Without either, `required` (a checkpoint trained on
    shuffled ids) is an error naming `hint`, the release's permutation file.
    """
    if saved is not None:
        saved = saved.to("cpu", torch.long)
        check_permutation(saved, num_codes, source="the permutation saved in the checkpoint")
        if file is None:
            return saved, "checkpoint"
        given = torch.arange(num_codes) if str(file) == "identity" else load_permutation(file, num_codes)
        if not torch.equal(given, saved):
            n = int((given != saved).sum())
            raise UserError(f"permutation {file} differs from the permutation saved in the checkpoint "
                            f"({n} of {num_codes} codes differ): it belongs to another run. Leave permutation= "
                            "out to use the checkpoint's own.")
        return saved, f"checkpoint (equal to {file})"
    if file is None:
        if required:
            raise UserError(f"this Prime checkpoint was trained on shuffled ids and does not carry the permutation: "
                            f"pass permutation=FILE ({hint or f'perm_<{num_codes}>.pt'} from the release), or "
                            "permutation=identity to score without one")
        return None, "identity"
    if str(file) == "identity":
        return None, "identity"
    return load_permutation(file, num_codes), str(file)

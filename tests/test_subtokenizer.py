import pytest
import torch

from prime_eval.errors import UserError
from prime_eval.subtokenizer import (SubTokenizer, base_from_ell, ell_from_base, load_permutation, make_permutation,
                                     save_permutation)


@pytest.mark.parametrize("V,ell,base", [(50257, 2, 225), (50257, 4, 15), (50257, 16, 2), (32000, 15, 2),
                                        (4, 2, 2), (27, 3, 3), (28, 3, 4)])
def test_base_and_ell(V, ell, base):
    assert base_from_ell(V, ell) == base
    assert SubTokenizer(V, ell=ell).base == base
    assert base**ell >= V and (base - 1) ** ell < V


def test_binary_encoding_ell():
    assert ell_from_base(32000, 2) == 15
    assert ell_from_base(50257, 2) == 16
    assert SubTokenizer(50257, base=2).ell == 16


def test_digits_most_significant_first_token_major():
    st = SubTokenizer(10, base=2)  # ℓ = 4
    y = st.encode(torch.tensor([[5, 9]]))
    assert y.tolist() == [[0, 1, 0, 1, 1, 0, 0, 1]]
    assert st.decode(y).tolist() == [[5, 9]]


@pytest.mark.parametrize("V,ell", [(32000, 15), (50257, 16)])
@pytest.mark.parametrize("style", [None, "lit_gpt", "megatron"])
def test_round_trip_every_id(V, ell, style):
    b = base_from_ell(V, ell)
    perm = None if style is None else make_permutation(b**ell, V, seed=0, style=style)
    st = SubTokenizer(V, ell=ell, perm=perm)
    ids = torch.arange(V)
    y = st.encode(ids[None])
    assert y.shape == (1, V * ell)
    assert int(y.max()) < b and int(y.min()) >= 0
    assert torch.equal(st.decode(y)[0], ids)
    codes = (st.digit_table * st.powers).sum(1)
    assert torch.equal(codes, st.perm[:V])  # Digits[c, j] = digit_j(π(c))
    assert st.invalid_codes().numel() == b**ell - V


def test_invalid_codes_per_style():
    V, n = 32000, 2**15
    lit = SubTokenizer(V, ell=15, perm=make_permutation(n, V, seed=1, style="lit_gpt"))
    assert torch.equal(lit.invalid_codes(), torch.arange(V, n))
    meg = SubTokenizer(V, ell=15, perm=make_permutation(n, V, seed=1, style="megatron"))
    assert meg.invalid_codes().numel() == n - V and int(meg.invalid_codes().min()) < V
    # invalid codes decode to -1
    y = meg.digits(meg.invalid_codes()[:3]).flatten()
    assert meg.decode(y).tolist() == [-1, -1, -1]


def test_permutation_files(tmp_path):
    perm = make_permutation(2**15, 32000, seed=3, style="lit_gpt")
    save_permutation(perm, tmp_path / "perm_32768.pt")
    loaded = load_permutation(tmp_path / "perm_32768.pt", 2**15)
    assert torch.equal(loaded, perm)
    assert torch.equal(make_permutation(2**15, 32000, seed=3), perm)  # seeded
    assert not torch.equal(make_permutation(2**15, 32000, seed=4), perm)
    torch.save(perm[:100], tmp_path / "short.pt")
    with pytest.raises(UserError, match="length 100 but b\\^ℓ = 32768"):
        load_permutation(tmp_path / "short.pt", 2**15)
    bad = perm.clone()
    bad[0] = bad[1]
    torch.save(bad, tmp_path / "dup.pt")
    with pytest.raises(UserError, match="not a permutation"):
        load_permutation(tmp_path / "dup.pt", 2**15)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read permutation file"):
        load_permutation(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_permutation(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="cannot hold"):
        SubTokenizer(32000, ell=14, base=2)


def test_encode_rejects_out_of_range_ids():
    st = SubTokenizer(100, ell=2)
    with pytest.raises(UserError, match="out of range"):
        st.encode(torch.tensor([100]))


def test_consistency_rule_and_digit_onehot():
    """The carry-over rule and the one-hot digit table, against their definitions (π shuffled)."""
    st = SubTokenizer(20, base=3, perm=make_permutation(27, 20, seed=5))  # ℓ = 3
    g = torch.Generator().manual_seed(0)
    visible = torch.randint(-1, 3, (6, 4, 3), generator=g)  # (…, ℓ), -1 = masked
    ok = st.consistent(visible)
    assert ok.shape == (6, 4, 20)
    for idx in torch.cartesian_prod(torch.arange(6), torch.arange(4)).tolist():
        v = visible[idx[0], idx[1]]
        want = [all(int(v[j]) < 0 or int(st.digit_table[c, j]) == int(v[j]) for j in range(3)) for c in range(20)]
        assert ok[idx[0], idx[1]].tolist() == want
    onehot = st.digit_onehot()
    assert onehot.shape == (20, 9) and onehot.dtype == torch.float64
    assert torch.equal(onehot.view(20, 3, 3).argmax(-1), st.digit_table) and torch.equal(onehot.sum(1),
                                                                                          torch.full((20,), 3.0))


def test_network_estimator_and_oracle_share_the_consistency_rule():
    """v1 PerceiverDIT, the Prime estimator's carry-over and the oracle all allow exactly `SubTokenizer.consistent`."""
    from prime_eval.estimators.prime import PrimeEstimator
    from prime_eval.networks.mdlm_dit import DiTConfig, PerceiverDIT
    from prime_eval.networks.toy import OracleDenoiser

    cfg = DiTConfig(hidden_size=32, n_blocks=1, n_heads=2, cond_dim=8, length=16, vocab_size=50)
    net = PerceiverDIT(cfg, ell=2, carry_over=True).eval()  # b = 8, identity π
    st = SubTokenizer(50, ell=2)
    x = torch.tensor([[8, 8, 3, 8, 6, 1, 8, 7]])  # masked digit = 8
    visible = x.view(1, 4, 2).masked_fill(x.view(1, 4, 2) == 8, -1)
    want = st.consistent(visible)[0]  # (L, V)
    with torch.no_grad():
        assert torch.equal(net(x)[0] > torch.finfo(torch.float32).min, want)
    est = PrimeEstimator("mc", subtokenizer=st, carry_over=True)
    assert torch.equal(torch.isfinite(est.log_probs(torch.zeros(4, 50), visible[0])), want)
    oracle = OracleDenoiser(torch.full((50,), 1 / 50), st)
    assert torch.equal(oracle(x)[0] > -1e29, want)

"""The math of the compression operators: specs, omega/delta, unbiasedness, variance,
contraction, reproducibility and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compression import QSGD, Compressed, Compressor, _buckets, parse_compressor, randk_indices

ALL_SPECS = [
    "identity",
    "qsgd:s=1,bucket=4096,norm=l2",
    "qsgd:s=4,bucket=128,norm=max",
    "natural",
    "dither:s=8,bucket=4096",
    "randk:frac=0.01,unbiased=true",
    "randk:k=5,unbiased=false",
    "topk:frac=0.01",
    "scaled_sign",
    "scaled_sign:bucket=64",
    "sign",
]


def _draws(c: Compressor, x: torch.Tensor, seeds: range) -> torch.Tensor:
    return torch.stack([c.compress(x, seed=s).dense().double() for s in seeds])


def _assert_unbiased(draws: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> None:
    """E C(x) = x, checked on the mean of N draws. Coordinates are sorted by |x_j| into 8
    groups; in each, sum_j sign(x_j)(mean_j - x_j) has standard deviation
    sqrt(sum_j var_j / N) and must lie within 5.5 of them (sums over many coordinates are
    near normal even when single coordinates are rare Bernoulli events). Zero-variance
    coordinates must be exact."""
    n = draws.shape[0]
    xd = x.double()
    certain = var == 0
    assert torch.equal(draws[:, certain], xd[certain].expand(n, -1))
    err = (draws.mean(0) - xd)[~certain] * torch.where(xd[~certain] < 0, -1.0, 1.0)
    var_u, order = var[~certain], torch.argsort(xd[~certain].abs())
    for group in torch.tensor_split(order, 8):
        if group.numel():
            z = float(err[group].sum() / torch.sqrt(var_u[group].sum() / n))
            assert abs(z) < 5.5, f"group mean off by {z:.1f} standard errors"


def _tiled(x: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` copies of x one after the other: with bucket = len(x), one call gives
    ``copies`` independent draws of C(x)."""
    return x.repeat(copies)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("identity", "identity"),
        ("QSGD", "qsgd:s=1,bucket=4096,norm=l2"),
        ("qsgd:s=4", "qsgd:s=4,bucket=4096,norm=l2"),
        ("qsgd: bucket=0, norm=MAX, s=2", "qsgd:s=2,bucket=0,norm=max"),
        ("natural", "natural"),
        ("dither", "dither:s=8,bucket=4096"),
        ("randk", "randk:frac=0.01,unbiased=true"),
        ("randk:k=100,unbiased=false", "randk:k=100,unbiased=false"),
        ("topk:frac=0.05", "topk:frac=0.05"),
        ("topk:k=3", "topk:k=3"),
        ("scaled_sign", "scaled_sign"),
        ("scaled_sign:bucket=512", "scaled_sign:bucket=512"),
        ("sign", "sign"),
    ],
)
def test_spec_is_canonical_and_round_trips(spec: str, canonical: str) -> None:
    c = parse_compressor(spec)
    assert c.spec == canonical
    assert parse_compressor(c.spec).spec == canonical
    assert parse_compressor(c.spec) == c


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gzip", "unknown compressor"),
        ("qsgd:s=0", "s >= 1"),
        ("qsgd:s=-3", "s >= 1"),
        ("qsgd:s=one", "not an integer"),
        ("qsgd:levels=4", "unknown parameter"),
        ("qsgd:s=2,s=3", "given twice"),
        ("qsgd:s", "key=value"),
        ("qsgd:norm=l1", "l2 or max"),
        ("qsgd:bucket=-1", "bucket"),
        ("dither:s=0", "s >= 1"),
        ("randk:k=0", "k >= 1"),
        ("randk:frac=0", "0 < frac"),
        ("randk:frac=1.5", "0 < frac"),
        ("randk:k=3,frac=0.1", "exactly one"),
        ("randk:unbiased=maybe", "boolean"),
        ("topk:frac=nan", "not finite"),
        ("sign:bucket=3", "unknown parameter"),
        ("qsgd:", "no parameters"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compressor(spec)


def test_omega_and_delta_formulas() -> None:
    d = 10_000
    assert parse_compressor("identity").omega(d) == 0.0
    assert parse_compressor("qsgd:s=1,bucket=0").omega(d) == pytest.approx(100.0)  # sqrt(d)/s
    assert parse_compressor("qsgd:s=16,bucket=0").omega(d) == pytest.approx(100 / 16)
    assert parse_compressor("qsgd:s=256,bucket=0").omega(d) == pytest.approx(d / 256**2)
    assert parse_compressor("qsgd:s=1,bucket=64").omega(d) == pytest.approx(8.0)
    assert parse_compressor("natural").omega(d) == 1 / 8
    t = math.sqrt(64) * 2.0 ** (1 - 8)
    assert parse_compressor("dither:s=8,bucket=64").omega(d) == pytest.approx(1 / 8 + t * t)
    assert parse_compressor("randk:frac=0.01").omega(d) == pytest.approx(99.0)
    assert parse_compressor("randk:k=100,unbiased=false").delta(d) == pytest.approx(0.01)
    assert parse_compressor("topk:frac=0.02").delta(d) == pytest.approx(0.02)
    assert parse_compressor("scaled_sign").delta(d) == pytest.approx(1 / d)
    assert parse_compressor("scaled_sign:bucket=100").delta(d) == pytest.approx(0.01)
    for biased in ("topk:k=3", "scaled_sign", "sign", "randk:k=3,unbiased=false"):
        c = parse_compressor(biased)
        assert not c.unbiased
        with pytest.raises(ValueError, match="biased"):
            c.omega(d)
    for unbiased in ("identity", "qsgd", "natural", "dither", "randk"):
        c = parse_compressor(unbiased)
        assert c.unbiased
        with pytest.raises(ValueError, match="unbiased"):
            c.delta(d)
    with pytest.raises(ValueError, match="contraction"):
        parse_compressor("sign").delta(d)


# ----------------------------------------------------------------------------- unbiased


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    x[::7] = 0.0  # exact zeros
    return x


def _qsgd_exact_variance(x: torch.Tensor, s: int, norm: str) -> torch.Tensor:
    """Var C(x)_j = (||x||/s)^2 theta_j (1 - theta_j), theta_j = frac(s|x_j|/||x||)."""
    xd = x.double()
    n = xd.norm() if norm == "l2" else xd.abs().max()
    r = s * xd.abs() / n
    theta = r - r.floor()
    return (n / s) ** 2 * theta * (1 - theta)


@pytest.mark.parametrize(
    ("s", "norm", "gaussian", "m"),
    [
        (1, "l2", True, 1024),  # thinning
        (1, "l2", True, 1000),  # thinning, bucket size not a power of two
        (1, "l2", False, 64),
        (1, "max", False, 64),
        (4, "l2", False, 64),
        (16, "max", False, 64),
    ],
)
@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_qsgd_is_unbiased_with_the_exact_variance(
    s: int, norm: str, gaussian: bool, m: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # path: the torch code (small d), or the one-pass kernel of large d forced on small d
    monkeypatch.setattr(_buckets, "MIN_NUMEL", 1 if path == "kernel" else 1 << 62)
    x = torch.randn(m, generator=torch.Generator().manual_seed(1)) if gaussian else None
    x = x if x is not None else _heavy_tailed(m, seed=s)
    copies = 400
    c = parse_compressor(f"qsgd:s={s},bucket={m},norm={norm}")
    msg = c.compress(_tiled(x, copies), seed=11)
    if path == "torch":  # s = 1, L2 norm: thinning when it pays (no dominant coordinate)
        assert ("index" in msg.fields) == (s == 1 and norm == "l2" and gaussian)
    else:  # s = 1: the kernel's sparse fields, or thinning (bucket >= 1024)
        assert ("index" in msg.fields) == (s == 1)
    draws = msg.dense().double().view(copies, m)
    var_j = _qsgd_exact_variance(x, s, norm)
    _assert_unbiased(draws, x, var_j)
    var_exact = float(var_j.sum())
    err = draws - x.double()
    var_emp = float(err.pow(2).sum(1).mean())
    assert var_emp == pytest.approx(var_exact, rel=0.15)
    assert var_emp <= c.omega(m) * float(x.double().pow(2).sum())
    # levels are integers in -s..s times ||x||/s
    n = x.double().norm() if norm == "l2" else x.double().abs().max()
    levels = draws * s / n
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert float(levels.abs().max()) <= s + 1e-4


@pytest.fixture(params=["kernel", "torch"])
def thinning_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """QSGD s=1 thinning on the CPU by the compiled kernel or by the torch code that other
    devices (CUDA) run."""
    monkeypatch.setattr(QSGD, "_cpu_kernel", request.param == "kernel")
    return str(request.param)


@pytest.mark.parametrize("m", [4096, 1000])
def test_qsgd_thinning_paths_are_unbiased_with_the_exact_variance(
    thinning_path: str, m: int
) -> None:
    # m = 4096: envelopes per block of 256; m = 1000: one envelope for the bucket
    x = torch.randn(m, generator=torch.Generator().manual_seed(2))
    x[7] = 0.0
    copies = 300
    c = parse_compressor(f"qsgd:s=1,bucket={m}")
    msg = c.compress(_tiled(x, copies), seed=5)
    assert "index" in msg.fields
    draws = msg.dense().double().view(copies, m)
    var_j = _qsgd_exact_variance(x, 1, "l2")
    _assert_unbiased(draws, x, var_j)
    var_emp = float((draws - x.double()).pow(2).sum(1).mean())
    assert var_emp == pytest.approx(float(var_j.sum()), rel=0.15)
    assert bool((draws[:, 7] == 0).all())


def test_qsgd_thinning_hits_every_offset_of_a_block(thinning_path: str) -> None:
    # constant |x|: every coordinate has p = 1/sqrt(4096) = 1/64, so the kept coordinates'
    # offsets within the 256-blocks of the envelopes are uniform, first and last included
    x = torch.ones(4096 * 256)
    x[1::2] = -1.0
    m = parse_compressor("qsgd:s=1,bucket=4096").compress(x, seed=3)
    counts = torch.bincount(m.fields["index"] % 256, minlength=256).double()
    expected = x.numel() / 64 / 256  # 64 per offset
    assert float(counts.min()) > 0
    assert float(((counts - expected) ** 2 / expected).sum()) < 255 + 6 * math.sqrt(2 * 255)


def test_qsgd_thinning_keeps_a_lone_coordinate_and_zero_buckets(thinning_path: str) -> None:
    x = torch.zeros(3 * 2048)
    x[100] = -3.0  # bucket 0 holds one non-zero: p = 1, it must always be kept
    x[2048:4096] = torch.linspace(-1, 1, 2048)
    c = parse_compressor("qsgd:s=1,bucket=2048")
    for seed in range(20):
        y = c.compress(x, seed=seed).dense()
        assert y[100] == -3.0
        assert torch.count_nonzero(y[:2048]) == 1
        assert torch.count_nonzero(y[4096:]) == 0  # bucket of zeros stays zero


def test_qsgd_thinning_positions_cover_long_and_short_buckets(thinning_path: str) -> None:
    # per-tensor bucket longer than float32's 2^24 grid resolution would matter, and a
    # short last bucket: constant |x| makes every candidate a kept coordinate, so the kept
    # positions are the candidates themselves and must be uniform over each bucket
    for d, bucket, expect_nnz in ((3_000_001, 0, math.sqrt(3_000_001)), (10_000, 4096, None)):
        x = torch.ones(d)
        x[1::2] = -1.0
        c = parse_compressor(f"qsgd:s=1,bucket={bucket}")
        hits = torch.zeros(10, dtype=torch.float64)
        for seed in range(30):
            m = c.compress(x, seed=seed)
            assert "index" in m.fields
            index = m.fields["index"]
            assert int(index.min()) >= 0 and int(index.max()) < d
            assert bool((index[1:] > index[:-1]).all())
            hits += torch.bincount(index * 10 // d, minlength=10).double()
            y = m.dense()
            assert bool((torch.sign(y[index]) == x[index]).all())
        # P(xi_j = 1) = |x_j| / ||x_B|| = 1 / sqrt(d_B): expected hits per tenth of [0, d)
        b = d if bucket == 0 else bucket
        lengths = torch.tensor([min(b, d - i) for i in range(0, d, b)], dtype=torch.float64)
        p = (1 / lengths.sqrt()).repeat_interleave(lengths.long())
        expected = 30 * torch.bincount(torch.arange(d) * 10 // d, weights=p, minlength=10)
        assert float(((hits - expected) ** 2 / expected).sum()) < 40  # 9 dof: P(> 40) ~ 1e-5
        if expect_nnz:
            assert float(hits.sum()) / 30 == pytest.approx(expect_nnz, rel=0.05)


def test_natural_compression_rounds_to_neighbouring_powers_of_two() -> None:
    x = _heavy_tailed(256, seed=3)
    x[0] = 2.0**-130  # subnormal
    x[1] = -0.0
    copies = 2000
    c = parse_compressor("natural")
    draws = c.compress(_tiled(x, copies), seed=5).dense().double().view(copies, -1)
    xd = x.double()
    # a subnormal rounds between 0 and the smallest normal 2^-126 (here w.p. 2^-4 up)
    sub = draws[:, 0]
    assert bool(((sub == 0) | (sub == 2.0**-126)).all())
    assert float((sub != 0).double().mean()) == pytest.approx(1 / 16, abs=0.025)
    nz = xd.abs() >= 2.0**-126
    e = torch.floor(torch.log2(xd[nz].abs()))
    lo, hi = torch.exp2(e), torch.exp2(e + 1)
    got = draws[:, nz].abs()
    assert bool(((got == lo) | (got == hi)).all())
    assert bool((torch.sign(draws[:, nz]) == torch.sign(xd[nz])).all())
    assert bool((draws[:, xd == 0] == 0).all())
    t = (xd[nz].abs() - lo) / lo
    var_j = lo**2 * t * (1 - t)
    _assert_unbiased(draws[:, nz], x[nz], var_j)
    var_exact = float(var_j.sum())
    err = (draws - xd)[:, nz]
    var_emp = float(err.pow(2).sum(1).mean())
    assert var_emp == pytest.approx(var_exact, rel=0.1)
    assert var_emp <= c.omega(256) * float(xd.pow(2).sum())
    # the worst case t = 1/3 reaches omega = 1/8
    worst = torch.full((4000,), 4.0 / 3.0)
    y = c.compress(worst, seed=1).dense().double()
    ratio = float((y - 4 / 3).pow(2).sum() / (worst.double().pow(2).sum()))
    assert ratio == pytest.approx(1 / 8, rel=0.1)


def test_natural_dithering_is_unbiased_on_its_levels() -> None:
    m, s = 256, 4
    x = _heavy_tailed(m, seed=9)
    copies = 800
    c = parse_compressor(f"dither:s={s},bucket={m}")
    draws = c.compress(_tiled(x, copies), seed=2).dense().double().view(copies, m)
    xd = x.double()
    n = float(xd.norm())
    levels = {0.0} | {2.0 ** (i - s) for i in range(1, s + 1)}
    rel = (draws.abs() / n).flatten().tolist()
    assert all(min(abs(v - lv) for lv in levels) < 1e-6 for v in rel)
    # exact variance: between neighbours a < p < b, (b - p)(p - a) n^2
    p = xd.abs() / n
    table = torch.tensor(sorted(levels), dtype=torch.float64)
    hi_i = torch.searchsorted(table, p).clamp(max=s)
    hi, lo = table[hi_i], table[(hi_i - 1).clamp(min=0)]
    var_j = (hi - p) * (p - lo) * n * n
    _assert_unbiased(draws, x, var_j)
    var_exact = float(var_j.sum())
    err = draws - xd
    var_emp = float(err.pow(2).sum(1).mean())
    assert var_emp == pytest.approx(var_exact, rel=0.15)
    assert var_emp <= c.omega(m) * float(xd.pow(2).sum())


def test_randk_is_unbiased_with_variance_omega() -> None:
    d, k = 50, 5
    x = _heavy_tailed(d, seed=4)
    c = parse_compressor(f"randk:k={k}")
    draws = _draws(c, x, range(3000))
    xd = x.double()
    assert bool(((draws != 0).sum(1) <= k).all())
    var_exact = (d / k - 1) * float(xd.pow(2).sum())
    assert c.omega(d) * float(xd.pow(2).sum()) == pytest.approx(var_exact)
    _assert_unbiased(draws, x, xd.pow(2) * (d / k - 1))
    err = draws - xd
    assert float(err.pow(2).sum(1).mean()) == pytest.approx(var_exact, rel=0.1)


def test_randk_indices_are_a_uniform_k_subset() -> None:
    d, k = 40, 4
    counts = np.zeros(d)
    for seed in range(5000):
        idx = randk_indices(d, k, seed)
        assert idx.numel() == k
        assert torch.unique(idx).numel() == k
        assert bool((idx[1:] > idx[:-1]).all())
        counts[idx.numpy()] += 1
    expected = 5000 * k / d
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 90  # 39 degrees of freedom: mean 39, P(chi2 > 90) ~ 1e-5
    big = randk_indices(10**6, 10**4, 7)
    assert big.numel() == 10**4 and torch.unique(big).numel() == 10**4
    assert torch.equal(big, randk_indices(10**6, 10**4, 7))
    assert not torch.equal(big, randk_indices(10**6, 10**4, 8))


# ----------------------------------------------------------------------------- biased


def test_topk_keeps_the_largest_and_contracts() -> None:
    x = _heavy_tailed(1000, seed=5)
    c = parse_compressor("topk:k=30")
    y = c.compress(x).dense()
    kept = torch.nonzero(y).reshape(-1)
    assert kept.numel() <= 30
    assert torch.equal(y[kept], x[kept])
    assert float(x.abs()[y == 0].max()) <= float(x.abs()[kept].min())
    err = float((y - x).double().pow(2).sum())
    assert err <= (1 - c.delta(1000)) * float(x.double().pow(2).sum())


def test_scaled_sign_contracts_per_bucket() -> None:
    x = _heavy_tailed(1000, seed=6)
    xd = x.double()
    for spec, b in (("scaled_sign", 1000), ("scaled_sign:bucket=64", 64)):
        c = parse_compressor(spec)
        y = c.compress(x).dense().double()
        err = float((y - xd).pow(2).sum())
        exact = float(xd.pow(2).sum()) - sum(
            float(xd[i : i + b].abs().sum()) ** 2 / xd[i : i + b].numel() for i in range(0, 1000, b)
        )
        assert err == pytest.approx(exact, rel=1e-5)
        assert err <= (1 - c.delta(1000)) * float(xd.pow(2).sum())
        assert bool((torch.sign(y) == torch.where(x < 0, -1.0, 1.0)).all())


def test_biased_randk_contracts_in_expectation() -> None:
    d, k = 100, 10
    x = _heavy_tailed(d, seed=8)
    c = parse_compressor(f"randk:k={k},unbiased=false")
    draws = _draws(c, x, range(2000))
    err = float((draws - x.double()).pow(2).sum(1).mean())
    assert err == pytest.approx((1 - c.delta(d)) * float(x.double().pow(2).sum()), rel=0.05)


def test_sign_maps_zero_to_plus_one() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0, -1e-30])
    assert parse_compressor("sign").compress(x).dense().tolist() == [-1, 1, 1, 1, -1]
    y = parse_compressor("scaled_sign").compress(x).dense()
    scale = float(x.abs().sum() / 5)
    assert y.tolist() == pytest.approx([-scale, scale, scale, scale, -scale])


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_reproducible_from_the_seed_and_keeps_shape_dtype_device(spec: str) -> None:
    c = parse_compressor(spec)
    x = _heavy_tailed(3000, seed=1).reshape(30, 100)
    a, b = c.compress(x, seed=42), c.compress(x, seed=42)
    assert isinstance(a, Compressed)
    assert a.to_bytes() == b.to_bytes()
    assert torch.equal(a.dense(), b.dense())
    y = a.dense()
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert a.spec == c.spec and a.unbiased == c.unbiased
    if spec.startswith(("qsgd", "natural", "dither", "randk:frac")):
        assert c.compress(x, seed=43).to_bytes() != a.to_bytes()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_encoders_reject_bad_input(spec: str) -> None:
    c = parse_compressor(spec)
    with pytest.raises(ValueError, match="empty"):
        c.compress(torch.zeros(0))
    for bad in (math.nan, math.inf, -math.inf):
        x = torch.ones(500)
        x[123] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            c.compress(x)
    with pytest.raises(ValueError, match="dtype"):
        c.compress(torch.ones(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="seed"):
        c.compress(torch.ones(10), seed=-1)
    with pytest.raises(TypeError):
        c.compress(np.ones(10))  # type: ignore[arg-type]


def test_k_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_compressor("topk:k=11").compress(torch.ones(10))
    with pytest.raises(ValueError, match="out of range"):
        parse_compressor("randk:k=11").compress(torch.ones(10))
    assert parse_compressor("topk:k=10").compress(torch.ones(10)).dense().sum() == 10


def test_norm_overflow_is_reported() -> None:
    x = torch.full((100,), 3e38)
    with pytest.raises(ValueError, match="overflow"):
        parse_compressor("qsgd").compress(x)


def test_non_contiguous_and_grad_inputs() -> None:
    base = _heavy_tailed(200, seed=2).reshape(10, 20)
    x = base.t()  # not contiguous
    y = parse_compressor("identity").compress(x).dense()
    assert torch.equal(y, x)
    w = base.clone().requires_grad_(True)
    z = parse_compressor("scaled_sign").compress(w).dense()
    assert not z.requires_grad and z.shape == w.shape

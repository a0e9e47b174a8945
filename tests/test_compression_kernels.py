"""The compiled CPU kernels of compression._buckets against a numpy reference and the torch
code other devices run: the same norms, scales, sign bits and dense output, and levels drawn
exactly as floor(s |x_j| / ||x_B|| + u_j) from the documented counter-based uniforms, on
odd sizes, short buckets, zeros and non-finite inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compression import QSGD, ScaledSign, _buckets, decode, parse_compressor
from compression._buckets import seed_key, uniforms
from compression._tensors import bucket_reduce, bucket_size
from compression.levels import LevelQuantizer
from compression.qsgd import _THIN_MIN_BUCKET

SIZES = [1, 2, 7, 63, 64, 65, 127, 1000, 4097]
BUCKETS = [64, 7, 1, 0]


def _x(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g) * torch.exp(torch.randn(d, generator=g))
    if d > 10:
        x[3] = 0.0
        x[5] = -0.0
    return x


@pytest.fixture(autouse=True)
def kernels_from_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels run from d = 1 on (in production from ``_buckets.MIN_NUMEL``)."""
    monkeypatch.setattr(_buckets, "MIN_NUMEL", 1)


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CPU run the torch code that other devices run."""
    monkeypatch.setattr(QSGD, "_cpu_kernel", False)
    monkeypatch.setattr(ScaledSign, "_cpu_kernel", False)


def test_uniforms_are_splitmix64_halves() -> None:
    # the key of a seed is SplitMix64's first output from that seed (0xE220A8397B1DCDAF
    # for 0, the published value)
    assert seed_key(0) == 0xE220A8397B1DCDAF
    u = uniforms(seed_key(0), 5)
    assert u.dtype == np.float32
    assert bool(((u >= 0) & (u < 1)).all())
    assert bool((u * 2.0**24 == np.floor(u * 2.0**24)).all())  # multiples of 2^-24
    # roughly uniform: the mean of 10^5 draws within 5 standard errors of 1/2
    big = uniforms(seed_key(7), 100_000).astype(np.float64)
    assert abs(big.mean() - 0.5) < 5 * math.sqrt(1 / 12 / big.size)
    # odd and even positions are the two halves of one word: not equal
    assert float(np.abs(big[0::2] - big[1::2]).mean()) > 0.3


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize(("s", "norm"), [(1, "l2"), (1, "max"), (4, "l2"), (2, "max")])
def test_qsgd_kernel_levels_follow_the_reference(d: int, bucket: int, s: int, norm: str) -> None:
    x = _x(d, seed=d + bucket)
    c = parse_compressor(f"qsgd:s={s},bucket={bucket},norm={norm}")
    seed = 12345 + d
    m = c.compress(x, seed=seed)
    b = bucket_size(bucket, d)
    # norms: float64 sums cast to float32, equal to torch's float32 norms to rounding
    ref_norms = bucket_reduce(x, b, 2.0 if norm == "l2" else math.inf)
    norms = m.fields["norms"]
    assert torch.allclose(norms, ref_norms, rtol=1e-6, atol=0)
    assert torch.equal(decode(m.to_bytes()).dense(), m.dense())
    if s == 1 and norm == "l2" and b >= _THIN_MIN_BUCKET:
        return  # drawn by thinning (tests/test_compression_operators.py)
    # levels: exactly floor(|x_j| (s / ||x_B||) + u_j) in float32, signed, at most s
    xn = x.numpy()
    nrm = np.repeat(norms.numpy(), b)[:d]
    with np.errstate(divide="ignore"):
        inv = np.where(nrm > 0, np.float32(s) / nrm, np.float32(0)).astype(np.float32)
    u = uniforms(seed_key(seed), d)
    if s == 1:
        keep = u < np.abs(xn) * inv
        expect = np.where(keep, np.where(xn < 0, -1, 1), 0)
    else:
        mag = np.minimum(np.floor(np.abs(xn) * inv + u), s).astype(np.int64)
        expect = np.where(xn < 0, -mag, mag)
    if "index" in m.fields:
        got = np.zeros(d, dtype=np.int64)
        got[m.fields["index"].numpy()] = m.fields["nzlevels"].numpy()
        assert bool((np.diff(m.fields["index"].numpy()) > 0).all())
    else:
        got = m.fields["levels"].numpy().astype(np.int64)
    assert np.array_equal(got, expect)
    # the dense output of every code equals the torch table lookup, bit for bit
    table = torch.arange(-s, s + 1, dtype=torch.float32) / s
    ref_dense = table[torch.from_numpy(expect + s)] * torch.from_numpy(nrm)
    assert torch.equal(m.dense(), ref_dense)
    assert torch.equal(decode(m.to_bytes()).dense(), ref_dense)


def test_qsgd_kernel_matches_the_torch_path_in_law(torch_path: None) -> None:
    # the torch path (other devices) and the kernel draw different uniforms, but the same
    # law: the mean number of non-zero levels per bucket agrees within a few standard errors
    x = _x(64 * 2000, seed=1)
    c = parse_compressor("qsgd:s=1,bucket=64")
    torch_nnz = [int(torch.count_nonzero(c.compress(x, seed=s).dense())) for s in range(5)]
    QSGD._cpu_kernel = True  # restored by the fixture's monkeypatch
    kernel_nnz = [int(torch.count_nonzero(c.compress(x, seed=s).dense())) for s in range(5)]
    p = (x.abs().view(-1, 64) / x.view(-1, 64).norm(dim=1, keepdim=True)).double()
    mean, sd = float(p.sum()), math.sqrt(float((p * (1 - p)).sum()))
    for counts in (torch_nnz, kernel_nnz):
        assert abs(sum(counts) / 5 - mean) < 5 * sd / math.sqrt(5)


@pytest.mark.parametrize("spec", ["qsgd:s=1,bucket=64", "qsgd:s=4,bucket=64"])
def test_qsgd_kernel_zero_buckets_and_seeds(spec: str) -> None:
    x = torch.zeros(64 * 3 + 5)
    x[64:128] = torch.linspace(-1, 1, 64)
    c = parse_compressor(spec)
    for seed in range(10):
        m = c.compress(x, seed=seed)
        y = m.dense()
        assert torch.count_nonzero(y[:64]) == 0 and torch.count_nonzero(y[128:]) == 0
        assert m.fields["norms"][0] == 0 and m.fields["norms"][2] == 0
        assert m.to_bytes() == c.compress(x, seed=seed).to_bytes()  # same seed, same bytes
    assert c.compress(x, seed=1).to_bytes() != c.compress(x, seed=2).to_bytes()
    assert torch.count_nonzero(c.compress(torch.zeros(5), seed=0).dense()) == 0


@pytest.mark.parametrize(
    "spec", ["qsgd:s=1,bucket=64", "qsgd:s=4,bucket=64,norm=max", "scaled_sign:bucket=64"]
)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_kernels_refuse_non_finite_input(spec: str, bad: float) -> None:
    for d in (1, 63, 200):
        x = torch.ones(d)
        x[d // 2] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            parse_compressor(spec).compress(x)


@pytest.mark.parametrize("spec", ["qsgd:s=1,bucket=64", "qsgd:s=2,bucket=64"])
def test_qsgd_kernel_reports_a_norm_overflowing_float32(spec: str) -> None:
    with pytest.raises(ValueError, match="overflow"):
        parse_compressor(spec).compress(torch.full((100,), 3e38))


@pytest.mark.parametrize("bucket", BUCKETS)
@pytest.mark.parametrize("d", SIZES)
def test_scaled_sign_kernels_equal_the_torch_path(
    d: int, bucket: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = _x(d, seed=3 * d + bucket)
    c = parse_compressor(f"scaled_sign:bucket={bucket}")
    m = c.compress(x)
    monkeypatch.setattr(ScaledSign, "_cpu_kernel", False)
    ref = c.compress(x)
    assert np.array_equal(m.fields["signs"], ref.fields["signs"])  # sign(0) = +1 both
    assert torch.allclose(m.fields["scales"], ref.fields["scales"], rtol=1e-6, atol=0)
    torch_dense = m.dense()  # the fields of the kernel through the torch decode
    monkeypatch.setattr(ScaledSign, "_cpu_kernel", True)
    assert torch.equal(m.dense(), torch_dense)
    assert torch.equal(decode(m.to_bytes()).dense(), torch_dense)
    assert len(m.to_bytes()) == len(ref.to_bytes())


def test_levels_dense_kernel_equals_the_torch_lookup() -> None:
    # natural dithering shares the level decode: its table of powers of two
    for spec in ("dither:s=8,bucket=100", "qsgd:s=16,bucket=64,norm=max"):
        x = _x(1001, seed=5)
        m = parse_compressor(spec).compress(x, seed=3)
        assert "levels" in m.fields
        kernel = m.dense()
        c = m.compressor
        assert isinstance(c, LevelQuantizer)
        table = c._level_table(torch.device("cpu"))
        b = bucket_size(c.bucket, 1001)
        lev = m.fields["levels"].to(torch.int64) + c.s
        norms = m.fields["norms"].repeat_interleave(b)[:1001]
        assert torch.equal(kernel, table[lev] * norms)


def test_small_messages_do_not_import_numba() -> None:
    # below MIN_NUMEL the torch code runs: a fresh process sending a small model pays no
    # numba import (checked in a subprocess, where nothing has imported numba yet)
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from compression import parse_compressor, decode\n"
        "x = torch.randn(100_000)\n"
        "for spec in ('qsgd:s=1,bucket=64', 'qsgd:s=4,bucket=64', 'scaled_sign:bucket=64'):\n"
        "    decode(parse_compressor(spec).compress(x, seed=1).to_bytes()).dense()\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernels_from_scopes_the_compiled_path_to_a_block_and_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from compression import kernels_from

    monkeypatch.setattr(_buckets, "MIN_NUMEL", 1 << 22)  # production's default, not the fixture's

    d = 3 * 2**14  # below MIN_NUMEL: the torch code outside the block
    x = torch.randn(d, generator=torch.Generator().manual_seed(4))
    c = parse_compressor("qsgd:s=2,bucket=64")
    outside = c.compress(x, seed=9).to_bytes()
    seen: list[int] = []
    with kernels_from(2**14):
        inside = c.compress(x, seed=9).to_bytes()
        assert _buckets.min_numel() == 2**14
        worker = threading.Thread(target=lambda: seen.append(_buckets.min_numel()))
        worker.start()
        worker.join()
        decoded_inside = [decode(p).dense() for p in (outside, inside)]
    assert seen == [_buckets.MIN_NUMEL]  # another thread keeps the default
    assert _buckets.min_numel() == _buckets.MIN_NUMEL  # and so does this one after the block
    assert inside != outside  # the kernels' draws, not torch's
    # a payload decodes to the same vector on either path
    for payload, vector in zip((outside, inside), decoded_inside, strict=True):
        assert torch.equal(decode(payload).dense(), vector)
    with pytest.raises(ValueError, match="numel"), kernels_from(0):
        pass

"""The compiled level codes (compression._level_codes, used from _buckets.MIN_NUMEL on)
write the numpy code's bytes exactly and read them back to the same messages: QSGD with
s = 1, 2, 4 (and an odd bucket with the max norm, natural dithering's table) just above
MIN_NUMEL, every code, several seeds."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from compression import _buckets, _level_codes, bits, decode, parse_compressor
from compression.levels import LevelQuantizer

D = _buckets.MIN_NUMEL + 3
SPECS = [
    "qsgd:s=1,bucket=64",
    "qsgd:s=2,bucket=64",
    "qsgd:s=4,bucket=64",
    "qsgd:s=3,bucket=100,norm=max",
    "qsgd:s=1,bucket=4096",  # drawn by thinning: the sparse fields of another kernel
    "dither:s=8,bucket=64",
]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(D, generator=g) * torch.exp(torch.randn(D, generator=g))
    x[1000:5000] = 0.0  # a long zero run
    return x


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The names of the level-code kernels called."""
    calls: Counter[str] = Counter()
    real = _level_codes._kernel

    def spy(name: str) -> Any:
        calls[name] += 1
        return real(name)

    monkeypatch.setattr(_level_codes, "_kernel", spy)
    return calls


@pytest.mark.parametrize("spec", SPECS)
def test_compiled_payloads_equal_the_numpy_payloads(
    spec: str, x: torch.Tensor, kernel_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = parse_compressor(spec)
    assert isinstance(c, LevelQuantizer) and LevelQuantizer._compiled(D)
    dense_code = "base3" if c.s == 1 else "dense"
    for seed in (1, 2):
        m = c.compress(x, seed=seed)
        for code in (None, "sparse", "rice", dense_code):
            kernel_calls.clear()
            compiled = m.to_bytes() if code is None else m.to_bytes_with(code)
            compiled_dense = decode(compiled).dense()
            used = set(kernel_calls)
            monkeypatch.setattr(LevelQuantizer, "_compiled_codes", False)
            m._payload, m._plan = None, None
            plain = m.to_bytes() if code is None else m.to_bytes_with(code)
            plain_dense = decode(plain).dense()
            monkeypatch.setattr(LevelQuantizer, "_compiled_codes", True)
            m._payload, m._plan = None, None
            assert compiled == plain, (spec, seed, code)
            assert torch.equal(compiled_dense, plain_dense)
            assert torch.equal(compiled_dense, m.dense())
            chosen = code or m.code
            if chosen == "sparse":
                assert {"rice_runs_kernel", "rice_decode_kernel", "runs_to_index_kernel"} <= used
            elif chosen == "rice":
                assert {"rice_magnitudes_kernel", "rice_decode_kernel"} <= used
            elif chosen == "base3":
                assert {"pack_base3_kernel", "unpack_base3_kernel"} <= used
            else:
                assert {"pack_levels_kernel", "unpack_levels_kernel"} <= used
    # the byte count is the plan's prediction, as on the numpy path
    m = c.compress(x, seed=1)
    assert m.nbytes - m.predicted_nbytes < 64


def test_compiled_decode_of_every_sparse_magnitude_code(x: torch.Tensor) -> None:
    # the sparse code sends |l| - 1 in fixed width (255) when that is smaller, else
    # Rice-coded: s = 2 gives the one, s = 200 the other
    for spec, fixed in (("qsgd:s=2,bucket=64", True), ("qsgd:s=200,bucket=64,norm=max", False)):
        c = parse_compressor(spec)
        m = c.compress(x, seed=5)
        assert isinstance(c, LevelQuantizer)
        plan = c._plan_for(m.fields, D, "sparse")
        assert (plan.extra["k_mags"] == 255) == fixed
        payload = m.to_bytes_with("sparse")
        assert torch.equal(decode(payload).dense(), m.dense())


def test_run_costs_equal_the_numpy_cost() -> None:
    # runs crossing the kernels' 4096-level chunks, empty runs, a leading and trailing run
    g = torch.Generator().manual_seed(3)
    for density in (0.0, 0.001, 0.3, 1.0):
        d = 20_000
        keep = torch.rand(d, generator=g) < density
        levels = torch.where(keep, 1, 0).to(torch.int16).numpy()
        levels[9000:13000] = 0
        index = np.flatnonzero(levels).astype(np.int64)
        runs = np.diff(np.append(index, d), prepend=-1) - 1
        ks = range(0, 5)
        expect = {k: bits.rice_cost_bits(runs, k) for k in ks}
        assert _level_codes.run_costs(index, d, ks) == expect
        assert _level_codes.run_costs(levels, d, ks, levels=True) == expect
        assert _level_codes.run_costs(levels, d, range(2, 4), levels=True) == {
            k: expect[k] for k in (2, 3)
        }

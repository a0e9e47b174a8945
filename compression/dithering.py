"""Natural dithering (Horváth et al.) with s levels, per bucket B:

    C(x)_j = ||x_B||_2 sign(x_j) l_j,   l_j in {0, 2^(1-s), ..., 1/2, 1},

|x_j| / ||x_B|| between two consecutive levels a < b rounded up to b with probability
(|x_j| / ||x_B|| - a) / (b - a); unbiased with
omega = 1/8 + sqrt(d_B) 2^(1-s) min(1, sqrt(d_B) 2^(1-s)). The levels go on the wire with
the codes of :mod:`compression.levels`.
"""

from __future__ import annotations

import math

import torch

from compression._tensors import bucket_reduce, bucket_size, check_finite_sum, segments
from compression.base import parse_int, take_params
from compression.compressed import Fields
from compression.levels import LevelQuantizer
from compression.wire import CodecError, Reader

__all__ = ["NaturalDithering"]


class NaturalDithering(LevelQuantizer):
    """Natural dithering (Horváth et al.) with s levels, per bucket B:

        C(x)_j = ||x_B||_2 sign(x_j) l_j,   l_j in {0, 2^(1-s), ..., 1/2, 1},

    where |x_j|/||x_B|| in [a, b] between two consecutive levels is rounded up to b with
    probability (|x_j|/||x_B|| - a) / (b - a). Unbiased with
    omega = 1/8 + sqrt(d_B) 2^(1-s) min(1, sqrt(d_B) 2^(1-s)).
    """

    name = "dither"
    op_code = 3
    params_help = "s=8 (1..64), bucket=4096 (0 = per tensor)"

    def __init__(self, s: int = 8, bucket: int = 4096) -> None:
        if s < 1:
            raise ValueError(f"dither needs s >= 1, got s={s}")
        if s > 64:
            raise ValueError(f"dither supports s <= 64 levels, got s={s}")
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        self.s = s
        self.bucket = bucket

    @property
    def spec(self) -> str:
        return f"dither:s={self.s},bucket={self.bucket}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> NaturalDithering:
        p = take_params(params, {"s": "8", "bucket": "4096"}, cls.name)
        return cls(parse_int("s", p["s"]), parse_int("bucket", p["bucket"]))

    def omega(self, d: int) -> float:
        b = bucket_size(self.bucket, d)
        t = math.sqrt(b) * 2.0 ** (1 - self.s)
        return 1 / 8 + t * min(1.0, t)

    def _level_table(self, device: torch.device) -> torch.Tensor:
        pos = [0.0] + [2.0 ** (i - self.s) for i in range(1, self.s + 1)]
        signed = [-v for v in reversed(pos[1:])] + pos
        return torch.tensor(signed, dtype=torch.float32, device=device)

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        s = self.s
        b = bucket_size(self.bucket, d)
        norms = bucket_reduce(f32, b, 2.0)
        if not bool(torch.isfinite(norms).all()):
            check_finite_sum(f32)
            raise ValueError("the norm of a bucket overflows float32; scale the input down")
        g = self._generator(f32.device, seed)
        table = self._level_table(f32.device)[s:]  # levels 0..s
        inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
        levels = torch.empty(d, dtype=torch.int16, device=f32.device)
        for start, rows, cols, bk in segments(d, b):
            n = rows * cols
            x = f32[start : start + n].view(rows, cols)
            p = (x.abs() * inv[bk : bk + rows, None]).clamp_(max=1.0)
            _, e = torch.frexp(p)  # p in [2^(e-1), 2^e)
            t = (e.to(torch.int64) - 1 + s).clamp_(max=s)
            lo = torch.where((p > 0) & (t >= 1), t, torch.zeros_like(t))
            hi = (lo + 1).clamp_(max=s)
            lo_v, hi_v = table[lo], table[hi]
            width = hi_v - lo_v
            up_prob = torch.where(width > 0, (p - lo_v) / width, torch.zeros_like(p))
            u = torch.rand(p.shape, generator=g, device=p.device)
            lev = (lo + (u < up_prob).to(torch.int64)).to(torch.int16)
            levels[start : start + n].view(rows, cols).copy_(torch.where(x < 0, -lev, lev))
        return {"norms": norms, "levels": levels}

    @classmethod
    def _read_params(cls, r: Reader) -> NaturalDithering:
        s = r.varint(limit=64, name="dither s")
        bucket = r.varint(name="bucket")
        if s < 1:
            raise CodecError("dither s must be >= 1")
        return cls(s, bucket)

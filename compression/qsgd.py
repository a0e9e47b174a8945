"""QSGD, s-quantization (Alistarh et al. 2017), per bucket B of size d_B:

    C(x)_j = ||x_B|| sign(x_j) xi_j / s,   xi_j = floor(s |x_j| / ||x_B|| + u_j),
    u_j ~ U[0, 1),

with ||.|| the L2 norm (``norm=l2``) or the max norm (``norm=max``); unbiased with
omega = min(d_B / s^2, sqrt(d_B) / s). For s = 1 with the L2 norm the non-zero levels are
drawn by thinning (:meth:`QSGD._compress_thinned`; its CPU kernel is
:mod:`compression._thin`). The levels go on the wire with the codes of
:mod:`compression.levels`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from compression import _buckets
from compression._tensors import (
    bucket_lengths,
    bucket_reduce,
    bucket_size,
    check_finite_sum,
    segments,
)
from compression.base import parse_int, take_params
from compression.compressed import Fields
from compression.levels import LevelQuantizer
from compression.wire import CodecError, Reader, Writer

__all__ = ["QSGD"]


#: Block of the envelopes q of QSGD's thinning (s = 1): a block of a bucket whose size is a
#: multiple of it; a tighter envelope than the whole bucket's leaves fewer candidates.
_THIN_BLOCK = 256
#: Smallest bucket for which the CPU draws s = 1 levels by thinning rather than with the
#: one-pass kernel of :mod:`compression._buckets`: below it the envelopes q_B >= 1/sqrt(d_B)
#: leave too many candidates.
_THIN_MIN_BUCKET = 1024


def _bucket_peaks(f32: torch.Tensor, b: int) -> torch.Tensor:
    """max_j |x_j| per bucket, float32, as max(max_j x_j, -min_j x_j): two reductions
    straight over the data, no |x| temporary."""
    d = f32.numel()
    nfull = d // b
    parts = []
    if nfull:
        view = f32[: nfull * b].view(nfull, b)
        parts.append(torch.maximum(view.amax(dim=1), view.amin(dim=1).neg_()))
    if d % b:
        tail = f32[nfull * b :]
        parts.append(torch.maximum(tail.amax(), tail.amin().neg()).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class QSGD(LevelQuantizer):
    """s-quantization (Alistarh et al. 2017), per bucket B of size d_B:

        C(x)_j = ||x_B|| sign(x_j) xi_j / s,   xi_j = floor(s |x_j| / ||x_B|| + u_j),
        u_j ~ U[0, 1),

    with ||.|| the L2 norm (``norm=l2``) or the max norm (``norm=max``). Unbiased with
    omega = min(d_B / s^2, sqrt(d_B) / s). For s = 1 with the L2 norm the non-zero levels are
    drawn by thinning (each coordinate a candidate with probability q_B = max_j |x_j|/||x_B||
    from Poisson points, each kept with probability (|x_j|/||x_B||) / q_B), the same law
    P(xi_j = 1) = |x_j| / ||x_B|| while drawing only about q d random numbers.
    """

    name = "qsgd"
    op_code = 1
    params_help = "s=1, bucket=4096 (0 = per tensor), norm=l2|max"
    #: the CPU runs the compiled kernels (thinning; :mod:`compression._buckets` from
    #: ``_buckets.MIN_NUMEL`` coordinates on); False: the torch code of other devices
    _cpu_kernel: ClassVar[bool] = True

    def __init__(self, s: int = 1, bucket: int = 4096, norm: str = "l2") -> None:
        if s < 1:
            raise ValueError(f"qsgd needs s >= 1, got s={s}")
        if s > 32767:
            raise ValueError(f"qsgd supports s <= 32767, got s={s}")
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        if norm not in ("l2", "max"):
            raise ValueError(f"qsgd norm must be l2 or max, got {norm!r}")
        self.s = s
        self.bucket = bucket
        self.norm = norm

    @property
    def spec(self) -> str:
        return f"qsgd:s={self.s},bucket={self.bucket},norm={self.norm}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> QSGD:
        p = take_params(params, {"s": "1", "bucket": "4096", "norm": "l2"}, cls.name)
        return cls(parse_int("s", p["s"]), parse_int("bucket", p["bucket"]), p["norm"])

    def omega(self, d: int) -> float:
        b = bucket_size(self.bucket, d)
        return min(b / self.s**2, math.sqrt(b) / self.s)

    def _level_table(self, device: torch.device) -> torch.Tensor:
        return torch.arange(-self.s, self.s + 1, device=device, dtype=torch.float32) / self.s

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        b = bucket_size(self.bucket, d)
        thinned = self.s == 1 and self.norm == "l2"
        on_cpu = f32.device.type == "cpu" and self._cpu_kernel and d >= _buckets.min_numel()
        if on_cpu and not (thinned and b >= _THIN_MIN_BUCKET):
            return self._compress_cpu(f32, b, seed)
        norms = bucket_reduce(f32, b, 2.0 if self.norm == "l2" else math.inf)
        if not bool(torch.isfinite(norms).all()):
            check_finite_sum(f32)
            raise ValueError("the norm of a bucket overflows float32; scale the input down")
        g = self._generator(f32.device, seed)
        if thinned:
            fields = self._compress_thinned(f32, norms, b, g, seed)
            if fields is not None:
                return fields
        if on_cpu:  # thinning would not save draws
            return self._compress_cpu(f32, b, seed)
        return self._compress_dense(f32, norms, b, g)

    def _compress_cpu(self, f32: torch.Tensor, b: int, seed: int) -> Fields:
        """The levels on the CPU in one compiled pass (:mod:`compression._buckets`): per
        bucket the norm, then the levels with counter-based uniforms drawn from ``seed``;
        for s = 1 the sparse fields (positions and signs of the non-zero levels)."""
        out = _buckets.qsgd_levels(f32.numpy(), b, self.s, self.norm == "l2", seed)
        if out is None:
            check_finite_sum(f32)
            raise ValueError("the norm of a bucket overflows float32; scale the input down")
        norms, index, levels = out
        if index is None:
            return {"norms": torch.from_numpy(norms), "levels": torch.from_numpy(levels)}
        return {
            "norms": torch.from_numpy(norms),
            "index": torch.from_numpy(index),
            "nzlevels": torch.from_numpy(levels),
        }

    def _compress_dense(
        self, f32: torch.Tensor, norms: torch.Tensor, b: int, g: torch.Generator
    ) -> Fields:
        d = f32.numel()
        s = self.s
        inv = torch.where(norms > 0, s / norms, torch.zeros_like(norms))
        levels = torch.empty(d, dtype=torch.int16, device=f32.device)
        for start, rows, cols, bk in segments(d, b):
            n = rows * cols
            x = f32[start : start + n].view(rows, cols)
            p = x.abs().mul_(inv[bk : bk + rows, None])
            p.add_(torch.rand(p.shape, generator=g, device=p.device)).floor_().clamp_(max=s)
            lev = p.to(torch.int16)
            levels[start : start + n].view(rows, cols).copy_(torch.where(x < 0, -lev, lev))
        return {"norms": norms, "levels": levels}

    def _compress_thinned(
        self, f32: torch.Tensor, norms: torch.Tensor, b: int, g: torch.Generator, seed: int
    ) -> Fields | None:
        """s = 1 by thinning. Per block K (the bucket B, or when d_B is a multiple of 256 each
        block of 256 coordinates of it), q_K = max_{j in K} p_j with p_j = |x_j| / ||x_B||
        and lambda_K = -log(1 - q_K). Every coordinate of K is a candidate with probability
        1 - exp(-lambda_K) = q_K, independently, and a candidate is kept with probability
        p_j / q_K. So P(xi_j = 1) = p_j, independently, as in QSGD, with about
        sum_K d_K q_K draws instead of d (the tighter per-block envelope leaves ~20% fewer
        candidates than one per bucket for Gaussian data). lambda_K is capped at 17 (q_K
        within 4e-8 of 1, below float32's 2^-24 resolution of a uniform draw). Returns None
        when thinning would not save draws (more than d/4).

        On the CPU (:meth:`_thin_cpu`) the candidates are found by geometric skipping in
        compiled code. On other devices, torch draws N_K ~ Poisson(d_K lambda_K) points
        uniformly on the block's coordinates: each coordinate then gets Poisson(lambda_K)
        points, independently, so it is hit with probability q_K; the distinct coordinates
        hit are the candidates.
        """
        d = f32.numel()
        device = f32.device
        bucket_norms = norms
        if b % _THIN_BLOCK == 0 and b > _THIN_BLOCK:  # envelopes per block of the bucket
            norms = norms.repeat_interleave(b // _THIN_BLOCK)[: -(-d // _THIN_BLOCK)]
            b = _THIN_BLOCK
        nb = norms.numel()
        peaks = _bucket_peaks(f32, b)
        q = torch.where(norms > 0, peaks / norms, torch.zeros_like(peaks))
        lam = torch.log1p(-q.to(torch.float64).clamp_(max=1.0)).neg_().clamp_(max=17.0)
        lengths = bucket_lengths(d, b, device).to(torch.float64)
        rate = lengths * lam
        if float(rate.sum()) > d / 4:
            return None
        if device.type == "cpu" and self._cpu_kernel:
            return {"norms": bucket_norms, **self._thin_cpu(f32, norms, lam, b, seed)}
        counts = torch.poisson(rate, generator=g).to(torch.int64)
        itype = torch.int32 if d < 1 << 31 else torch.int64
        bucket = torch.repeat_interleave(torch.arange(nb, dtype=itype, device=device), counts)
        # uniform offsets in float64 (53-bit draws: uniform over any bucket length)
        u = torch.rand(bucket.numel(), dtype=torch.float64, generator=g, device=device)
        tail = d - (nb - 1) * b
        last = int(counts[-1])
        if tail != b and last:  # the short last bucket: uniform over its own length
            u[-last:] *= tail / b
        pos = u.mul_(float(b)).to(itype).clamp_(max=b - 1)
        if tail != b and last:
            pos[-last:].clamp_(max=tail - 1)
        pos.add_(bucket * b)
        if device.type == "cpu":  # numpy's vectorized sort is several times torch's here
            ordered = torch.from_numpy(np.sort(pos.numpy()))
        else:
            ordered = torch.sort(pos).values
        cand = torch.unique_consecutive(ordered).to(torch.int64)
        block = cand >> (b.bit_length() - 1) if b & (b - 1) == 0 else cand // b
        # keep candidate j with probability p_j / q_B = |x_j| / (||x_B|| (1 - exp(-lambda_B)))
        hit = torch.expm1(lam.neg()).neg_().to(torch.float32)
        inv = torch.where(hit > 0, 1 / (norms * hit), torch.zeros_like(hit))
        xc = torch.index_select(f32, 0, cand)
        u = torch.rand(cand.numel(), generator=g, device=device)
        kept = torch.nonzero(u < xc.abs().mul_(torch.index_select(inv, 0, block))).view(-1)
        index = torch.index_select(cand, 0, kept)
        lev = torch.index_select(xc, 0, kept).sign_().to(torch.int16)
        return {"norms": bucket_norms, "index": index, "nzlevels": lev}

    @staticmethod
    def _thin_cpu(
        f32: torch.Tensor, norms: torch.Tensor, lam: torch.Tensor, b: int, seed: int
    ) -> Fields:
        """The thinning of :meth:`_compress_thinned` on the CPU: the candidates by geometric
        skipping in compiled code (:mod:`compression._thin`), random numbers from numpy's
        PCG64 seeded with ``seed``; ``norms`` and ``lam`` per block of ``b``."""
        from compression._thin import thin

        lam64 = lam.numpy()
        # keep candidate j with probability p_j / q = |x_j| / (||x_B|| (1 - exp(-lambda)))
        scale = norms.numpy().astype(np.float64) * -np.expm1(-lam64)
        keep_scale = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        index, levels = thin(f32.numpy(), lam64, keep_scale.astype(np.float32), b, seed)
        return {"index": torch.from_numpy(index), "nzlevels": torch.from_numpy(levels)}

    def _write_params(self, w: Writer) -> None:
        super()._write_params(w)
        w.u8(0 if self.norm == "l2" else 1)

    @classmethod
    def _read_params(cls, r: Reader) -> QSGD:
        s = r.varint(limit=32767, name="qsgd s")
        bucket = r.varint(name="bucket")
        norm = r.u8()
        if s < 1 or norm > 1:
            raise CodecError(f"bad qsgd parameters s={s} norm code={norm}")
        return cls(s, bucket, "l2" if norm == 0 else "max")

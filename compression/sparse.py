"""Sparsifiers: rand-k and top-k keep k of the d coordinates (k = ``k`` or round(frac d)).

* rand-k: a uniformly random k-subset S drawn from the seed (:func:`randk_indices`),
  C(x) = (d/k) x_S (unbiased, omega = d/k - 1) or x_S (biased, delta = k/d in
  expectation). On the wire: the seed and the k values; the indices cost nothing.
* top-k: the k coordinates of largest |x_j|, biased with delta = k/d, since
  ||C(x) - x||^2 = sum of the d - k smallest x_j^2 <= (1 - k/d) ||x||^2. On the wire: the
  k values and the sorted indices as LEB128 gaps or a d-bit bitmap, whichever is smaller.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from compression import bits
from compression._tensors import (
    CHUNK,
    bytes_tensor,
    check_finite_decoded,
    check_finite_sum,
    float_array,
    runs_to_index,
    tensor_bytes,
)
from compression.base import (
    Compressor,
    format_float,
    parse_bool,
    parse_float,
    parse_int,
    take_params,
)
from compression.compressed import Fields, Plan
from compression.wire import CodecError, Reader, Writer

__all__ = ["RandK", "TopK", "randk_indices"]


def _k_for(k: int | None, frac: float | None, d: int) -> int:
    if k is not None:
        if not 1 <= k <= d:
            raise ValueError(f"k={k} out of range for a tensor of {d} coordinates (1..{d})")
        return k
    assert frac is not None
    return max(1, min(d, round(frac * d)))


def _check_k_frac(k: int | None, frac: float | None, op: str) -> None:
    if (k is None) == (frac is None):
        raise ValueError(f"{op} needs exactly one of k=... or frac=...")
    if k is not None and k < 1:
        raise ValueError(f"{op} needs k >= 1, got k={k}")
    if frac is not None and not 0 < frac <= 1:
        raise ValueError(f"{op} needs 0 < frac <= 1, got frac={frac}")


def _k_frac_params(p: dict[str, str]) -> tuple[int | None, float | None]:
    k = parse_int("k", p["k"]) if "k" in p else None
    frac = parse_float("frac", p["frac"]) if "frac" in p else None
    if k is None and frac is None:
        frac = 0.01
    return k, frac


def randk_indices(d: int, k: int, seed: int) -> torch.Tensor:
    """The sorted k-subset of [0, d) that rand-k with ``seed`` selects, uniformly at random.

    Drawn on the CPU generator (so sender and receiver agree whatever their devices): for
    k > d/4 a random permutation's first k entries; otherwise uniform draws in [0, d) with
    repeats discarded until k distinct values are seen (sampling without replacement).
    """
    g = torch.Generator()
    g.manual_seed(seed)
    if 4 * k > d:
        return torch.randperm(d, generator=g)[:k].sort().values
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        missing = k - (torch.unique(draws).numel() if draws.numel() else 0)
        extra = missing + int(missing * k / d) + 16
        draws = torch.cat([draws, torch.randint(0, d, (extra,), generator=g)])
        values, inverse = torch.unique(draws, return_inverse=True)
        if values.numel() >= k:
            break
    first = torch.full((values.numel(),), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    order = torch.argsort(first)[:k]
    return values[order].sort().values


#: float32's largest finite value
_F32_MAX = float(np.finfo(np.float32).max)


def _check_scaled(values: torch.Tensor, scale: float) -> None:
    """Rand-k's unbiased values (d/k) x_j (``values`` already finite), computed as
    ``_dense`` computes them, must be finite: finite x_j near float32's maximum overflow
    once scaled. max |x_j| (d/k) in float64 decides unless it lies within 2^-20 of
    float32's maximum, where the exact float32 product is computed."""
    if not values.numel():
        return
    peak = float(np.abs(float_array(values)).max()) * scale
    if peak <= _F32_MAX * (1 - 2**-20):
        return
    if peak >= _F32_MAX * (1 + 2**-20) or not bool(
        torch.isfinite(values.to(torch.float32) * scale).all()
    ):
        raise CodecError(f"values times d/k = {scale:g} overflow float32")


class RandK(Compressor):
    """rand-k: keep k coordinates chosen uniformly at random (indices from the seed),
    C(x) = (d/k) x_S (unbiased, omega = d/k - 1) or x_S (biased, delta = k/d in expectation).
    On the wire: the seed and the k values in the input dtype; the indices cost nothing.
    (So the header's shape is the only statement of d: any d >= k is a consistent message;
    the CRC-32 guards it like every other byte.)"""

    name = "randk"
    op_code = 4
    params_help = "frac=0.01 or k=K; unbiased=true|false"

    def __init__(
        self, k: int | None = None, frac: float | None = None, unbiased: bool = True
    ) -> None:
        _check_k_frac(k, frac, self.name)
        self.k = k
        self.frac = frac
        self.unbiased = unbiased

    @property
    def spec(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"frac={format_float(self.frac or 0)}"
        return f"randk:{size},unbiased={'true' if self.unbiased else 'false'}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> RandK:
        p = take_params(params, {"k": None, "frac": None, "unbiased": "true"}, cls.name)
        k, frac = _k_frac_params(p)
        return cls(k, frac, parse_bool("unbiased", p["unbiased"]))

    def k_for(self, d: int) -> int:
        return _k_for(self.k, self.frac, d)

    def omega(self, d: int) -> float:
        if not self.unbiased:
            return super().omega(d)
        return d / self.k_for(d) - 1

    def delta(self, d: int) -> float:
        if self.unbiased:
            return super().delta(d)
        return self.k_for(d) / d

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        check_finite_sum(f32)
        d = f32.numel()
        k = self.k_for(d)
        index = randk_indices(d, k, seed).to(f32.device)
        values = flat[index]
        if self.unbiased:
            try:
                _check_scaled(values, d / k)
            except CodecError as exc:
                raise ValueError(f"{exc}; scale the input down") from None
        return {"values": values, "index": index, "seed": seed, "k": k}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        values: torch.Tensor = fields["values"]
        out = torch.zeros(d, dtype=torch.float32, device=device)
        vals = values.to(torch.float32)
        if self.unbiased:
            vals = vals * (d / fields["k"])
        out[fields["index"]] = vals
        return out

    def _plan(self, fields: Fields, d: int) -> Plan:
        return Plan(
            "values+seed", 64 + fields["values"].numel() * fields["values"].element_size() * 8
        )

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        w.varint(fields["k"])
        w.u8(1 if self.unbiased else 0)
        w.varint(fields["seed"])
        w.section(tensor_bytes(fields["values"]))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        k = r.varint(limit=d, name="rand-k k")
        unbiased = r.u8()
        seed = r.varint(limit=(1 << 64) - 1, name="rand-k seed")
        if k < 1 or unbiased > 1:
            raise CodecError(f"bad rand-k parameters k={k}, unbiased code={unbiased}")
        values = bytes_tensor(r.section(), dtype, k)
        check_finite_decoded(values, "values")
        if unbiased:
            _check_scaled(values, d / k)
        index = randk_indices(d, k, seed)
        comp = cls(k=k, unbiased=bool(unbiased))
        return comp, {"values": values, "index": index, "seed": seed, "k": k}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return float(fields["values"].numel() * fields["values"].element_size() * 8)


def _topk_abs_index(f32: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of k coordinates of largest |x_j|, selected chunk by chunk: the running
    best k is merged with each chunk's best k, so memory stays O(k + chunk)."""
    d = f32.numel()
    step = max(4 * CHUNK, 2 * k)
    if d <= step:
        return torch.topk(f32.abs(), k, sorted=False).indices.sort().values
    best_v = torch.empty(0, dtype=torch.float32, device=f32.device)
    best_i = torch.empty(0, dtype=torch.int64, device=f32.device)
    for start in range(0, d, step):
        a = f32[start : start + step].abs()
        v, i = torch.topk(a, min(k, a.numel()), sorted=False)
        best_v = torch.cat([best_v, v])
        best_i = torch.cat([best_i, i + start])
        if best_v.numel() > k:
            best_v, j = torch.topk(best_v, k, sorted=False)
            best_i = best_i[j]
    return best_i.sort().values


class TopK(Compressor):
    """top-k: keep the k coordinates of largest |x_j|; biased with delta = k/d, since
    ||C(x) - x||^2 = sum of the d - k smallest x_j^2 <= (1 - k/d) ||x||^2. On the wire: the k
    values in the input dtype and the sorted indices as LEB128 gaps or a d-bit bitmap,
    whichever is smaller."""

    name = "topk"
    op_code = 5
    params_help = "frac=0.01 or k=K"
    unbiased = False

    def __init__(self, k: int | None = None, frac: float | None = None) -> None:
        _check_k_frac(k, frac, self.name)
        self.k = k
        self.frac = frac

    @property
    def spec(self) -> str:
        size = f"k={self.k}" if self.k is not None else f"frac={format_float(self.frac or 0)}"
        return f"topk:{size}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TopK:
        p = take_params(params, {"k": None, "frac": None}, cls.name)
        k, frac = _k_frac_params(p)
        return cls(k, frac)

    def k_for(self, d: int) -> int:
        return _k_for(self.k, self.frac, d)

    def delta(self, d: int) -> float:
        return self.k_for(d) / d

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        check_finite_sum(f32)
        d = f32.numel()
        k = self.k_for(d)
        index = _topk_abs_index(f32, k)
        return {"values": flat[index], "index": index}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        out = torch.zeros(d, dtype=torch.float32, device=device)
        out[fields["index"]] = fields["values"].to(torch.float32)
        return out

    def _plan(self, fields: Fields, d: int) -> Plan:
        idx = fields["index"].cpu().numpy().astype(np.int64)
        # zero runs before each kept index, and after the last: they add up to d - k
        gaps = np.diff(np.append(idx, d), prepend=-1) - 1
        varint = bits.varint_encode(gaps)
        values_bits = idx.size * fields["values"].element_size() * 8
        if 8 * varint.size <= d:
            return Plan("varint", values_bits + 8 * varint.size, {"index": varint})
        return Plan("bitmap", values_bits + 8 * ((d + 7) // 8))

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        k = fields["values"].numel()
        w.varint(k)
        w.section(tensor_bytes(fields["values"]))
        if plan.code == "varint":
            w.u8(0)
            w.section(plan.extra["index"])
        else:
            w.u8(1)
            mask = np.zeros(d, dtype=bool)
            mask[fields["index"].cpu().numpy()] = True
            w.section(np.packbits(mask))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        k = r.varint(limit=d, name="top-k k")
        if k < 1:
            raise CodecError("top-k with k = 0")
        values = bytes_tensor(r.section(), dtype, k)
        check_finite_decoded(values, "values")
        code = r.u8()
        data = r.section()
        if code == 0:
            try:
                gaps = bits.varint_decode(data, k + 1)
            except CodecError as exc:
                raise CodecError(f"top-k zero runs: {exc}") from None
            index = runs_to_index(gaps, d, "top-k zero runs")
        elif code == 1:
            if data.size != (d + 7) // 8:
                raise CodecError("top-k bitmap has the wrong length")
            index = np.flatnonzero(np.unpackbits(data, count=d))
            if index.size != k:
                raise CodecError(f"top-k bitmap marks {index.size} coordinates, expected {k}")
        else:
            raise CodecError(f"unknown top-k index code {code}")
        return cls(k=k), {
            "values": values,
            "index": torch.from_numpy(index.astype(np.int64)),
            "wire_code": "varint" if code == 0 else "bitmap",
        }

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        k = fields["values"].numel()
        choose = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)
        return choose + k * fields["values"].element_size() * 8

"""Sign operators: 1 bit per coordinate, sign(0) = +1, bits packed MSB first.

* scaled sign, per bucket B: C(x)_j = (||x_B||_1 / d_B) sign(x_j); biased with
  ||C(x) - x||^2 = ||x||^2 - sum_B ||x_B||_1^2 / d_B, so delta >= 1/d_B; plus one float32
  scale per bucket on the wire.
* sign (signSGD, Bernstein et al.): C(x)_j = sign(x_j) for majority vote; not a
  contraction (no scale), so it has neither omega nor delta.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from compression import _buckets
from compression._tensors import (
    CHUNK,
    bucket_lengths,
    bucket_reduce,
    bucket_size,
    bytes_tensor,
    check_finite_decoded,
    check_finite_sum,
    entropy_bits,
    segments,
    signs_dense,
    tensor_bytes,
)
from compression.base import Compressor, Parameterless, parse_int, take_params
from compression.compressed import Fields, Plan
from compression.wire import CodecError, Reader, Writer

__all__ = ["ScaledSign", "Sign"]


def _pack_signs(f32: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Bit j of the result is 1 iff x_j < 0 (so sign(0) = +1), MSB first, ceil(d/8) bytes."""
    d = f32.numel()
    out = np.empty((d + 7) // 8, dtype=np.uint8)
    step = 1 << 16
    if f32.device.type == "cpu":
        arr = f32.numpy()
        buf = np.empty(step, dtype=bool)
        for start in range(0, d, step):
            m = min(step, d - start)
            np.less(arr[start : start + m], 0, out=buf[:m])
            out[start // 8 : (start + m + 7) // 8] = np.packbits(buf[:m])
    else:
        for start in range(0, d, CHUNK):
            neg = (f32[start : start + CHUNK] < 0).cpu().numpy()
            out[start // 8 : (start + neg.size + 7) // 8] = np.packbits(neg)
    return out


class ScaledSign(Compressor):
    """Scaled sign, per bucket B: C(x)_j = (||x_B||_1 / d_B) sign(x_j), sign(0) = +1.
    Biased: ||C(x) - x||^2 = ||x||^2 - sum_B ||x_B||_1^2 / d_B, so delta >= 1/d_B (reported);
    1 bit per coordinate plus one float32 scale per bucket."""

    name = "scaled_sign"
    op_code = 6
    params_help = "bucket=0 (per tensor) or bucket=N"
    unbiased = False
    #: the CPU runs the compiled kernels of :mod:`compression._buckets` from
    #: ``_buckets.MIN_NUMEL`` coordinates on (False: the torch code of other devices)
    _cpu_kernel: ClassVar[bool] = True

    def __init__(self, bucket: int = 0) -> None:
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = per tensor), got {bucket}")
        self.bucket = bucket

    @property
    def spec(self) -> str:
        return "scaled_sign" if self.bucket == 0 else f"scaled_sign:bucket={self.bucket}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ScaledSign:
        p = take_params(params, {"bucket": "0"}, cls.name)
        return cls(parse_int("bucket", p["bucket"]))

    def delta(self, d: int) -> float:
        return 1 / bucket_size(self.bucket, d)

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        b = bucket_size(self.bucket, d)
        if f32.device.type == "cpu" and self._cpu_kernel and d >= _buckets.min_numel():
            packed = _buckets.sign_pack(f32.numpy(), b)
            if packed is None:
                check_finite_sum(f32)
                raise ValueError("the L1 norm of a bucket overflows float32; scale the input down")
            return {"scales": torch.from_numpy(packed[0]), "signs": packed[1]}
        l1 = bucket_reduce(f32, b, 1.0)
        if not bool(torch.isfinite(l1).all()):
            check_finite_sum(f32)
            raise ValueError("the L1 norm of a bucket overflows float32; scale the input down")
        scales = l1 / bucket_lengths(d, b, f32.device)
        return {"scales": scales, "signs": _pack_signs(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        scales: torch.Tensor = fields["scales"]
        b = bucket_size(self.bucket, d)
        kernel = device.type == "cpu" and self._cpu_kernel and d >= _buckets.min_numel()
        if kernel and scales.numel() > 1:
            return torch.from_numpy(_buckets.sign_unpack(fields["signs"], scales.numpy(), b, d))
        if scales.numel() == 1:
            return signs_dense(fields["signs"], d, device, scales)
        out = signs_dense(fields["signs"], d, device, None)
        for start, rows, cols, bk in segments(d, b):
            out[start : start + rows * cols].view(rows, cols).mul_(scales[bk : bk + rows, None])
        return out

    def _plan(self, fields: Fields, d: int) -> Plan:
        return Plan("bits", 32 * fields["scales"].numel() + d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        w.varint(self.bucket)
        w.section(tensor_bytes(fields["scales"]))
        w.section(fields["signs"])

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        bucket = r.varint(name="bucket")
        comp = cls(bucket)
        nb = -(-d // bucket_size(bucket, d))
        scales = bytes_tensor(r.section(), torch.float32, nb, "scale")
        check_finite_decoded(scales, "scales")
        if bool((scales.numpy() < 0).any()):
            raise CodecError("negative scale")
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        return comp, {"scales": scales, "signs": signs.copy()}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = int(np.unpackbits(fields["signs"], count=d).sum(dtype=np.int64))
        return entropy_bits(np.array([neg, d - neg])) + 32.0 * fields["scales"].numel()


class Sign(Parameterless):
    """Plain sign for majority vote (signSGD, Bernstein et al.): C(x)_j = sign(x_j) in
    {-1, +1}, sign(0) = +1; 1 bit per coordinate. Biased and not a contraction (no scale),
    so it has neither omega nor delta."""

    name = "sign"
    op_code = 7
    unbiased = False

    def delta(self, d: int) -> float:
        raise ValueError("sign is not a contraction (no scale): it has no delta")

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        check_finite_sum(f32)
        return {"signs": _pack_signs(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        return signs_dense(fields["signs"], d, device, None)

    def _plan(self, fields: Fields, d: int) -> Plan:
        return Plan("bits", d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        w.section(fields["signs"])

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        return cls(), {"signs": signs.copy()}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = int(np.unpackbits(fields["signs"], count=d).sum(dtype=np.int64))
        return entropy_bits(np.array([neg, d - neg]))

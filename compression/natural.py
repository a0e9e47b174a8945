"""Natural compression (Horváth et al.): stochastic rounding to a power of two.

Each x_j with 2^e <= |x_j| < 2^(e+1) becomes sign(x_j) 2^(e+1) with probability
(|x_j| - 2^e) / 2^e, else sign(x_j) 2^e; unbiased with omega = 1/8. On the wire: the sign
bit and the 8-bit float32 exponent of every coordinate, 9 bits each.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from compression._tensors import CHUNK, entropy_bits, signs_dense
from compression.base import Compressor, Parameterless
from compression.compressed import Fields, Plan
from compression.wire import CodecError, Reader, Writer

__all__ = ["NaturalCompression"]


class NaturalCompression(Parameterless):
    """Natural compression (Horváth et al.): each x_j with 2^e <= |x_j| < 2^(e+1) becomes
    sign(x_j) 2^(e+1) with probability (|x_j| - 2^e) / 2^e, else sign(x_j) 2^e.
    Unbiased, omega = 1/8 (for normal floats; values that would round to 2^128 are kept at
    2^127). On the wire: the sign bit and the 8-bit float32 exponent, 9 bits per coordinate.
    Computed on the float32 bit pattern: the mantissa m (23 bits) rounds the exponent up iff a
    uniform 23-bit integer is below m.
    """

    name = "natural"
    op_code = 2

    def omega(self, d: int) -> float:
        return 1 / 8

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        d = f32.numel()
        g = self._generator(f32.device, seed)
        ints = f32.view(torch.int32)
        exps = torch.empty(d, dtype=torch.uint8, device=f32.device)
        for start in range(0, d, CHUNK):
            word = ints[start : start + CHUNK]
            exp = (word >> 23) & 0xFF
            if bool((exp == 0xFF).any()):
                raise ValueError("input contains NaN or inf")
            mant = word & 0x7FFFFF
            r = torch.randint(
                0, 1 << 23, word.shape, generator=g, device=word.device, dtype=torch.int32
            )
            exp += (r < mant).to(torch.int32)
            exps[start : start + word.numel()] = exp.clamp_(max=254).to(torch.uint8)
        return {"exps": exps, "signs": _pack_signs_bits(f32)}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        exps: torch.Tensor = fields["exps"]
        out = signs_dense(fields["signs"], d, device, None)
        for start in range(0, d, CHUNK):
            end = min(d, start + CHUNK)
            out[start:end].mul_((exps[start:end].to(torch.int32) << 23).view(torch.float32))
        return out

    def _plan(self, fields: Fields, d: int) -> Plan:
        return Plan("dense", 9 * d)

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        w.section(fields["signs"])
        w.section(fields["exps"].cpu().numpy())

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        signs = r.section()
        if signs.size != (d + 7) // 8:
            raise CodecError("sign section has the wrong length")
        exps = r.section()
        if exps.size != d:
            raise CodecError(f"exponent section has {exps.size} bytes, expected {d}")
        if d and int(exps.max()) == 0xFF:
            raise CodecError("exponent 255 (NaN or inf)")
        return cls(), {"signs": signs.copy(), "exps": torch.from_numpy(exps.copy())}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        neg = np.unpackbits(fields["signs"], count=d).astype(np.int64)
        sym = (neg << 8) | fields["exps"].cpu().numpy().astype(np.int64)
        return entropy_bits(np.bincount(sym, minlength=512))


def _pack_signs_bits(f32: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Packed sign *bits* of the float32 pattern (so -0.0 keeps its sign), MSB first."""
    d = f32.numel()
    out = np.empty((d + 7) // 8, dtype=np.uint8)
    for start in range(0, d, CHUNK):
        neg = (f32[start : start + CHUNK].view(torch.int32) < 0).cpu().numpy()
        out[start // 8 : (start + neg.size + 7) // 8] = np.packbits(neg)
    return out

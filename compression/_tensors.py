"""Low-level helpers that several operator families share.

Operators act on the flattened float32 vector x in R^d, per tensor or per bucket: the flat
vector is cut into consecutive buckets B of ``bucket`` coordinates (the last one may be
shorter, d_B = min(bucket, d) for the others) and norms or scales are taken per bucket;
``bucket=0`` means one bucket holding the whole tensor. All math runs on the tensor's own
device with torch ops over whole arrays, chunked (:data:`CHUNK`) to bound memory, with no
Python loop over coordinates. Here:

* buckets and chunks: :func:`bucket_size`, :func:`bucket_reduce` (||x_B||_1, ||x_B||_2 or
  ||x_B||_inf per bucket), :func:`bucket_lengths` (d_B), :func:`segments` (whole buckets
  per step);
* input checks: :func:`check_finite_sum` (the encoders refuse NaN and inf);
* raw values on the wire: :func:`tensor_bytes` / :func:`bytes_tensor` (little-endian bytes
  of any dtype), and the decoders' checks of what they read: :func:`check_finite_decoded`,
  :func:`runs_to_index` (zero runs r_0..r_n to positions, index_i = sum_{j<=i} (r_j + 1) - 1);
* sign bits: :func:`signs_dense` ((-1)^bit_j * scale from bits packed MSB first);
* the information limit: :func:`entropy_bits` (n H(p̂) of symbol counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import torch

from compression.wire import CodecError

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


#: Coordinates processed per step; bounds the temporaries of encode to a few MB.
CHUNK = 1 << 18


def check_finite_sum(f32: torch.Tensor) -> None:
    """Raise ValueError if ``f32`` holds NaN or inf (one reduction; exact check only when the
    sum is not finite, which also happens when finite values overflow the sum)."""
    if not math.isfinite(float(f32.sum())) and not bool(torch.isfinite(f32).all()):
        raise ValueError("input contains NaN or inf")


def bucket_size(bucket: int, d: int) -> int:
    return d if bucket == 0 or bucket > d else bucket


def bucket_reduce(f32: torch.Tensor, b: int, ord: float) -> torch.Tensor:
    """Per-bucket vector norm of order ``ord`` (1, 2 or inf), float32 of length ceil(d/b)."""
    d = f32.numel()
    nfull = d // b
    parts = []
    if nfull:
        parts.append(torch.linalg.vector_norm(f32[: nfull * b].view(nfull, b), ord=ord, dim=1))
    if d % b:
        parts.append(torch.linalg.vector_norm(f32[nfull * b :], ord=ord).reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def bucket_lengths(d: int, b: int, device: torch.device) -> torch.Tensor:
    nb = -(-d // b)
    lengths = torch.full((nb,), float(b), dtype=torch.float32, device=device)
    if d % b:
        lengths[-1] = float(d % b)
    return lengths


def segments(d: int, b: int, chunk: int = CHUNK) -> Iterator[tuple[int, int, int, int]]:
    """Cut [0, d) into pieces ``(start, rows, cols, bucket)``: the piece is the flat slice
    ``[start, start + rows * cols)`` viewed as ``(rows, cols)``, row r lying in bucket
    ``bucket + r``. When b <= chunk a piece is up to chunk // b whole buckets (or the short
    last bucket); when b > chunk it is one row of at most ``chunk`` coordinates of a bucket."""
    if b <= chunk:
        nfull = d // b
        per = max(1, chunk // b)
        for i in range(0, nfull, per):
            yield i * b, min(per, nfull - i), b, i
        if d % b:
            yield nfull * b, 1, d % b, nfull
    else:
        for i in range(-(-d // b)):
            end = min(d, (i + 1) * b)
            for start in range(i * b, end, chunk):
                yield start, 1, min(chunk, end - start), i


def tensor_bytes(t: torch.Tensor) -> npt.NDArray[np.uint8]:
    """Raw little-endian bytes of a tensor (any dtype), as a uint8 numpy array."""
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    arr: npt.NDArray[np.uint8] = flat.cpu().numpy().view(np.uint8)
    return arr


def bytes_tensor(
    data: npt.NDArray[np.uint8], dtype: torch.dtype, n: int, what: str = "value"
) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes`: ``n`` values of ``dtype``, on the CPU (decoders
    validate on the CPU and move to the target device only after)."""
    item = torch.empty((), dtype=dtype).element_size()
    if data.size != n * item:
        raise CodecError(f"{what} section has {data.size} bytes, expected {n * item}")
    return torch.from_numpy(data.copy()).view(_INT_VIEW[item]).view(dtype)


def float_array(t: torch.Tensor) -> npt.NDArray[np.floating]:
    """A CPU tensor's values as numpy (bfloat16 widened exactly to float32): the decoders'
    checks run in numpy, whose small ops cost a fraction of torch's."""
    return (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy()


def check_finite_decoded(t: torch.Tensor, what: str) -> None:
    """No payload legitimately carries NaN or inf (the encoders refuse such inputs and
    their norms and scales are finite), so a non-finite float is a crafted or corrupt
    payload. A float64 value must also be finite as float32 (the math runs in float32 and
    the encoders refuse inputs whose float32 image overflows). One sum decides the common
    case: it is finite only if every term is; the exact check runs when it is not."""
    if not t.numel():
        return
    a = float_array(t)
    with np.errstate(over="ignore", invalid="ignore"):
        if not math.isfinite(float(a.sum())) and not bool(np.isfinite(a).all()):
            raise CodecError(f"{what} contain NaN or inf")
        if a.dtype == np.float64 and not bool(np.isfinite(a.astype(np.float32)).all()):
            raise CodecError(f"{what} lie outside float32's range")


def check_run_bounds(what: str, n: int, d: int, low: int, high: int) -> None:
    """The first checks of :func:`runs_to_index`, on n + 1 zero runs with minimum ``low`` and
    maximum ``high``: each in 0..d - n."""
    top = d - n
    if top < 0:
        raise CodecError(f"{what}: {n} kept coordinates exceed the declared size {d}")
    if low < 0 or high > top:
        raise CodecError(f"{what}: a run of {high if high > top else low} zeros, outside 0..{top}")


def check_run_sums(what: str, n: int, d: int, ends_min: Callable[[], int], last: int) -> None:
    """The last checks of :func:`runs_to_index`, on the partial sums sum_{j <= i} (r_j + 1)
    of n + 1 bounded runs in wrapping int64: the smallest (``ends_min()``, asked only when
    they could wrap) positive, the last (``last``) d + 1."""
    if (n + 1) * (d - n + 1) >= 1 << 63 and ends_min() <= 0:
        raise CodecError(f"{what}: the positions overflow")
    if last != d + 1:
        raise CodecError(f"{what} do not add up to the declared size {d}")


def runs_to_index(
    runs: npt.NDArray[np.int64], d: int, what: str = "zero runs"
) -> npt.NDArray[np.int64]:
    """Positions of the n = len(runs) - 1 kept coordinates from the zero runs r_0..r_n
    before each of them and after the last: index_i = sum_{j <= i} (r_j + 1) - 1.

    Valid iff every r_j >= 0 and sum_j r_j + n = d; then 0 <= index_0 < ... < index_{n-1} < d.
    The check cannot be fooled by int64 wrap-around (runs [2^63-1, 2^63-1, 100] sum to 98
    modulo 2^64): every run is first bounded by d - n, so each step r_j + 1 <= d + 1
    <= 2^48 + 1 (``compression.wire.MAX_NUMEL``); the partial sums then grow strictly, and when
    n (d - n + 1) < 2^63 they cannot wrap at all; otherwise the first wrap would turn one
    negative (and they stay negative for at least 2^14 steps), which is checked.
    """
    n = int(runs.size) - 1
    if n < 0:
        raise CodecError(f"{what}: none")
    check_run_bounds(what, n, d, int(runs.min()), int(runs.max()))
    ends = np.cumsum(runs + 1)
    check_run_sums(what, n, d, lambda: int(ends.min()), int(ends[-1]))
    return ends[:-1] - 1


def entropy_bits(counts: npt.NDArray[np.int64]) -> float:
    """n * H(empirical distribution) in bits, for symbol counts ``counts``."""
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    if n == 0:
        return 0.0
    return float(-(counts * np.log2(counts / n)).sum())


#: Row v holds the eight values (-1 if bit set else +1) of byte v, MSB first.
_SIGN_TABLE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(bool), -1.0, 1.0
).astype(np.float32)


def signs_dense(
    packed: npt.NDArray[np.uint8], d: int, device: torch.device, scale: torch.Tensor | None
) -> torch.Tensor:
    """The float32 vector (-1)^bit_j * scale (scale 1 when None) for packed sign bits: one
    table lookup per byte, eight floats at a time."""
    table = _SIGN_TABLE
    if scale is not None:
        table = table * np.float32(float(scale.reshape(()).to(torch.float32).cpu()))
    index = torch.from_numpy(packed).to(device=device, dtype=torch.int64)
    out = torch.empty(packed.size, 8, dtype=torch.float32, device=device)
    torch.index_select(torch.from_numpy(table).to(device), 0, index, out=out)
    return out.view(-1)[:d]

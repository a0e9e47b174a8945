"""fedsqueeze compression: operators on torch tensors and their bit-exact wire formats.

    from compression import parse_compressor, decode

    c = parse_compressor("qsgd:s=1,bucket=4096")
    m = c.compress(x, seed=123)       # Compressed
    payload = m.to_bytes()            # what goes on the wire
    y = decode(payload).dense()       # == m.dense(), bit for bit

Compression knows nothing of Flower: it maps tensors to bytes and back. One module per idea:

    compressed.py  Compressed: one message, symbols in memory, bytes on demand
    base.py        Compressor: the operator interface, input checks, spec parameters
    identity.py    identity
    levels.py      level quantizers (per-bucket norm + signed levels) and their codes
    qsgd.py        QSGD (s-quantization; thinning for s = 1, kernel in _thin.py)
    dithering.py   natural dithering
    natural.py     natural compression
    sparse.py      rand-k, top-k
    signs.py       scaled sign, sign
    registry.py    the operators by name and wire code; parse_compressor
    decoding.py    decode: header checks, size caps, then the operator's validated fields
    wire.py        framing: header, sections, CRC-32; CodecError
    bits.py        bit-level codes (fixed width, base 3, Rice, LEB128)
    _tensors.py    helpers several operators share (buckets, raw bytes, decode checks)
    _buckets.py    one-pass CPU kernels of QSGD and scaled sign for d >= 2^22 (numba,
                   _buckets_jit.py), counter-based uniforms; kernels_from(n) lowers the
                   threshold inside a block (long-lived processes: the server half)
    _level_codes.py  the level codes (dense, rice, sparse) in compiled passes for d >= 2^22
                   (numba, _level_codes_jit.py): the numpy code's bytes and checks
"""

from compression._buckets import LONG_LIVED_MIN_NUMEL, kernels_from
from compression.base import Compressor
from compression.compressed import Compressed
from compression.decoding import decode
from compression.dithering import NaturalDithering
from compression.identity import Identity
from compression.natural import NaturalCompression
from compression.qsgd import QSGD
from compression.registry import OPERATORS, parse_compressor
from compression.signs import ScaledSign, Sign
from compression.sparse import RandK, TopK, randk_indices
from compression.wire import CodecError

__all__ = [
    "LONG_LIVED_MIN_NUMEL",
    "OPERATORS",
    "QSGD",
    "CodecError",
    "Compressed",
    "Compressor",
    "Identity",
    "NaturalCompression",
    "NaturalDithering",
    "RandK",
    "ScaledSign",
    "Sign",
    "TopK",
    "decode",
    "kernels_from",
    "parse_compressor",
    "randk_indices",
]

"""fedsqueeze compression: operators on torch tensors and their bit-exact wire formats.

    from compression import parse_compressor, decode

    c = parse_compressor("qsgd:s=1,bucket=4096")
    m = c.compress(x, seed=123)       # Compressed
    payload = m.to_bytes()            # what goes on the wire
    y = decode(payload).dense()       # == m.dense(), bit for bit

Compression knows nothing of Flower: it maps tensors to bytes and back.
"""

from compression.operators import OPERATORS, Compressed, Compressor, decode, parse_compressor
from compression.wire import CodecError

__all__ = ["OPERATORS", "CodecError", "Compressed", "Compressor", "decode", "parse_compressor"]

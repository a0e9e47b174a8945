"""The operators by name and by wire code, and :func:`parse_compressor` for specs.

A spec is ``name`` or ``name:key=value,key=value`` (case-insensitive, spaces ignored);
``c.spec`` is its canonical form and ``parse_compressor(c.spec) == c``. Each operator's
``op_code`` is the byte that names it in the wire header (:mod:`compression.wire`).
"""

from __future__ import annotations

from compression.base import Compressor
from compression.dithering import NaturalDithering
from compression.identity import Identity
from compression.natural import NaturalCompression
from compression.qsgd import QSGD
from compression.signs import ScaledSign, Sign
from compression.sparse import RandK, TopK

__all__ = ["OPERATORS", "OPERATORS_BY_CODE", "parse_compressor"]


OPERATORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (Identity, QSGD, NaturalCompression, NaturalDithering, RandK, TopK, ScaledSign, Sign)
}
OPERATORS_BY_CODE: dict[int, type[Compressor]] = {cls.op_code: cls for cls in OPERATORS.values()}


def parse_compressor(spec: str) -> Compressor:
    """Build an operator from a spec such as ``"qsgd:s=1,bucket=4096"``.

    Specs are ``name`` or ``name:key=value,key=value`` (case-insensitive, spaces ignored):
    identity; qsgd (s, bucket, norm); natural; dither (s, bucket); randk (frac or k,
    unbiased); topk (frac or k); scaled_sign (bucket); sign. ``c.spec`` is the canonical form.
    """
    if not isinstance(spec, str):
        raise TypeError(f"compressor spec must be a string, got {type(spec).__name__}")
    text = spec.replace(" ", "").lower()
    name, _, rest = text.partition(":")
    if name not in OPERATORS:
        raise ValueError(
            f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(OPERATORS)}"
        )
    params: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"bad parameter {item!r} in spec {spec!r}: expected key=value")
            if key in params:
                raise ValueError(f"parameter {key!r} given twice in spec {spec!r}")
            params[key] = value
    elif text.endswith(":"):
        raise ValueError(f"spec {spec!r} has a ':' but no parameters")
    return OPERATORS[name].from_params(params)

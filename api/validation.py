"""What the store accepts: checks that keep one bad write from breaking every read.

Everything stored must read back and serialize on SQLite and PostgreSQL alike, so a write
is refused (`InvalidError`, 422 over REST) when it holds

- text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``) or holds a NUL
  character (PostgreSQL text cannot store NUL);
- a JSON value (a run's config, a round's extra) nested deeper than `MAX_JSON_DEPTH`,
  larger than `MAX_JSON_BYTES` once encoded, holding NaN or ±inf, an integer outside
  [-2^64, 2^64], or a non-JSON type.

Byte counters are bounded where they are summed (`api.store`): a run's totals stay at
most `MAX_TOTAL` = 2^63 - 1 (a signed BIGINT).
"""

from __future__ import annotations

import json
import math
from typing import Any

from api.errors import InvalidError

MAX_JSON_DEPTH = 16  # {"a": {"b": 1}} has depth 2; run configs are flat, extras depth <= 3
MAX_JSON_BYTES = 256 * 1024  # one config or extra, UTF-8 encoded
MAX_JSON_INT = 1 << 64  # Flower node / run ids are unsigned 64-bit
MAX_TOTAL = (1 << 63) - 1  # a run's byte totals (signed BIGINT)


def check_text(value: str, where: str) -> str:
    """Return `value` if it is valid Unicode without NUL, else raise `InvalidError`."""
    if "\x00" in value:
        raise InvalidError(f"{where} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidError(
            f"{where} is not valid Unicode (lone surrogate at position {exc.start})"
        ) from None
    return value


def check_json(value: Any, where: str) -> Any:
    """Return `value` if it is a storable JSON value (see the module docstring), else
    raise `InvalidError` naming the first offending path, e.g. ``config.a[2]``."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list | tuple) and depth > MAX_JSON_DEPTH:
            raise InvalidError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise InvalidError(f"{path} has a non-text key {key!r}")
                check_text(key, f"a key of {path}")
                stack.append((sub, f"{path}.{key}", depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item))
        elif isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, bool) or item is None:
            pass
        elif isinstance(item, int):
            if not -MAX_JSON_INT <= item <= MAX_JSON_INT:
                raise InvalidError(f"{path} is an integer beyond 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidError(f"{path} must be a finite number, got {item!r}")
        else:
            raise InvalidError(f"{path} is a {type(item).__name__}, not a JSON value")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_JSON_BYTES:
        raise InvalidError(f"{where} is {size} bytes encoded, more than {MAX_JSON_BYTES}")
    return value

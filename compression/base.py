"""The base class of the compression operators C and the parsing of their specs.

Notation (ALGORITHMS.md): x in R^d, C(x) the compressed vector. An unbiased operator has
E C(x) = x and E||C(x) - x||^2 <= omega ||x||^2 (``omega(d)``); a biased one is a
contraction, ||C(x) - x||^2 <= (1 - delta) ||x||^2 (``delta(d)``; in expectation for
biased rand-k).

:class:`Compressor` checks the input and flattens it to float32; each operator supplies
``_compress`` (x to its symbols), ``_dense`` (symbols to C(x)), ``_plan`` (the smallest
code and its size), ``_write`` / ``_read`` (the operator's part of the wire format; ``_read``
validates every field on the CPU) and ``_info_bits`` (the information limit). Random draws
come from a ``torch.Generator`` on the tensor's device seeded with the message's seed.
An operator is built from a spec ``name:key=value,...`` (:mod:`compression.registry`); the
helpers here parse and format its parameters.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar, Self

import torch

from compression.compressed import Compressed, Fields, Plan
from compression.wire import DTYPE_CODES, MAX_NDIM, Reader, Writer

__all__ = ["Compressor", "Parameterless"]


def parse_int(name: str, value: str) -> int:
    """The spec parameter ``name=value`` as an integer."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} is not an integer") from None


def parse_float(name: str, value: str) -> float:
    """The spec parameter ``name=value`` as a finite float."""
    try:
        out = float(value)
    except ValueError:
        raise ValueError(f"parameter {name}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"parameter {name}={value!r} is not finite")
    return out


def parse_bool(name: str, value: str) -> bool:
    """The spec parameter ``name=value`` as a boolean (true/1/yes or false/0/no)."""
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"parameter {name}={value!r} is not a boolean (true/false)")


def format_float(value: float) -> str:
    """``value`` as written in a canonical spec (no trailing zeros: 0.01, 0.5, 1)."""
    return repr(float(value)).rstrip("0").rstrip(".") if "e" not in repr(value) else repr(value)


def take_params(params: dict[str, str], allowed: dict[str, str | None], op: str) -> dict[str, str]:
    """The parameters of a spec for operator ``op``: the defaults of the ``allowed`` keys
    (None: no default) overridden by those given; an unknown key raises ValueError."""
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {sorted(unknown)} for {op!r}; allowed: {sorted(allowed)}"
        )
    out = {k: v for k, v in allowed.items() if v is not None}
    out.update(params)
    return out


class Compressor(ABC):
    """A compression operator C. Build one with :func:`parse_compressor`."""

    name: ClassVar[str]
    op_code: ClassVar[int]
    params_help: ClassVar[str] = ""
    unbiased: bool = True

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; ``parse_compressor(c.spec)`` rebuilds ``c``."""

    def __repr__(self) -> str:
        return f"parse_compressor({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compressor) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def omega(self, d: int) -> float:
        """Variance factor omega for dimension d (unbiased operators)."""
        raise ValueError(f"{self.spec} is biased: it has a contraction factor delta, not omega")

    def delta(self, d: int) -> float:
        """Contraction factor delta for dimension d (biased operators)."""
        raise ValueError(f"{self.spec} is unbiased: it has a variance factor omega, not delta")

    @classmethod
    @abstractmethod
    def from_params(cls, params: dict[str, str]) -> Compressor: ...

    def compress(self, x: torch.Tensor, seed: int = 0) -> Compressed:
        """Compress ``x`` (any shape, float32/float16/bfloat16/float64, any device) with
        randomness drawn from ``seed``; the same seed gives the same message."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPE_CODES:
            raise ValueError(
                f"unsupported dtype {x.dtype}; use one of float32, float16, bfloat16, float64"
            )
        if x.numel() == 0:
            raise ValueError("cannot compress an empty tensor")
        if len(x.shape) > MAX_NDIM:
            raise ValueError(f"tensor has {len(x.shape)} dimensions, at most {MAX_NDIM}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        flat = x.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        f32 = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        fields = self._compress(f32, flat, seed)
        return Compressed(self, tuple(x.shape), x.dtype, x.device, fields)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    # -- operator specific parts
    @abstractmethod
    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields: ...

    @abstractmethod
    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor: ...

    @abstractmethod
    def _plan(self, fields: Fields, d: int) -> Plan: ...

    def _plan_for(self, fields: Fields, d: int, code: str) -> Plan:
        plan = self._plan(fields, d)
        if plan.code != code:
            raise ValueError(f"{self.spec} has no code {code!r}; it uses {plan.code!r}")
        return plan

    @abstractmethod
    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None: ...

    @classmethod
    @abstractmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        """Parse and validate the operator's fields of a message of d coordinates, on the
        CPU: every count, index and float checked, so that ``_dense`` cannot fail."""

    @abstractmethod
    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float: ...


class Parameterless(Compressor):
    """An operator without parameters: its spec is its name and it accepts none."""

    @property
    def spec(self) -> str:
        return self.name

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Self:
        take_params(params, {}, cls.name)
        return cls()

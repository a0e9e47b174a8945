"""The identity operator: C(x) = x, omega = 0; the raw floats of the input dtype on the wire."""

from __future__ import annotations

import torch

from compression._tensors import bytes_tensor, check_finite_decoded, check_finite_sum, tensor_bytes
from compression.base import Compressor, Parameterless
from compression.compressed import Fields, Plan
from compression.wire import Reader, Writer

__all__ = ["Identity"]


class Identity(Parameterless):
    """C(x) = x; omega = 0; the raw floats of the input dtype on the wire."""

    name = "identity"
    op_code = 0

    def omega(self, d: int) -> float:
        return 0.0

    def _compress(self, f32: torch.Tensor, flat: torch.Tensor, seed: int) -> Fields:
        check_finite_sum(f32)
        return {"values": flat}

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        values: torch.Tensor = fields["values"]
        return values.clone()

    def _plan(self, fields: Fields, d: int) -> Plan:
        return Plan("raw", d * fields["values"].element_size() * 8)

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        w.section(tensor_bytes(fields["values"]))

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        values = bytes_tensor(r.section(), dtype, d)
        check_finite_decoded(values, "values")
        return cls(), {"values": values}

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return float(d * fields["values"].element_size() * 8)

"""Level quantizers and their wire codes, shared by QSGD and natural dithering.

A level quantizer sends, per bucket B, a float32 norm ||x_B|| and, per coordinate, a signed
level l_j in {-s..s}; C(x)_j = ||x_B|| v(l_j) with the operator's table of level values v
(l_j / s for QSGD, 0 or 2^(|l_j|-s) for natural dithering). :class:`LevelQuantizer` holds
what does not depend on the table: ``dense()`` and the three codes of the levels, of which
the smallest is sent:

* dense: symbol l_j + s in ceil(log2(2s+1)) = 1 + ceil(log2(s+1)) bits (for s = 1 the
  three symbols are packed five per byte, "base3", 1.6 bits);
* rice: |l_j| Rice-coded for every coordinate, plus one sign bit per non-zero (small
  levels dominate when s is large);
* sparse: positions of the non-zero levels as Rice-coded zero runs, one sign bit and
  |l_j| - 1 Rice-coded (or in ceil(log2 s) bits) per non-zero.

The information limit is n H(p̂) of the level histogram plus 32 bits per norm.

From ``_buckets.MIN_NUMEL`` coordinates on, the CPU plans, writes and reads the codes with
the compiled passes of :mod:`compression._level_codes` (the same bytes, the same checks
and errors); below it the numpy code of :mod:`compression.bits` runs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch

from compression import _buckets, _level_codes, bits
from compression._tensors import (
    bucket_size,
    bytes_tensor,
    check_finite_decoded,
    entropy_bits,
    runs_to_index,
    segments,
    tensor_bytes,
)
from compression.base import Compressor
from compression.compressed import Fields, Plan
from compression.wire import CodecError, Reader, Writer

__all__ = ["LevelQuantizer"]


#: Levels per step of the level codecs: a multiple of 5 (base-3 groups) and of 8 (bytes).
_LEVEL_CHUNK = 5 * 8 * (1 << 13)
_LEVEL_CODES = {"dense": 0, "base3": 0, "sparse": 1, "rice": 2}
#: k_mags value meaning "magnitudes - 1 in fixed width ceil(log2 s)" in the sparse code.
_FIXED_MAGS = 255


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _section_bits(*nbits: int) -> int:
    """Bits that sections holding ``nbits`` bits each take on the wire: whole bytes plus
    their length varints."""
    total = 0
    for n in nbits:
        nbytes = -(-n // 8)
        total += 8 * (nbytes + _varint_len(nbytes))
    return total


def _fixed_magnitudes(
    unary: npt.NDArray[np.uint8], rem: npt.NDArray[np.uint8], nnz: int, s: int
) -> npt.NDArray[np.int64]:
    """The sparse code's |l_j| (1..s) sent in fixed width ceil(log2 s) as |l_j| - 1 (its
    unary stream must be empty); both decode paths read them so."""
    if unary.size:
        raise CodecError("fixed-width magnitudes with a unary stream")
    mags = bits.unpack_fixed(rem, nnz, (s - 1).bit_length()).astype(np.int64) + 1
    if nnz and int(mags.max()) > s:
        raise CodecError(f"level above s = {s}")
    return mags


class LevelQuantizer(Compressor):
    """Shared part of QSGD and natural dithering: per bucket B a float32 norm ||x_B||, and per
    coordinate a signed level l_j in {-s..s}, sent with the smallest of the three codes of
    this module (dense or base3, rice, sparse). A subclass supplies the math (``_compress``,
    ``_level_table``: the values of the levels -s..s) and its parameters on the wire
    (``_write_params`` / ``_read_params``).

    Fields: ``norms`` (float32, one per bucket) and either ``levels`` (int16, d) or the sparse
    pair ``index`` (int64, sorted) + ``nzlevels`` (int16).
    """

    s: int
    bucket: int
    #: from ``_buckets.MIN_NUMEL`` coordinates on, the level codes are written and
    #: read by the compiled kernels of :mod:`compression._level_codes` (the same bytes);
    #: False: the numpy code of :mod:`compression.bits` at every size (for tests)
    _compiled_codes: ClassVar[bool] = True

    @classmethod
    def _compiled(cls, d: int) -> bool:
        return cls._compiled_codes and d >= _buckets.min_numel()

    @abstractmethod
    def _level_table(self, device: torch.device) -> torch.Tensor:
        """float32 values of the signed levels -s..s (index level + s)."""

    def _dense(self, fields: Fields, d: int, device: torch.device) -> torch.Tensor:
        norms: torch.Tensor = fields["norms"]
        b = bucket_size(self.bucket, d)
        table = self._level_table(device)
        if "levels" in fields:
            levels: torch.Tensor = fields["levels"]
            if device.type == "cpu" and d >= _buckets.min_numel():
                # one compiled pass (decode has checked the levels in -s..s)
                lev16 = levels.numpy()
                dense = _buckets.levels_dense(lev16, norms.numpy(), table.numpy(), self.s, b)
                return torch.from_numpy(dense)
            out = torch.empty(d, dtype=torch.float32, device=device)
            for start, rows, cols, bk in segments(d, b):
                n = rows * cols
                lev = levels[start : start + n].view(rows, cols).to(torch.int64) + self.s
                torch.mul(
                    table[lev],
                    norms[bk : bk + rows, None],
                    out=out[start : start + n].view(rows, cols),
                )
            return out
        index: torch.Tensor = fields["index"]
        if device.type == "cpu" and self._compiled(d):
            nz16 = fields["nzlevels"].numpy()
            args = (index.numpy(), nz16, norms.numpy(), table.numpy(), self.s, b, d)
            return torch.from_numpy(_level_codes.scatter_levels(*args))
        if device.type == "cpu":
            # numpy, single-threaded (these small ops only lose time to thread hand-offs),
            # into calloc'd zeros: the OS hands out zeroed pages as they are first written,
            # one pass over the output instead of a memset and then the page faults
            idx = index.numpy()
            nz = fields["nzlevels"].numpy().astype(np.intp) + self.s
            values = table.numpy()[nz] * norms.numpy()[idx // b]
            zeros = np.zeros(d, dtype=np.float32)
            zeros[idx] = values
            return torch.from_numpy(zeros)
        vals = table[fields["nzlevels"].to(torch.int64) + self.s] * norms[index // b]
        out = torch.zeros(d, dtype=torch.float32, device=device)
        out.index_put_((index,), vals)
        return out

    def _level_chunks(self, fields: Fields, d: int) -> Iterator[npt.NDArray[np.int16]]:
        """The signed levels, ``_LEVEL_CHUNK`` coordinates at a time (numpy int16)."""
        if "levels" in fields:
            levels: torch.Tensor = fields["levels"]
            for start in range(0, d, _LEVEL_CHUNK):
                yield levels[start : start + _LEVEL_CHUNK].cpu().numpy()
            return
        idx = fields["index"].cpu().numpy()
        nz = fields["nzlevels"].cpu().numpy()
        for start in range(0, d, _LEVEL_CHUNK):
            end = min(d, start + _LEVEL_CHUNK)
            lo, hi = np.searchsorted(idx, [start, end])
            arr = np.zeros(end - start, dtype=np.int16)
            arr[idx[lo:hi] - start] = nz[lo:hi]
            yield arr

    def _sparse_arrays(self, fields: Fields) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
        """(positions, values) of the non-zero levels, sorted (numpy, for the kernels)."""
        if "index" in fields:
            idx = np.ascontiguousarray(fields["index"].cpu().numpy(), dtype=np.int64)
            return idx, np.ascontiguousarray(fields["nzlevels"].cpu().numpy(), dtype=np.int16)
        return _level_codes.sparse_from_levels(fields["levels"].cpu().numpy())

    def _level_array(self, fields: Fields, d: int) -> npt.NDArray[np.int16]:
        """Every signed level (numpy int16, for the kernels)."""
        if "levels" in fields:
            return np.ascontiguousarray(fields["levels"].cpu().numpy(), dtype=np.int16)
        levels = np.zeros(d, dtype=np.int16)
        levels[fields["index"].cpu().numpy()] = fields["nzlevels"].cpu().numpy()
        return levels

    def _nonzero_chunks(
        self, fields: Fields, d: int
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]]:
        """(zero runs, levels) of the non-zero levels in order, chunk by chunk: the run before
        each non-zero; the last chunk carries one more run, from the last non-zero to d."""
        if "index" in fields:
            idx = fields["index"].cpu().numpy().astype(np.int64)
            nz = fields["nzlevels"].cpu().numpy()
            yield np.diff(np.append(idx, d), prepend=-1) - 1, nz
            return
        last = -1
        for start, arr in zip(
            range(0, d, _LEVEL_CHUNK), self._level_chunks(fields, d), strict=True
        ):
            pos = np.flatnonzero(arr) + start
            if pos.size:
                yield np.diff(pos, prepend=last) - 1, arr[pos - start]
                last = int(pos[-1])
        yield np.array([d - 1 - last], dtype=np.int64), np.zeros(0, dtype=np.int16)

    def _histogram(self, fields: Fields, d: int) -> npt.NDArray[np.int64]:
        """counts[l + s] = number of coordinates with level l, for l in -s..s."""
        s = self.s
        if self._compiled(d):
            if "levels" in fields:
                return _level_codes.histogram(self._level_array(fields, d), s)
            nz16 = np.ascontiguousarray(fields["nzlevels"].cpu().numpy(), dtype=np.int16)
            counts = _level_codes.histogram(nz16, s)
            counts[s] = d - nz16.size
            return counts
        if "index" in fields:
            nz = fields["nzlevels"].cpu().numpy().astype(np.int64)
            counts = np.bincount(nz + s, minlength=2 * s + 1)
            counts[s] = d - nz.size
            return counts
        counts = np.zeros(2 * s + 1, dtype=np.int64)
        for arr in self._level_chunks(fields, d):
            counts += np.bincount(arr.astype(np.int32) + s, minlength=2 * s + 1)
        return counts

    def _dense_bits(self, d: int) -> int:
        if self.s == 1:
            return 8 * ((d + 4) // 5)
        return d * (2 * self.s).bit_length()

    def _plans(self, fields: Fields, d: int, want: str | None = None) -> dict[str, Plan]:
        """Sizes of the codes: dense (fixed width or base 3), rice (every |l_j| Rice-coded,
        then a sign bit per non-zero) and, when it can win or is asked for, sparse (zero runs
        and |l_j| - 1 Rice-coded, or |l_j| - 1 in fixed width when smaller, and signs)."""
        s = self.s
        # every code: the code byte and the norms section
        head = 8 + _section_bits(32 * fields["norms"].numel())
        signed = self._histogram(fields, d)
        mags = signed[s:].copy()
        mags[1:] += signed[:s][::-1]
        nnz = d - int(mags[0])
        dense_code = "base3" if s == 1 else "dense"
        plans = {dense_code: Plan(dense_code, head + _section_bits(self._dense_bits(d)))}
        k, cost = bits.best_rice_parameter_from_counts(mags)
        rice_bits = 8 + _section_bits(cost - d * k, d * k, nnz)
        plans["rice"] = Plan("rice", head + rice_bits, {"k": k})
        fixed_width = (s - 1).bit_length()
        k_mags, mag_cost = bits.best_rice_parameter_from_counts(mags[1:])
        mag_sections = _section_bits(mag_cost - nnz * k_mags, nnz * k_mags)
        if _section_bits(0, fixed_width * nnz) <= mag_sections:
            k_mags, mag_sections = _FIXED_MAGS, _section_bits(0, fixed_width * nnz)
        # every non-zero costs at least its sign and the end of its run
        if want == "sparse" or head + 2 * nnz + mag_sections < min(p.bits for p in plans.values()):
            mean_run = (d - nnz) / (nnz + 1)
            centre = int(np.floor(np.log2(mean_run * np.log(2)))) if mean_run >= 1 else 0
            ks = range(max(0, centre - 2), centre + 3)
            if self._compiled(d) and "levels" in fields:
                # counted over the dense levels, without gathering the non-zero ones
                levels = self._level_array(fields, d)
                run_bits = _level_codes.run_costs(levels, d, ks, levels=True)
            elif self._compiled(d):
                run_bits = _level_codes.run_costs(self._sparse_arrays(fields)[0], d, ks)
            else:
                run_bits = dict.fromkeys(ks, 0)
                for runs, _ in self._nonzero_chunks(fields, d):
                    for kk in ks:
                        run_bits[kk] += bits.rice_cost_bits(runs, kk)
            k_runs = min(ks, key=run_bits.__getitem__)
            rem_runs = (nnz + 1) * k_runs
            sparse_bits = 16 + 8 * _varint_len(nnz) + mag_sections
            sparse_bits += _section_bits(run_bits[k_runs] - rem_runs, rem_runs, nnz)
            plans["sparse"] = Plan(
                "sparse", head + sparse_bits, {"k": k_runs, "k_mags": k_mags, "nnz": nnz}
            )
        return plans

    def _plan(self, fields: Fields, d: int) -> Plan:
        return min(self._plans(fields, d).values(), key=lambda p: p.bits)

    def _plan_for(self, fields: Fields, d: int, code: str) -> Plan:
        plans = self._plans(fields, d, want=code)
        if code not in plans:
            raise ValueError(f"{self.spec} has no code {code!r}; codes: {sorted(plans)}")
        return plans[code]

    def _write_params(self, w: Writer) -> None:
        w.varint(self.s)
        w.varint(self.bucket)

    def _write(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        s = self.s
        self._write_params(w)
        w.u8(_LEVEL_CODES[plan.code])
        w.section(tensor_bytes(fields["norms"].to(torch.float32)))
        if plan.code in ("dense", "base3") and self._compiled(d):
            w.section(_level_codes.encode_dense(self._level_array(fields, d), s))
            return
        if plan.code in ("dense", "base3"):
            width = (2 * s).bit_length()
            parts = []
            for arr in self._level_chunks(fields, d):
                symbols = arr.astype(np.int32) + s
                if s == 1:
                    parts.append(bits.pack_base3(symbols.astype(np.uint8)))
                else:
                    parts.append(bits.pack_fixed(symbols, width))
            w.section_parts(parts)
            return
        if self._compiled(d):
            self._write_compiled(w, fields, d, plan)
            return
        signs = bits.BitWriter()
        if plan.code == "rice":
            k = plan.extra["k"]
            rice = bits.RiceWriter(k)
            for arr in self._level_chunks(fields, d):
                rice.add(np.abs(arr).astype(np.int64))
                signs.append((arr[arr != 0] < 0).astype(np.uint8))
            unary, rem = rice.finish()
            w.u8(k)
            w.section(unary)
            w.section(rem)
            w.section(signs.finish())
            return
        k_runs, k_mags = plan.extra["k"], plan.extra["k_mags"]
        runs = bits.RiceWriter(k_runs)
        mags_rice = bits.RiceWriter(k_mags if k_mags != _FIXED_MAGS else 0)
        mags_fixed = bits.BitWriter()
        width = (s - 1).bit_length()
        for gaps, nz in self._nonzero_chunks(fields, d):
            runs.add(gaps)
            signs.append((nz < 0).astype(np.uint8))
            mags = np.abs(nz).astype(np.int64) - 1
            if k_mags == _FIXED_MAGS:
                mags_fixed.append(bits.fixed_bits(mags, width))
            else:
                mags_rice.add(mags)
        w.u8(k_runs)
        w.u8(k_mags)
        w.varint(plan.extra["nnz"])
        for section in runs.finish():
            w.section(section)
        w.section(signs.finish())
        if k_mags == _FIXED_MAGS:
            w.section(b"")
            w.section(mags_fixed.finish())
        else:
            for section in mags_rice.finish():
                w.section(section)

    def _write_compiled(self, w: Writer, fields: Fields, d: int, plan: Plan) -> None:
        """The rice or sparse code's fields and sections, by the compiled kernels."""
        if plan.code == "rice":
            k = plan.extra["k"]
            unary, rem, signs = _level_codes.encode_rice(self._level_array(fields, d), k, self.s)
            w.u8(k)
            for section in (unary, rem, signs):
                w.section(section)
            return
        k_runs, k_mags = plan.extra["k"], plan.extra["k_mags"]
        index, nz = self._sparse_arrays(fields)
        sections = _level_codes.encode_sparse(
            index,
            nz,
            d,
            k_runs,
            None if k_mags == _FIXED_MAGS else k_mags,
            (self.s - 1).bit_length(),
        )
        w.u8(k_runs)
        w.u8(k_mags)
        w.varint(plan.extra["nnz"])
        for section in sections:
            w.section(section)

    @classmethod
    @abstractmethod
    def _read_params(cls, r: Reader) -> LevelQuantizer:
        """The operator's parameters, as ``_write_params`` wrote them, checked."""

    @classmethod
    def _read(cls, r: Reader, d: int, dtype: torch.dtype) -> tuple[Compressor, Fields]:
        comp = cls._read_params(r)
        s = comp.s
        code = r.u8()
        b = bucket_size(comp.bucket, d)
        nb = -(-d // b)
        norms = bytes_tensor(r.section(), torch.float32, nb, "norm")
        check_finite_decoded(norms, "norms")
        if bool((norms.numpy() < 0).any()):
            raise CodecError("negative norm")
        if code == 0:
            data = r.section()
            if cls._compiled(d):
                levels16 = _level_codes.decode_dense(data, d, s)
            elif s == 1:
                levels16 = bits.unpack_base3(data, d).astype(np.int16) - np.int16(1)
            else:
                sym32 = bits.unpack_fixed(data, d, (2 * s).bit_length())
                if sym32.size and int(sym32.max()) > 2 * s:
                    raise CodecError(f"level symbol above 2s = {2 * s}")
                levels16 = sym32.astype(np.int16) - np.int16(s)
            code_name = "base3" if s == 1 else "dense"
            return comp, {
                "norms": norms,
                "levels": torch.from_numpy(levels16),
                "wire_code": code_name,
            }
        if code == 2:
            k = r.u8()
            if k > 62:
                raise CodecError(f"Rice parameter {k} out of range")
            if cls._compiled(d):
                levels16 = cls._read_rice_compiled(r, d, k, s)
                return comp, {
                    "norms": norms,
                    "levels": torch.from_numpy(levels16),
                    "wire_code": "rice",
                }
            try:
                mags = bits.rice_decode(r.section(), r.section(), d, k, limit=s)
            except CodecError as exc:
                raise CodecError(f"levels (at most s = {s}): {exc}") from None
            nonzero = mags != 0
            nnz = int(np.count_nonzero(nonzero))
            signs_raw = r.section()
            if signs_raw.size != (nnz + 7) // 8:
                raise CodecError("sign section has the wrong length")
            levels16 = mags.astype(np.int16)
            neg = np.unpackbits(signs_raw, count=nnz).astype(bool)
            levels16[np.flatnonzero(nonzero)[neg]] *= -1
            return comp, {"norms": norms, "levels": torch.from_numpy(levels16), "wire_code": "rice"}
        if code != 1:
            raise CodecError(f"unknown level code {code}")
        k = r.u8()
        k_mags = r.u8()
        if k > 62 or (k_mags > 62 and k_mags != _FIXED_MAGS):
            raise CodecError(f"Rice parameters {k}, {k_mags} out of range")
        nnz = r.varint(limit=d, name="nnz (non-zero levels)")
        if cls._compiled(d):
            index, nzlevels = cls._read_sparse_compiled(r, d, nnz, k, k_mags, s)
            return comp, {
                "norms": norms,
                "index": torch.from_numpy(index),
                "nzlevels": torch.from_numpy(nzlevels),
                "wire_code": "sparse",
            }
        try:
            runs = bits.rice_decode(r.section(), r.section(), nnz + 1, k, limit=d - nnz)
        except CodecError as exc:
            raise CodecError(f"zero runs: {exc}") from None
        index = runs_to_index(runs, d)
        signs_raw = r.section()
        if signs_raw.size != (nnz + 7) // 8:
            raise CodecError("sign section has the wrong length")
        neg = np.unpackbits(signs_raw, count=nnz).astype(bool)
        mags_unary, mags_rem = r.section(), r.section()
        if k_mags == _FIXED_MAGS:
            mags = _fixed_magnitudes(mags_unary, mags_rem, nnz, s)
        else:
            try:
                mags = bits.rice_decode(mags_unary, mags_rem, nnz, k_mags, limit=s - 1) + 1
            except CodecError as exc:
                raise CodecError(f"magnitudes - 1 (at most s - 1 = {s - 1}): {exc}") from None
        nzlevels = np.where(neg, -mags, mags).astype(np.int16)
        return comp, {
            "norms": norms,
            "index": torch.from_numpy(index),
            "nzlevels": torch.from_numpy(nzlevels),
            "wire_code": "sparse",
        }

    @staticmethod
    def _read_rice_compiled(r: Reader, d: int, k: int, s: int) -> npt.NDArray[np.int16]:
        """The levels of the rice code, by the compiled kernels (the checks and errors of the
        numpy path)."""
        try:
            levels, nnz = _level_codes.rice_decode(r.section(), r.section(), d, k, s, np.int16)
        except CodecError as exc:
            raise CodecError(f"levels (at most s = {s}): {exc}") from None
        signs_raw = r.section()
        if signs_raw.size != (nnz + 7) // 8:
            raise CodecError("sign section has the wrong length")
        _level_codes.apply_signs(levels, signs_raw)
        return levels

    @staticmethod
    def _read_sparse_compiled(
        r: Reader, d: int, nnz: int, k: int, k_mags: int, s: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
        """(positions, levels) of the sparse code after its header fields, by the compiled
        kernels (the checks and errors of the numpy path)."""
        try:
            runs, _ = _level_codes.rice_decode(r.section(), r.section(), nnz + 1, k, d - nnz)
        except CodecError as exc:
            raise CodecError(f"zero runs: {exc}") from None
        index = _level_codes.runs_to_index(runs, d)
        signs_raw = r.section()
        if signs_raw.size != (nnz + 7) // 8:
            raise CodecError("sign section has the wrong length")
        mags_unary, mags_rem = r.section(), r.section()
        if k_mags == _FIXED_MAGS:
            mags = _fixed_magnitudes(mags_unary, mags_rem, nnz, s)
        else:
            try:
                mags, _ = _level_codes.rice_decode(mags_unary, mags_rem, nnz, k_mags, s - 1)
            except CodecError as exc:
                raise CodecError(f"magnitudes - 1 (at most s - 1 = {s - 1}): {exc}") from None
            mags += 1
        return index, _level_codes.signed_levels(mags, signs_raw)

    def _info_bits(self, fields: Fields, d: int, dtype: torch.dtype) -> float:
        return entropy_bits(self._histogram(fields, d)) + 32.0 * fields["norms"].numel()

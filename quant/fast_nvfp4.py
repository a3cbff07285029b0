"""Fused NVFP4 kernel: per-16 group FP8 scale, E2M1 codes and nibble packing in one pass over bf16 weights.

Bit-identical to `quant.nvfp4.quantize_nvfp4_reference` / `encode_nvfp4_reference` (and so to compressed-tensors
0.19.0), tested in tests/quant/test_fast_nvfp4.py. Per 16-group, the steps torch takes in the reference:
  amax = max |w|                      exact in bf16 (compared as integers: |bf16| bits order like the values)
  s    = bf16(float32(amax) / 6)      torch divides a bf16 tensor by a scalar in float32, then rounds to bf16
  s    = fp8(min(gs * s, 448))        float32 product, RNE to E4M3; a zero scale becomes 0.125
  eff  = float32(s) / gs              one float32 division
  x    = float32(w) / eff             one float32 division per element (not a multiply by gs / s)
  code = E2M1 bucket of |x| (ties to even), sign bit iff x < 0
Non-finite weights or a non-finite / negative global scale make the kernel report a flag; the caller then runs the
reference, whose NaN propagation is not worth reproducing here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from quant import fast_common as fc
from quant.constants import FP8_DTYPE, NVFP4_GROUP

if fc.numba is not None:
    import numba

    from quant.fast_common import JIT, bf16_to_f32, fp8_code_nonneg, round_bf16

    # E2M1 thresholds on |x| (quant.constants.FP4_THRESHOLDS_GT / _GE) as float32 constants.
    _T025, _T075, _T125, _T175 = np.float32(0.25), np.float32(0.75), np.float32(1.25), np.float32(1.75)
    _T250, _T350, _T500 = np.float32(2.5), np.float32(3.5), np.float32(5.0)
    _SIX = np.float32(6.0)
    _FP8_MAX = np.float32(448.0)
    _FP8_EPS = np.float32(0.125)
    _FP8_EPS_CODE = np.uint8(0x20)
    _ZERO = np.float32(0.0)
    _MAG = np.uint16(0x7FFF)
    _EXP_ALL_ONES = np.uint16(0x7F80)

    @numba.njit(inline="always", **JIT)
    def _e2m1(x):
        a = abs(x)
        idx = (np.uint8(a > _T025) + np.uint8(a >= _T075) + np.uint8(a > _T125) + np.uint8(a >= _T175)
               + np.uint8(a > _T250) + np.uint8(a >= _T350) + np.uint8(a > _T500))
        return idx | (np.uint8(x < _ZERO) << np.uint8(3))

    @numba.njit(**JIT)
    def _nvfp4_rows(r0, r1, w, gs, rows_per_gs, scale_in, scale_table, packed, scale_out):
        """Rows [r0, r1) of `w` (uint16 bf16 bits [R, C]). `gs` float32, row r uses gs[r // rows_per_gs].
        `scale_in` uint8 [R, C/16] FP8 codes to encode with (`scale_table` decodes all 256 codes), or an empty
        array to compute them into `scale_out`. Writes `packed` uint8 [R, C/2]. Returns 1 if the reference must
        run instead (non-finite weight, or a global scale that is not finite and >= 0).

        One row at a time in simple loops (widen to float32, group max + scale, codes, pack) rather than one loop
        per group: LLVM vectorizes these (AVX-512 here), ~7x faster than the per-group form. Keep branches out
        of the max/scale loop (the mode switch is hoisted, the Inf/NaN test reads `gmax` afterwards): a branch
        there stops vectorization and halves the speed.
        """
        cols = w.shape[1]
        n_groups = cols // 16
        given = scale_in.shape[0] > 0
        xf = np.empty(cols, np.float32)
        gmax = np.empty(n_groups, np.uint16)
        eff = np.empty(n_groups, np.float32)
        codes = np.empty(cols, np.uint8)
        bad = 0
        for r in range(r0, r1):
            g_s = gs[r // rows_per_gs]
            if not (g_s >= _ZERO) or g_s == np.inf:  # also rules out a NaN `p` below
                bad = 1
            wr = w[r]
            for j in range(cols):
                xf[j] = bf16_to_f32(wr[j])
            if given:
                for g in range(n_groups):
                    m = np.uint16(0)
                    for k in range(16):
                        m = max(m, wr[g * 16 + k] & _MAG)
                    gmax[g] = m
                    eff[g] = scale_table[scale_in[r, g]] / g_s
            else:
                for g in range(n_groups):
                    m = np.uint16(0)
                    for k in range(16):
                        m = max(m, wr[g * 16 + k] & _MAG)
                    gmax[g] = m
                    s = round_bf16(bf16_to_f32(m) / _SIX)
                    code8, s8 = fp8_code_nonneg(min(g_s * s, _FP8_MAX))
                    if s8 == _ZERO:
                        code8, s8 = _FP8_EPS_CODE, _FP8_EPS
                    scale_out[r, g] = code8
                    eff[g] = s8 / g_s
            rowmax = np.uint16(0)
            for g in range(n_groups):
                rowmax = max(rowmax, gmax[g])
            if rowmax >= _EXP_ALL_ONES:  # Inf or NaN in this row
                bad = 1
            for g in range(n_groups):
                e = eff[g]
                for k in range(16):
                    codes[g * 16 + k] = _e2m1(xf[g * 16 + k] / e)
            pr = packed[r]
            for k in range(cols // 2):
                pr[k] = codes[2 * k] | (codes[2 * k + 1] << np.uint8(4))
        return bad

    @numba.njit(**JIT)
    def _absmax_bits_rows(r0, r1, w, out):
        """Per row, the max of |bf16| bits (into `out` uint32 [R]; each chunk owns its rows, so no races)."""
        for r in range(r0, r1):
            m = np.uint16(0)
            for c in range(w.shape[1]):
                m = max(m, w[r, c] & _MAG)
            out[r] = m
        return 0


_SCALE_TABLE = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(torch.float32).numpy()
_NO_SCALES = np.empty((0, 0), dtype=np.uint8)


def _rows(w: torch.Tensor) -> tuple[np.ndarray, int, tuple[int, ...]]:
    lead = tuple(w.shape[:-2])
    return fc.bf16_bits(w).reshape(-1, w.shape[-1]), w.shape[-2], lead


def _gs_rows(gs: torch.Tensor, n_rows: int, rows_per_lead: int) -> tuple[np.ndarray, int]:
    """gs float32 as an array and the number of consecutive rows sharing each entry (one value -> all rows)."""
    g = gs.detach().to(torch.float32).reshape(-1).contiguous().numpy()
    return g, (max(n_rows, 1) if g.size == 1 else rows_per_lead)


def quantize_nvfp4(w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quant.nvfp4.quantize_nvfp4` for a validated bf16 CPU weight; None when the reference must run."""
    x, rows_per_lead, lead = _rows(w)
    n_rows, cols = x.shape
    g, rows_per_gs = _gs_rows(gs, n_rows, rows_per_lead)
    packed = np.empty((n_rows, cols // 2), dtype=np.uint8)
    scale = np.empty((n_rows, cols // NVFP4_GROUP), dtype=np.uint8)
    if fc.run_chunks(_nvfp4_rows, n_rows, cols, x, g, rows_per_gs, _NO_SCALES, _SCALE_TABLE, packed, scale):
        return None
    shape = (*lead, rows_per_lead)
    return (torch.from_numpy(packed).reshape(*shape, cols // 2),
            torch.from_numpy(scale).view(FP8_DTYPE).reshape(*shape, cols // NVFP4_GROUP))


def encode_nvfp4(w: torch.Tensor, gs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """`quant.nvfp4.encode_nvfp4` (codes for given FP8 group scales) for a bf16 CPU weight; None -> reference."""
    x, rows_per_lead, lead = _rows(w)
    n_rows, cols = x.shape
    if scale.dtype != FP8_DTYPE or tuple(scale.shape) != (*lead, rows_per_lead, cols // NVFP4_GROUP):
        return None  # broadcast or unusual scales: the reference handles every case
    g, rows_per_gs = _gs_rows(gs, n_rows, rows_per_lead)
    codes = scale.contiguous().view(torch.uint8).numpy().reshape(n_rows, cols // NVFP4_GROUP)
    packed = np.empty((n_rows, cols // 2), dtype=np.uint8)
    if fc.run_chunks(_nvfp4_rows, n_rows, cols, x, g, rows_per_gs, codes, _SCALE_TABLE, packed, _NO_SCALES):
        return None
    return torch.from_numpy(packed).reshape(*lead, rows_per_lead, cols // 2)


def absmax(w: torch.Tensor) -> torch.Tensor | None:
    """`w.abs().amax(dim=(-2, -1))` of a bf16 CPU weight (exact, bf16), or None if it holds Inf/NaN."""
    x, rows_per_lead, lead = _rows(w)
    if x.size == 0:
        return None  # amax of an empty tensor raises in torch: let the reference say so
    rows = np.empty(x.shape[0], dtype=np.uint16)
    fc.run_chunks(_absmax_bits_rows, x.shape[0], x.shape[1], x, rows)
    out = rows.reshape(math.prod(lead), rows_per_lead).max(axis=1).astype(np.uint32)
    if (out >= 0x7F80).any():
        return None
    return torch.from_numpy((out << 16).view(np.float32)).to(torch.bfloat16).reshape(lead)

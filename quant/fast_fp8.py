"""Fused FP8 E4M3 kernels: 128x128-block (vLLM native `fp8`, `weight_scale_inv`) and per-output-channel / per-tensor
(compressed-tensors FP8), one pass over bf16 weights.

Bit-identical to the `_reference` functions in quant/fp8.py (tests/quant/test_fast_fp8.py). The roundings torch
performs there, reproduced step by step:
  block:   scale_inv = float32(amax_tile) / 448 (0 -> bf16 eps), q = fp8(clamp(float32(w) / scale_inv, +-448))
  channel: scale = bf16(float32(amax_row) / 448) (0 -> bf16 eps), q = fp8(bf16(float32(w) / scale)) -- the
           quotient is rounded to bf16 first because torch divides two bf16 tensors in float32 and stores bf16
  tensor:  as channel with one given bf16 scale
Inf/NaN weights make a kernel report a flag, and the caller runs the reference instead.
"""

from __future__ import annotations

import numpy as np
import torch

from quant import fast_common as fc
from quant.constants import FP8_DTYPE

_BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: compressed-tensors' replacement for a zero scale

if fc.numba is not None:
    import numba

    from quant.fast_common import JIT, bf16_to_f32, f32_as_u32, fp8_code, round_bf16

    _MAG = np.uint16(0x7FFF)
    _EXP_ALL_ONES = np.uint16(0x7F80)
    _FP8_MAX = np.float32(448.0)
    _ZERO = np.float32(0.0)
    _EPS = np.float32(_BF16_EPS)
    _HI16 = np.uint32(16)

    @numba.njit(**JIT)
    def _block_bands(b0, b1, w, block, q, scale_inv):
        """Bands [b0, b1) of 128-row blocks over all matrices of `w` (uint16 bf16 bits [L, R, C]); band b is
        matrix b // n_br, block-row b % n_br. Writes `q` uint8 [L, R, C] and `scale_inv` float32 [L, n_br, n_bc].
        A band (128 rows x C, 1 MiB at C=4096) is scanned for its tile maxima, then encoded while it is still in
        cache; both loops run over whole rows with per-column arrays so that they vectorize."""
        rows, cols = w.shape[1], w.shape[2]
        n_br = scale_inv.shape[1]
        n_bc = scale_inv.shape[2]
        colmax = np.empty(cols, np.uint16)  # running |w| max per column over the band's rows
        inv = np.empty(cols, np.float32)  # each column's tile scale, so the encode loop has no tile index
        bad = 0
        for b in range(b0, b1):
            mat, br = b // n_br, b % n_br
            r_lo, r_hi = br * block, min(rows, (br + 1) * block)
            colmax[:] = 0
            for r in range(r_lo, r_hi):
                wr = w[mat, r]
                for c in range(cols):
                    colmax[c] = max(colmax[c], wr[c] & _MAG)
            for bc in range(n_bc):
                c_lo, c_hi = bc * block, min(cols, (bc + 1) * block)
                m = np.uint16(0)
                for c in range(c_lo, c_hi):
                    m = max(m, colmax[c])
                if m >= _EXP_ALL_ONES:
                    bad = 1
                s = bf16_to_f32(m) / _FP8_MAX
                if s == _ZERO:
                    s = _EPS
                scale_inv[mat, br, bc] = s
                inv[c_lo:c_hi] = s
            for r in range(r_lo, r_hi):
                wr = w[mat, r]
                qr = q[mat, r]
                for c in range(cols):
                    qr[c] = fp8_code(bf16_to_f32(wr[c]) / inv[c])
        return bad

    @numba.njit(**JIT)
    def _channel_rows(r0, r1, w, scale_in, q, scale_out):
        """Rows [r0, r1) of `w` (uint16 [R, C]): per-row bf16 scale (given in `scale_in` uint16 [R], or computed
        from the row amax into `scale_out` uint16 [R] when `scale_in` is empty), then `q` uint8 [R, C]."""
        cols = w.shape[1]
        given = scale_in.shape[0] > 0
        bad = 0
        for r in range(r0, r1):
            wr = w[r]
            m = np.uint16(0)
            for c in range(cols):
                m = max(m, wr[c] & _MAG)
            if m >= _EXP_ALL_ONES:
                bad = 1
            if given:
                s = bf16_to_f32(scale_in[r])
            else:
                s = round_bf16(bf16_to_f32(m) / _FP8_MAX)
                if s == _ZERO:
                    s = _EPS
                scale_out[r] = np.uint16(f32_as_u32(s) >> _HI16)
            qr = q[r]
            for c in range(cols):
                qr[c] = fp8_code(round_bf16(bf16_to_f32(wr[c]) / s))
        return bad


_NO_SCALES = np.empty(0, dtype=np.uint16)


def quantize_fp8_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quant.fp8.quantize_fp8_block` for a validated bf16 CPU weight; None when the reference must run."""
    *lead, rows, cols = w.shape
    n_br, n_bc = -(-rows // block), -(-cols // block)
    x = fc.bf16_bits(w).reshape(-1, rows, cols)
    n_mat = x.shape[0]
    q = np.empty((n_mat, rows, cols), dtype=np.uint8)
    scale_inv = np.empty((n_mat, n_br, n_bc), dtype=np.float32)
    if x.size and fc.run_chunks(_block_bands, n_mat * n_br, block * cols, x, block, q, scale_inv):
        return None
    if not x.size:
        return None  # empty weights: let the reference define the result
    return (torch.from_numpy(q).view(FP8_DTYPE).reshape(*lead, rows, cols),
            torch.from_numpy(scale_inv).reshape(*lead, n_br, n_bc))


def _channel(w: torch.Tensor, scale_in: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    rows2d = fc.bf16_bits(w).reshape(-1, w.shape[-1])
    if rows2d.size == 0:
        return None
    q = np.empty(rows2d.shape, dtype=np.uint8)
    scale = np.empty(rows2d.shape[0] if scale_in.size == 0 else 0, dtype=np.uint16)
    if scale_in.size:
        scale_in = np.broadcast_to(scale_in, (rows2d.shape[0],)).copy()
    if fc.run_chunks(_channel_rows, rows2d.shape[0], rows2d.shape[1], rows2d, scale_in, q, scale):
        return None
    return q, scale


def quantize_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quant.fp8.quantize_fp8_channel` for a validated bf16 CPU weight; None when the reference must run."""
    out = _channel(w, _NO_SCALES)
    if out is None:
        return None
    q, scale = out
    return (torch.from_numpy(q).view(FP8_DTYPE).reshape(w.shape),
            torch.from_numpy(scale).view(torch.bfloat16).reshape(*w.shape[:-1], 1))


def quantize_fp8_tensor(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """`quant.fp8.quantize_fp8_tensor` (one given scale) for a bf16 CPU weight; None when the reference must run."""
    if scale.numel() != 1 or scale.device.type != "cpu" or scale.dim() > w.dim():
        return None  # broadcasting a per-row or higher-rank scale: the reference handles the general case
    s = scale.detach().to(torch.bfloat16).reshape(1)
    out = _channel(w, s.view(torch.int16).numpy().view(np.uint16))
    if out is None:
        return None
    return torch.from_numpy(out[0]).view(FP8_DTYPE).reshape(w.shape)

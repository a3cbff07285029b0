"""GGUF Q8_0 from bf16 weights in one fused pass: the bytes of ggml's `quantize_row_q8_0_ref` and gguf-py's
`Q8_0.quantize_blocks` (what llama.cpp's converter writes), at disk speed.

Why not gguf-py: its numpy Q8_0 makes five float32 temporaries of the whole block array, ~50 Mparam/s per core;
ggml's scalar C reference (~130 Mparam/s per core here) needs the llama.cpp build, which BF16/F16/Q8_0 never did.

Per block of 32 values x (float32, exact from bf16): d = amax / 127 (float32), id = 1 / d (0 when d is 0),
q = roundf(x * id) -- C's roundf, halves away from zero, done in float64 where |x * id| + 0.5 is exact --, stored
as [float16(d) (round to nearest even, numpy's conversion), 32 x int8]. A block under ~1e-36 has an infinite 1/d
and codes 0 (what x86 makes of C's cast of inf/NaN, and gguf-py of its NaN); a block over 65504 x 127 has an
infinite float16 scale, as gguf-py writes it (ggml refuses such a row). tests/quant/test_fast_q8_0.py checks every
bf16 value and every rounding tie against gguf-py and ggml.
"""

from __future__ import annotations

import numpy as np
import torch

from quant import fast_common as fc

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK  # float16 scale + 32 int8

if fc.numba is not None:
    import numba

    from quant.fast_common import JIT, bf16_to_f32

    _MAG = np.uint16(0x7FFF)
    _EXP_ALL_ONES = np.uint16(0x7F80)
    _ZERO = np.float32(0.0)
    _ONE = np.float32(1.0)
    _Q_MAX = np.float32(127.0)

    @numba.njit(**JIT)
    def _rows(r0, r1, w, d, q):
        """Rows [r0, r1) of `w` (uint16 bf16 bits [R, C], C a multiple of 32): scales into `d` float32 [R, C/32],
        codes into `q` int8 [R, C]. Returns 1 when a row holds Inf/NaN (the caller refuses it)."""
        n_blocks = w.shape[1] // BLOCK
        for r in range(r0, r1):
            wr, qr = w[r], q[r]
            for b in range(n_blocks):
                m = np.uint16(0)
                for j in range(b * BLOCK, (b + 1) * BLOCK):
                    m = max(m, wr[j] & _MAG)
                if m >= _EXP_ALL_ONES:
                    return 1
                scale = bf16_to_f32(m) / _Q_MAX
                inv = _ONE / scale if scale != _ZERO else _ZERO
                if inv == np.inf:  # a scale below 2^-128: every product is +-inf or NaN, which C casts to 0
                    inv = _ZERO
                d[r, b] = scale
                for j in range(b * BLOCK, (b + 1) * BLOCK):
                    v = np.float64(bf16_to_f32(wr[j]) * inv)  # the float32 product, widened exactly
                    qr[j] = np.int8(np.floor(abs(v) + 0.5) * (1.0 if v >= 0 else -1.0))
        return 0


def quantize_q8_0(w: torch.Tensor) -> np.ndarray | None:
    """bf16 rows [R, C] (C a multiple of 32) -> Q8_0 bytes uint8 [R, C / 32 * 34]; None when the fast path does not
    apply (no numba, not bf16, a width that is not whole blocks): the caller quantizes another way. Raises
    ValueError on Inf/NaN."""
    if not fc.eligible(w) or w.dim() != 2 or w.shape[1] % BLOCK:
        return None
    bits = fc.bf16_bits(w)
    rows, cols = bits.shape
    d = np.empty((rows, cols // BLOCK), np.float32)
    q = np.empty((rows, cols), np.int8)
    if fc.run_chunks(_rows, rows, cols, bits, d, q):
        raise ValueError("contains NaN or Inf")
    out = np.empty((rows, cols // BLOCK, BLOCK_BYTES), np.uint8)
    with np.errstate(over="ignore"):  # scales over 65504 become inf, as in gguf-py
        out[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    out[:, :, 2:] = q.view(np.uint8).reshape(rows, -1, BLOCK)
    return out.reshape(rows, -1)

"""FP8 E4M3 weight quantization: per-128x128-block (native vLLM `fp8`) and per-output-channel
(compressed-tensors FP8_DYNAMIC).

Pure functions on tensors. Everything is shape-static (no `.item()`, no data-dependent
branches), so the same calls run on `meta` tensors to plan output shapes and dtypes.

The public quantizers dispatch bf16 CPU weights to fused numba kernels (quant/fast_fp8.py, bit-identical, 25-75x
faster than compressed-tensors' FP8_BLOCK path in bench/convert_real.py); the `*_reference` functions are the specification they are tested against, and run for every
other input (meta tensors, other dtypes, Inf/NaN, numba missing or STEPQ_FAST=0).
"""

import math

import torch
import torch.nn.functional as F

from quant import fast_common, fast_fp8
from quant.constants import FP8_BLOCK, FP8_DTYPE, FP8_E4M3_MAX

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to float8_e4m3fn: clamp to [-448, 448], then round to nearest, ties to even.

    Saturating: finite values beyond ±448 and ±inf become ±448 (never the NaN encoding);
    NaN stays NaN. Same as compressed-tensors' `round_to_quantized_type_args` for 8-bit floats
    (clamp to finfo(float8_e4m3fn) then `.to(float8_e4m3fn)`). Rounds once from x's dtype.
    """
    return torch.clamp(x, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


# Signed zeros: compressed-tensors adds its (symmetric, all-zero) zero point to w / scale before
# rounding, and -0.0 + 0.0 = +0.0. So a -0.0 weight is written as 0x00, while a negative weight
# that rounds to zero keeps its sign (0x80). The quantizers below add + 0.0 to match.


def _check_weight(w: torch.Tensor) -> None:
    if w.ndim < 2:
        raise ValueError(f"expected a weight [..., out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float16/bfloat16/float32/float64 weight, got {w.dtype}")


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_block_reference`, through the fused kernel when it applies (same bytes)."""
    _check_weight(w)
    if w.device.type == "meta" and block > 0:  # planning dry run: the reference's shapes without meta ops
        *lead, rows, cols = w.shape
        return (torch.empty(w.shape, dtype=FP8_DTYPE, device="meta"),
                torch.empty(*lead, math.ceil(rows / block), math.ceil(cols / block), dtype=torch.float32,
                            device="meta"))
    if fast_common.eligible(w) and w.numel() and block > 0:
        out = fast_fp8.quantize_fp8_block(w, block)
        if out is not None:
            return out
    return quantize_fp8_block_reference(w, block)


def quantize_fp8_block_reference(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [..., out, in]` to FP8 E4M3 with one scale per `block x block` tile.

    Returns `(q, scale_inv)`: `q` float8_e4m3fn shaped like `w`; `scale_inv` float32
    `[..., ceil(out/block), ceil(in/block)]` = block amax / 448, the DeepSeek-V3 / vLLM native
    `fp8` `weight_scale_inv` convention (dequant `W ≈ q * scale_inv` per tile).
    Computed in float32: `q = to_fp8(w / scale_inv)` (RNE, saturating at ±448). Edge tiles are
    zero-padded for the amax and truncated back. A -0.0 weight becomes +0 (as CT writes it).
    An all-zero tile gets `scale_inv = finfo(w.dtype).eps` (compressed-tensors' zero-scale
    replacement for a scale in the model dtype), so it dequantizes to exact zeros, never NaN.
    A 3-D `[E, out, in]` stack is batched.
    """
    _check_weight(w)
    *lead, rows, cols = w.shape
    n_br, n_bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = F.pad(w.to(torch.float32), (0, n_bc * block - cols, 0, n_br * block - rows))
    tiles = padded.reshape(*lead, n_br, block, n_bc, block)
    scale_inv = tiles.abs().amax(dim=(-3, -1)) / FP8_E4M3_MAX
    scale_inv = torch.where(scale_inv == 0, torch.finfo(w.dtype).eps, scale_inv)
    return _encode_tiles(tiles, scale_inv, rows, cols), scale_inv


def _encode_tiles(tiles: torch.Tensor, scale_inv: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *lead, n_br, block, n_bc, _ = tiles.shape
    q = to_fp8(tiles / scale_inv[..., :, None, :, None] + 0.0)  # + 0.0: signed zeros, see above
    return q.reshape(*lead, n_br * block, n_bc * block)[..., :rows, :cols].contiguous()


def encode_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 codes of `w` on given 128x128 block scales (GPTQ's weights, already on that grid), in float32 as
    `quantize_fp8_block_reference` divides."""
    _check_weight(w)
    *lead, rows, cols = w.shape
    n_br, n_bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = F.pad(w.to(torch.float32), (0, n_bc * block - cols, 0, n_br * block - rows))
    return _encode_tiles(padded.reshape(*lead, n_br, block, n_bc, block), scale_inv.to(torch.float32), rows, cols)


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8_block`: float32 `q * scale_inv` with each scale broadcast over its tile.

    One float32 rounding per element, the product compressed-tensors' FP8_BLOCK decompress forms.
    """
    *lead, rows, cols = q.shape
    n_br, n_bc = math.ceil(rows / block), math.ceil(cols / block)
    if tuple(scale_inv.shape[-2:]) != (n_br, n_bc):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match q {tuple(q.shape)} "
            f"with {block=} (expected [..., {n_br}, {n_bc}])"
        )
    s = scale_inv.to(torch.float32)[..., :, None, :, None]
    s = s.expand(*s.shape[:-3], block, n_bc, block).reshape(*s.shape[:-4], n_br * block, n_bc * block)
    return q.to(torch.float32) * s[..., :rows, :cols]


def quantize_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_channel_reference`, through the fused kernel when it applies (same bytes)."""
    _check_weight(w)
    if w.device.type == "meta":  # planning dry run: the reference's shapes without meta ops
        return (torch.empty(w.shape, dtype=FP8_DTYPE, device="meta"),
                torch.empty(*w.shape[:-1], 1, dtype=w.dtype, device="meta"))
    if fast_common.eligible(w) and w.numel():
        out = fast_fp8.quantize_fp8_channel(w)
        if out is not None:
            return out
    return quantize_fp8_channel_reference(w)


def quantize_fp8_channel_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [..., out, in]` to FP8 E4M3 with one scale per output row.

    Returns `(q, scale)`: `q` float8_e4m3fn shaped like `w`; `scale` `[..., out, 1]` in `w.dtype`
    (compressed-tensors stores FP8_DYNAMIC `weight_scale` in the model dtype).
    Bit-identical to compressed-tensors 0.19.0 FP8_DYNAMIC (`strategy: channel`, min-max
    observer): `scale = amax_row / 448` and `q = fp8(clamp(w / scale, ±448))`, both divisions
    rounded to `w.dtype` (so bf16 weights are rounded to bf16 before the RNE cast to FP8);
    a zero row gets `scale = finfo(w.dtype).eps` and a -0.0 weight becomes +0, as in CT.
    """
    _check_weight(w)
    scale = w.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    return to_fp8(w / scale + 0.0), scale  # + 0.0: signed zeros, see above


def encode_fp8_channel(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 codes of `w` on given per-row scales (GPTQ's weights, already on that grid); float32 division: the
    grid values divide back to their codes exactly."""
    _check_weight(w)
    return to_fp8(w.to(torch.float32) / scale.to(torch.float32) + 0.0)


def dequantize_fp8_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_fp8_channel`: float32 `q * scale`.

    Exact for a bf16 scale (4 x 8 significant bits); CT's decompress returns it rounded to bf16.
    """
    return q.to(torch.float32) * scale.to(torch.float32)


def fp8_tensor_scale(amax: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per-tensor FP8 scale `amax / 448` as `[1]` in `dtype` (compressed-tensors' FP8 preset stores weight and
    input scales in the model dtype); zero -> `finfo(dtype).eps`, as CT replaces zero scales."""
    scale = amax.to(dtype).reshape(1) / FP8_E4M3_MAX
    return torch.where(scale == 0, torch.finfo(dtype).eps, scale)


def quantize_fp8_tensor(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize_fp8_tensor_reference`, through the fused kernel when it applies (same bytes)."""
    _check_weight(w)
    if fast_common.eligible(w) and w.numel() and scale.device.type == "cpu":
        out = fast_fp8.quantize_fp8_tensor(w, scale)
        if out is not None:
            return out
    return quantize_fp8_tensor_reference(w, scale)


def quantize_fp8_tensor_reference(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 codes of `w` with one per-tensor `scale` (shared by a fused group).

    `w / scale` is rounded to `w.dtype` before the RNE cast, as compressed-tensors' FP8 (static) preset does;
    a -0.0 weight becomes +0.
    """
    _check_weight(w)
    return to_fp8(w / scale.to(w.dtype) + 0.0)  # + 0.0: signed zeros, see above


def dequantize_fp8_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)

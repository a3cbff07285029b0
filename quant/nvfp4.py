"""NVFP4 weight quantization (E2M1 codes, FP8 E4M3 per-16 group scales, float32 global scale)
in the compressed-tensors `nvfp4-pack-quantized` convention.

The operation order reproduces compressed-tensors 0.19.0 (`generate_gparam`,
`calculate_qparams`, `_quantize`, `cast_to_fp4`, `pack_fp4_to_uint8`) as driven by
llm-compressor's min-max weight observer, bit for bit on CPU. Pure functions on tensors;
shape-static, so the same calls run on `meta` tensors for planning.

`quantize_nvfp4`, `encode_nvfp4` and `shared_global_scale` dispatch bf16 CPU weights to the fused numba kernel in
quant/fast_nvfp4.py (bit-identical, ~100x faster than this torch code); the `*_reference` functions are the
specification it is tested against and run for every other input (meta tensors, other dtypes, Inf/NaN, numba
missing or STEPQ_FAST=0).
"""

import functools

import torch

from quant import fast_common, fast_nvfp4
from quant.constants import (
    FP4_E2M1_MAX,
    FP4_E2M1_VALUES,
    FP4_MAG_MASK,
    FP4_SIGN_BIT,
    FP4_THRESHOLDS_GE,
    FP4_THRESHOLDS_GT,
    FP8_DTYPE,
    FP8_E4M3_EPS,
    FP8_E4M3_MAX,
    NVFP4_GLOBAL_NUMERATOR,
    NVFP4_GROUP,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15: bit 3 sign, bits 0-2 magnitude index) of already-scaled values.

    Round to nearest, ties to the even code, saturating at ±6 — the same buckets as
    compressed-tensors' `cast_to_fp4` (|x| <= 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    2.5 -> 2, 3.5 -> 4, 5 -> 4, > 5 -> 6). Sign bit as CT's result carries it: set iff x < 0,
    so a negative value that rounds to zero gives code 0b1000 (-0) while -0.0 itself gives
    0b0000 (CT multiplies by `torch.sign(x)`, which is +0 for -0.0). NaN gives code 0.
    """
    a = x.abs()
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t in FP4_THRESHOLDS_GT:
        idx += a > t
    for t in FP4_THRESHOLDS_GE:
        idx += a >= t
    return idx | ((x < 0).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes `[..., n]` (n even, values 0..15) into uint8 `[..., n/2]`.

    Byte k = code[2k] | code[2k+1] << 4 (low nibble = even column), as CT `pack_fp4_to_uint8`
    and ModelOpt `weight` store them.
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"need an even number of columns to pack, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: uint8 `[..., m]` -> codes uint8 `[..., 2m]`."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 value of each E2M1 code (code 8 is -0.0, as in CT's `unpack_fp4_from_uint8`)."""
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & FP4_MAG_MASK).long()]
    return torch.where((codes & FP4_SIGN_BIT) != 0, -mag, mag)


def global_scale(amax: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NVFP4 global scale (a divisor): `448 * 6 / amax`, float32 `[1]` (or amax's shape if it has >1 element).

    Matches compressed-tensors 0.19.0 `generate_gparam` run, as the llm-compressor observer
    runs it, in the weight dtype `dtype`: amax clamped to `finfo(dtype).tiny`; `2688 / amax`
    evaluated the way torch evaluates `python_float / tensor` (`amax.reciprocal() * 2688`,
    each step rounded to `dtype`, so bf16 weights give a bf16-rounded gs); a NaN or infinite
    quotient (NaN amax, or amax so small it overflows, e.g. an all-zero tensor) -> 1.0.
    An infinite amax gives 0, as in CT. Elementwise, so `amax [E]` gives one gs per expert.
    """
    a = torch.clamp(amax.to(dtype), min=torch.finfo(dtype).tiny)
    gs = torch.reciprocal(a) * NVFP4_GLOBAL_NUMERATOR
    gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32)
    return gs.reshape(1) if gs.numel() == 1 else gs


def shared_global_scale(*tensors: torch.Tensor) -> torch.Tensor:
    """One global scale for a fused group (q/k/v, dense gate/up, an expert's gate/up): from the max amax.

    Each tensor is a weight `[..., out, in]`; amax is taken over its last two dims, so 2-D
    weights give one `[1]` scale and 3-D expert stacks `[E, out, in]` give one scale per
    expert `[E]` (shared across the tensors). vLLM's fused MoE keeps only w1's
    `w13_weight_global_scale[:, 0]`, so gate and up must be quantized with this same value.
    Rounded through the promoted weight dtype like `global_scale`; since rounding is monotonic
    this equals the min of the members' own global scales.
    """
    if not tensors:
        raise ValueError("shared_global_scale needs at least one tensor")
    for t in tensors:
        if t.ndim < 2:
            raise ValueError(f"expected weights [..., out, in], got shape {tuple(t.shape)}")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if all(t.device.type == "meta" for t in tensors):  # planning: the shape the math below gives, no meta ops
        lead = torch.broadcast_shapes(*(t.shape[:-2] for t in tensors))
        return torch.empty((1,) if lead.numel() == 1 else lead, dtype=torch.float32, device="meta")
    amaxes = [_absmax(t).to(torch.float32) for t in tensors]
    amax = torch.stack(torch.broadcast_tensors(*amaxes)).amax(dim=0)
    return global_scale(amax, dtype)


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """`t.abs().amax(dim=(-2, -1))`: one fused pass without the |t| temporary for bf16 CPU weights."""
    if fast_common.eligible(t) and t.numel():
        out = fast_nvfp4.absmax(t)
        if out is not None:
            return out
    return t.abs().amax(dim=(-2, -1))


def _gs_view(gs: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """gs as float32 broadcastable over `[*lead, out, groups]`: one value, or one per leading index."""
    gs = gs.to(torch.float32)
    if gs.numel() == 1:
        return gs.reshape((1,) * (len(lead) + 2))
    if gs.numel() != (n := torch.Size(lead).numel()):
        raise ValueError(
            f"global scale has {gs.numel()} elements; expected 1 or {n} (one per leading index of {tuple(lead)})"
        )
    return gs.reshape(*lead, 1, 1)


def _check_nvfp4_weight(w: torch.Tensor) -> None:
    if w.ndim < 2 or w.shape[-1] % NVFP4_GROUP:
        raise ValueError(
            f"NVFP4 needs a weight [..., out, in] with in divisible by {NVFP4_GROUP}, got {tuple(w.shape)}"
        )
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expected a float16/bfloat16/float32/float64 weight, got {w.dtype}")


def _fast_ok(w: torch.Tensor, gs: torch.Tensor) -> bool:
    return fast_common.eligible(w) and w.numel() > 0 and gs.device.type == "cpu" and gs.is_floating_point()


def quantize_nvfp4(w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_nvfp4_reference`, through the fused kernel when it applies (same bytes)."""
    _check_nvfp4_weight(w)
    _gs_view(gs, tuple(w.shape[:-2]))  # the reference's checks on gs, whichever path runs
    if w.device.type == "meta" and gs.device.type == "meta":  # planning dry run: shapes only (quantize.py plans
        *lead, rows, cols = w.shape  # every expert this way; torch's meta ops cost ~10 ms per call)
        return (torch.empty(*lead, rows, cols // 2, dtype=torch.uint8, device="meta"),
                torch.empty(*lead, rows, cols // NVFP4_GROUP, dtype=FP8_DTYPE, device="meta"))
    if _fast_ok(w, gs):
        out = fast_nvfp4.quantize_nvfp4(w, gs)
        if out is not None:
            return out
    return quantize_nvfp4_reference(w, gs)


def quantize_nvfp4_reference(w: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `w [..., out, in]` (in % 16 == 0) to NVFP4 with global scale `gs`.

    `gs` is float32 with 1 element or one per leading index (`[E]` for an `[E, out, in]`
    stack). Returns `(packed uint8 [..., out, in/2], scale float8_e4m3fn [..., out, in/16])`,
    CT's `weight_packed` / `weight_scale`. Operation order of compressed-tensors 0.19.0 on CPU:
      s    = amax_g / 6                  rounded to w.dtype (the observer works in it)
      s    = fp8(clamp(gs * s, ±448))    float32 product, RNE cast; 0 -> 0.125 (FP8 eps)
      x    = w / (s / gs)                float32; divide by the effective scale, not * gs/s
      code = fp4_codes(clamp(x, ±6))     RNE to E2M1, saturating
    Bit-identical to CT's `NVFP4PackedCompressor.compress` given llm-compressor's min-max scales.
    """
    _check_nvfp4_weight(w)
    gsv = _gs_view(gs, tuple(w.shape[:-2]))
    groups = w.unflatten(-1, (-1, NVFP4_GROUP))
    s = groups.abs().amax(dim=-1) / FP4_E2M1_MAX
    s = torch.clamp(gsv * s.to(torch.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).to(torch.float32)
    s = torch.where(s == 0, FP8_E4M3_EPS, s).to(FP8_DTYPE)
    return encode_nvfp4_reference(w, gs, s), s


def encode_nvfp4(w: torch.Tensor, gs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`encode_nvfp4_reference`, through the fused kernel when it applies (same bytes)."""
    if w.ndim >= 2 and w.shape[-1] % NVFP4_GROUP == 0 and _fast_ok(w, gs) and scale.device.type == "cpu":
        _gs_view(gs, tuple(w.shape[:-2]))
        out = fast_nvfp4.encode_nvfp4(w, gs, scale)
        if out is not None:
            return out
    return encode_nvfp4_reference(w, gs, scale)


def encode_nvfp4_reference(w: torch.Tensor, gs: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 codes of `w` for given FP8 group scales `scale [..., out, in/16]` and global scale `gs`:
    `fp4_codes(clamp(w / (scale / gs), +-6))` in float32, the order compressed-tensors uses."""
    gsv = _gs_view(gs, tuple(w.shape[:-2]))
    x = w.unflatten(-1, (-1, NVFP4_GROUP)).to(torch.float32) / (scale.to(torch.float32) / gsv)[..., None]
    return pack_fp4(fp4_codes(torch.clamp(x, -FP4_E2M1_MAX, FP4_E2M1_MAX)).flatten(-2))


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Float32 `e2m1[code] * (scale / gs)` per 16-group — the reference decoder of the formats doc §3.2.

    `scale / gs` is computed first in float32, then multiplied, the order CT's `_dequantize` uses;
    CT's `decompress` returns exactly this rounded to bf16 (the E2M1 values and FP8 scales are
    exact in bf16, so its bf16 casts of them change nothing).
    """
    codes = unpack_fp4(packed)
    if scale.shape[-1] * NVFP4_GROUP != codes.shape[-1]:
        raise ValueError(f"scale {tuple(scale.shape)} does not cover {codes.shape[-1]} columns of 16-groups")
    gsv = _gs_view(gs, tuple(codes.shape[:-2]))
    eff = scale.to(torch.float32) / gsv
    return (fp4_values(codes).unflatten(-1, (-1, NVFP4_GROUP)) * eff[..., None]).flatten(-2)

"""Activation fake-quantization: what an engine does to a linear layer's input before the quantized GEMM.

The eval stage applies these to the inputs of quantized linears and experts, so a W4A4 or W8A8 artifact is
measured with the activation error the engine adds, not as a weight-only model. Pure functions, float32 out.
Quantize-then-dequantize in one step: the same rounding as the weight path (quant.fp8 / quant.nvfp4), applied to
`x [..., in]` with groups along the last dimension.
"""

import torch

from quant.constants import FP8_E4M3_MAX
from quant.fp8 import to_fp8
from quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4

_TINY = 1e-12  # an all-zero row or group keeps a finite scale (and quantizes to zero)


def _fp8_dynamic(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = torch.clamp(amax.to(torch.float32) / FP8_E4M3_MAX, min=_TINY)
    return to_fp8(x.to(torch.float32) / scale).to(torch.float32) * scale


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors FP8_DYNAMIC input: one scale per token, `amax(row) / 448`."""
    return _fp8_dynamic(x, x.abs().amax(dim=-1, keepdim=True)).to(x.dtype)


def fp8_per_token_group(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """vLLM `fp8` with `weight_block_size` (DeepSeek-V3 / Step-3.5-FP8 layout): dynamic 1x128 groups per token."""
    g = x.unflatten(-1, (-1, group))
    return _fp8_dynamic(g, g.abs().amax(dim=-1, keepdim=True)).flatten(-2).to(x.dtype)


def fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors FP8 static: one calibrated per-tensor scale."""
    s = input_scale.to(torch.float32).reshape(())
    return (to_fp8(x.to(torch.float32) / s).to(torch.float32) * s).to(x.dtype)


def nvfp4(x: torch.Tensor, input_global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 W4A4 input: dynamic per-16 FP8 group scales under the calibrated global scale (a divisor,
    compressed-tensors' `input_global_scale`; ModelOpt stores its reciprocal `input_scale`)."""
    flat = x.reshape(-1, x.shape[-1])
    gs = input_global_scale.to(torch.float32).reshape(1)
    packed, scale = quantize_nvfp4(flat.to(torch.float32), gs)
    return dequantize_nvfp4(packed, scale, gs).reshape(x.shape).to(x.dtype)

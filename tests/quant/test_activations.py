"""Activation fake-quantization equals compressed-tensors' own dynamic-scale + fake_quantize path bit for bit."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

from quant import activations
from quant.constants import FP8_E4M3_MAX
from quant.fp8 import to_fp8
from quant.nvfp4 import global_scale


def _inputs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 256, generator=g) * torch.logspace(-3, 2, 256)  # channels spanning 5 decades
    x[0, 3] = 0  # an all-zero token
    x[1, 5, :16] = 0  # an all-zero 16-group
    return x


@pytest.mark.parametrize("seed", range(3))
def test_nvfp4_input_matches_compressed_tensors(seed):
    x = _inputs(seed)
    igs = global_scale(x.abs().amax() * 0.5, torch.float32)  # calibrated amax below the live one: saturation too
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            dynamic="local", scale_dtype=torch.float8_e4m3fn)
    flat = x.reshape(-1, x.shape[-1])
    scale, zp = compute_dynamic_scales_and_zp(flat, args, torch.nn.Linear(256, 4), global_scale=igs)
    expected = fake_quantize(flat, scale, zp, args, global_scale=igs).reshape(x.shape)
    assert torch.equal(activations.nvfp4(x, igs), expected)


@pytest.mark.parametrize("seed", range(3))
def test_fp8_per_token_matches_compressed_tensors(seed):
    x = _inputs(seed)
    args = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(256, 4))
    got = activations.fp8_per_token(x)
    assert torch.equal(got[x.abs().amax(-1) > 0], fake_quantize(x, scale, zp, args)[x.abs().amax(-1) > 0])
    assert torch.equal(got[0, 3], torch.zeros(256))  # CT divides by a zero scale there (NaN); we keep zeros


def test_fp8_static_matches_compressed_tensors():
    x = _inputs(0)
    scale = torch.tensor([x.abs().amax() / 448 * 0.25])  # a quarter of the range: clipped values too
    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    assert torch.equal(activations.fp8_static(x, scale), fake_quantize(x, scale, torch.zeros(1), args))


def test_fp8_token_group_is_per_128_columns():
    x = _inputs(1)
    got = activations.fp8_per_token_group(x, 128)
    for half in (slice(0, 128), slice(128, 256)):
        part = x[..., half]
        s = (part.abs().amax(-1, keepdim=True) / FP8_E4M3_MAX).clamp(min=1e-12)
        assert torch.equal(got[..., half], to_fp8(part / s).float() * s)
    assert torch.equal(activations.fp8_per_token_group(torch.zeros(3, 256)), torch.zeros(3, 256))

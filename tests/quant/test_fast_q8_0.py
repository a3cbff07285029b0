"""The fused Q8_0 kernel (quant/fast_q8_0.py) against gguf-py's Q8_0 (what llama.cpp's converter writes) and ggml's
own quantizer: every finite bf16 value, every rounding tie, random rows; Inf/NaN refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from convert import ggml_quants
from quant.fast_q8_0 import quantize_q8_0

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _all_finite_bf16(below: float = np.inf) -> torch.Tensor:
    """Every finite bf16 value under `below` in magnitude once (65280 of them by default), in blocks of 32, 8
    blocks per row (zero padded)."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    finite = bits[(bits & 0x7F80) != 0x7F80].astype(np.uint16)
    finite = finite[np.abs((finite.astype(np.uint32) << 16).view(np.float32)) < below]
    finite = np.concatenate([finite, np.zeros(-len(finite) % 256, np.uint16)])
    return torch.from_numpy(finite.view(np.int16)).view(torch.bfloat16).reshape(-1, 256)


def _ties() -> torch.Tensor:
    """Blocks whose scale is exactly 1 (amax 127), holding every k + 0.5 bf16 can represent, both signs: each
    product is a tie roundf breaks away from zero (numpy's round would go to even)."""
    halves = np.arange(0.5, 127.0, 1.0, dtype=np.float32)
    halves = halves[torch.from_numpy(halves).to(torch.bfloat16).float().numpy() == halves]
    vals = np.concatenate([halves, -halves])
    vals = np.concatenate([vals, np.zeros(-len(vals) % 31, np.float32)]).reshape(-1, 31)
    blocks = np.concatenate([np.full((len(vals), 1), 127.0, np.float32), vals], axis=1)  # amax 127 -> d = 1
    return torch.from_numpy(blocks.reshape(-1, 64) if len(blocks) % 2 == 0 else blocks.reshape(-1, 32)
                            ).to(torch.bfloat16)


def _random() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 4096, generator=g) * torch.logspace(-6, 2, 64).unsqueeze(1)
    w[3, :64] = 0  # all-zero blocks: d = 0, every code 0
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("make", [_all_finite_bf16, _ties, _random], ids=["every-bf16", "ties", "random"])
def test_equals_gguf_py(make):
    w = make()
    ours = quantize_q8_0(w)
    assert ours is not None
    with np.errstate(all="ignore"):  # gguf-py's own overflows on the extreme blocks
        ref = gguf.quants.quantize(w.float().numpy(), Q8_0)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def _every_bf16_ggml_writes() -> torch.Tensor:
    return _all_finite_bf16(below=65504 * 127)  # ggml refuses a row whose float16 scale overflows


@pytest.mark.parametrize("make", [_every_bf16_ggml_writes, _ties, _random], ids=["every-bf16", "ties", "random"])
def test_equals_ggml(llama_cpp, make):
    w = make()
    ref = ggml_quants.quantize(ggml_quants.ggml_type("Q8_0"), w.float().numpy())
    assert np.array_equal(quantize_q8_0(w), ref)


def test_nonfinite_is_refused_and_other_inputs_declined():
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[1, 40] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_q8_0(w)
    assert quantize_q8_0(torch.zeros(2, 48, dtype=torch.bfloat16)) is None  # not whole blocks
    assert quantize_q8_0(torch.zeros(2, 64)) is None  # float32: the caller's other path

"""The fused FP8 kernels (quant/fast_fp8.py) against the reference functions in quant/fp8.py, byte for byte.

Exhaustive where the domain is small: the E4M3 encoder against torch's own cast on every float32 whose high half is
any bf16 pattern and whose low half is one of the values next to a rounding boundary; every finite bf16 value as
an element of a block / a row under fixed scales (both roundings of the channel path) and as a block / row amax.
Random matrices with edge tiles, zero tiles and rows, huge and tiny values; non-finite input falls back.
"""

import numpy as np
import pytest
import torch

from quant import fast_common, fast_fp8, fp8
from quant.constants import FP8_DTYPE

@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """These tests are about the numba kernels: STEPQ_FAST=0 in the environment must not turn them into comparisons
    of the reference with itself. numba is a dependency, so its absence fails here rather than skipping."""
    monkeypatch.delenv("STEPQ_FAST", raising=False)
    assert fast_common.available(), "numba is not importable: the fast kernels cannot be tested"

ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
FINITE_BF16 = ALL_BF16[torch.isfinite(ALL_BF16)]


def _u8(t):
    return t.view(torch.uint8)


def assert_bytes(a, b, what="q"):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    x = a.view(torch.uint8) if a.dtype.itemsize == 1 else a.view({2: torch.int16, 4: torch.int32}[a.dtype.itemsize])
    y = b.view(torch.uint8) if b.dtype.itemsize == 1 else b.view({2: torch.int16, 4: torch.int32}[b.dtype.itemsize])
    diff = x != y
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} differ, first at {diff.nonzero()[:5].tolist()}"


def test_fp8_encoder_matches_torch_cast_on_every_rounding_neighbourhood():
    import numba

    @numba.njit
    def encode_all(x, out):
        for i in range(x.shape[0]):
            out[i] = fast_common.fp8_code(x[i])

    hi = torch.arange(0, 2**16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 2, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF])
    bits = (hi[:, None] | lows[None, :]).reshape(-1).to(torch.int64)
    x = torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))
    x = x[~torch.isnan(x)]
    out = np.empty(x.numel(), dtype=np.uint8)
    encode_all(x.numpy(), out)
    # + 0.0 as the quantizers add it: -0.0 becomes +0 (0x00); every other value is the plain saturating cast
    expected = _u8(torch.clamp(x + 0.0, -448.0, 448.0).to(FP8_DTYPE))
    bad = torch.from_numpy(out) != expected
    assert not bad.any(), [(x[i].item(), out[i], expected[i].item()) for i in bad.nonzero()[:5].flatten().tolist()]


def _rows_of(vals: torch.Tensor, lead: float, width: int) -> torch.Tensor:
    """Rows of `width`: each starts with `lead` (fixing the row's or tile's amax), then values from `vals`."""
    per = width - 1
    vals = torch.cat([vals, vals.new_zeros(-vals.numel() % per)]).reshape(-1, per)
    return torch.cat([torch.full((vals.shape[0], 1), lead, dtype=torch.bfloat16), vals], dim=1)


@pytest.mark.parametrize("amax", [448.0, 1.0, 3.0e38, 1e-3, 1e-38])
def test_channel_every_bf16_element_under_a_fixed_row_scale(amax):
    vals = FINITE_BF16[FINITE_BF16.float().abs() <= amax]
    w = _rows_of(vals, amax, 256)
    fast = fast_fp8.quantize_fp8_channel(w)
    ref = fp8.quantize_fp8_channel_reference(w)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale")


def test_channel_and_block_every_bf16_amax():
    amax = FINITE_BF16[FINITE_BF16 >= 0]
    rows = torch.zeros(amax.numel(), 16, dtype=torch.bfloat16)
    rows[:, 0], rows[:, 5], rows[:, 9] = amax, -amax, amax * 0.3
    fast, ref = fast_fp8.quantize_fp8_channel(rows), fp8.quantize_fp8_channel_reference(rows)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale")
    tiles = torch.cat([rows, rows.new_zeros(-rows.shape[0] % 4, 16)]).reshape(-1, 4, 16)  # one 4x16 tile each
    fast, ref = fast_fp8.quantize_fp8_block(tiles, 16), fp8.quantize_fp8_block_reference(tiles, 16)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale_inv")


@pytest.mark.parametrize("amax", [448.0, 1.0, 3.0e38, 1e-3, 1e-38])
def test_block_every_bf16_element_under_a_fixed_tile_scale(amax):
    vals = FINITE_BF16[FINITE_BF16.float().abs() <= amax]
    w = _rows_of(vals, amax, 128)  # each 128-row band's tiles hold `amax`
    w = torch.cat([w, w.new_zeros(-w.shape[0] % 128, 128)])
    fast, ref = fast_fp8.quantize_fp8_block(w, 128), fp8.quantize_fp8_block_reference(w, 128)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale_inv")


def _awkward(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g).mul(8).exp2() * 0.01
    flat = w.view(-1)
    n = flat.numel()
    for value in (3e38, 1e-39, -0.0, -1e-30):
        flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] = value
    w = w.to(torch.bfloat16)
    if shape[-2] > 1:
        w[..., 1, :] = 0
    if shape[-2] > 130 and shape[-1] > 130:
        w[..., 128:256, :128] = 0  # an all-zero tile
    return w


SHAPES = [(1280, 4096), (4096, 1280), (300, 200), (3, 130, 260), (2, 5, 7), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_block_random(shape):
    w = _awkward(shape, seed=sum(shape))
    fast, ref = fast_fp8.quantize_fp8_block(w, 128), fp8.quantize_fp8_block_reference(w, 128)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale_inv")


@pytest.mark.parametrize("block", [16, 64, 100])
def test_block_other_block_sizes(block):
    w = _awkward((3, 130, 260), seed=block)
    fast, ref = fast_fp8.quantize_fp8_block(w, block), fp8.quantize_fp8_block_reference(w, block)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale_inv")


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_random(shape):
    w = _awkward(shape, seed=sum(shape) + 1)
    fast, ref = fast_fp8.quantize_fp8_channel(w), fp8.quantize_fp8_channel_reference(w)
    assert_bytes(fast[0], ref[0])
    assert_bytes(fast[1], ref[1], "scale")


@pytest.mark.parametrize("scale", [1.0, 0.0078125, 2.5e-4, 3e30])
def test_tensor_scale_random(scale):
    w = _awkward((3, 130, 260), seed=5)
    for s in (torch.tensor([scale], dtype=torch.bfloat16), torch.tensor(scale), torch.tensor([scale])):
        assert_bytes(fast_fp8.quantize_fp8_tensor(w, s), fp8.quantize_fp8_tensor_reference(w, s))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_falls_back(bad):
    w = _awkward((64, 300), seed=9)
    w[3, 7] = bad
    assert fast_fp8.quantize_fp8_block(w, 128) is None
    assert fast_fp8.quantize_fp8_channel(w) is None
    for fast, ref in ((fp8.quantize_fp8_block(w), fp8.quantize_fp8_block_reference(w)),
                      (fp8.quantize_fp8_channel(w), fp8.quantize_fp8_channel_reference(w))):
        assert_bytes(fast[0], ref[0])
        assert_bytes(fast[1], ref[1], "scale")


def test_public_functions_dispatch(monkeypatch):
    seen = []
    for name in ("quantize_fp8_block", "quantize_fp8_channel", "quantize_fp8_tensor"):
        real = getattr(fast_fp8, name)
        monkeypatch.setattr(fast_fp8, name, lambda *a, _r=real, _n=name: seen.append(_n) or _r(*a))
    w = _awkward((64, 256), seed=10)
    fp8.quantize_fp8_block(w), fp8.quantize_fp8_channel(w), fp8.quantize_fp8_tensor(w, torch.tensor([0.5]))
    assert seen == ["quantize_fp8_block", "quantize_fp8_channel", "quantize_fp8_tensor"]
    fp8.quantize_fp8_block(w.half()), fp8.quantize_fp8_channel(w.to("meta"))
    assert len(seen) == 3


def test_chunked_threads_give_the_same_bytes(monkeypatch):
    w = _awkward((4, 1024, 512), seed=11)
    monkeypatch.setenv("STEPQ_THREADS", "1")
    one = fast_fp8.quantize_fp8_block(w, 128), fast_fp8.quantize_fp8_channel(w)
    monkeypatch.setenv("STEPQ_THREADS", "3")
    many = fast_fp8.quantize_fp8_block(w, 128), fast_fp8.quantize_fp8_channel(w)
    for a, b in zip(one, many):
        assert_bytes(a[0], b[0])
        assert_bytes(a[1], b[1], "scale")


@pytest.mark.parametrize("shape", [(1280, 4096), (300, 200), (3, 130, 260), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_meta_shortcuts_give_the_reference_shapes(shape, dtype):
    w = torch.empty(shape, dtype=dtype, device="meta")
    for fast, ref in ((fp8.quantize_fp8_block(w), fp8.quantize_fp8_block_reference(w)),
                      (fp8.quantize_fp8_block(w, 64), fp8.quantize_fp8_block_reference(w, 64)),
                      (fp8.quantize_fp8_channel(w), fp8.quantize_fp8_channel_reference(w))):
        for a, b in zip(fast, ref):
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)

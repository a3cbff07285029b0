"""NVFP4: E2M1 code table and rounding (every tie, both signs, -0.0, saturation), nibble packing
pinned with binary literals, global scales, and quantize/dequantize properties."""

import math

import pytest
import torch

from quant.constants import FP4_E2M1_VALUES, FP8_DTYPE, NVFP4_GROUP
from quant.nvfp4 import (
    dequantize_nvfp4,
    fp4_codes,
    fp4_values,
    global_scale,
    pack_fp4,
    quantize_nvfp4,
    shared_global_scale,
    unpack_fp4,
)

ALL_CODES = torch.arange(16, dtype=torch.uint8)


def _e2m1_decode(code: int) -> float:
    """E2M1 value from the bit layout: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 0b1
    if exp == 0:
        return sign * man * 0.5  # subnormal: 0 or 0.5
    return sign * (1 + man / 2) * 2.0 ** (exp - 1)


def _signed(values: torch.Tensor) -> list[tuple[float, bool]]:
    return [(v, math.copysign(1, v) < 0) for v in values.tolist()]


def test_code_table_matches_bit_layout():
    ref = [_e2m1_decode(c) for c in range(16)]
    assert list(FP4_E2M1_VALUES) == ref[:8]
    got = fp4_values(ALL_CODES)
    assert got.dtype == torch.float32
    assert _signed(got) == [(v, math.copysign(1, v) < 0) for v in ref]
    assert got[8].item() == 0.0 and torch.signbit(got[8])  # code 0b1000 is -0.0


def test_every_value_maps_to_its_own_code():
    values = fp4_values(ALL_CODES)
    codes = fp4_codes(values)
    expected = ALL_CODES.clone()
    expected[8] = 0  # -0.0 has no sign bit after rounding (CT: x * torch.sign(x), sign(-0.0) = +0)
    assert torch.equal(codes, expected)


TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("x,expected", TIES)
def test_ties_round_to_even_code_both_signs(x, expected):
    codes = fp4_codes(torch.tensor([x, -x]))
    idx = FP4_E2M1_VALUES.index(expected)
    assert idx % 2 == 0  # "even" = magnitude index with mantissa bit 0
    assert codes.tolist() == [idx, idx | 0b1000]


@pytest.mark.parametrize("lo,hi", list(zip(FP4_E2M1_VALUES, FP4_E2M1_VALUES[1:])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_just_below_and_above_each_threshold(lo, hi, dtype):
    mid = torch.tensor((lo + hi) / 2, dtype=dtype)
    below = torch.nextafter(mid, torch.tensor(-math.inf, dtype=dtype))
    above = torch.nextafter(mid, torch.tensor(math.inf, dtype=dtype))
    x = torch.stack([below, above, -below, -above])
    i_lo, i_hi = FP4_E2M1_VALUES.index(lo), FP4_E2M1_VALUES.index(hi)
    assert fp4_codes(x).tolist() == [i_lo, i_hi, i_lo | 8, i_hi | 8]


def test_saturation_above_six():
    x = torch.tensor([6.0, 6.5, 100.0, 3e38, math.inf])
    assert fp4_codes(x).tolist() == [0b0111] * 5
    assert fp4_codes(-x).tolist() == [0b1111] * 5


def test_negative_zero_and_tiny_negatives():
    # CT rounds |x| and multiplies by torch.sign(x): -0.0 -> +0 (code 0), while a negative that
    # rounds to zero becomes -0.0 (code 8). The sign bit is therefore (x < 0).
    x = torch.tensor([-0.0, 0.0, -1e-30, -0.1, -0.25, 1e-30, 0.25])
    assert fp4_codes(x).tolist() == [0b0000, 0b0000, 0b1000, 0b1000, 0b1000, 0b0000, 0b0000]
    assert fp4_codes(torch.tensor([-0.0], dtype=torch.bfloat16)).tolist() == [0]


def test_rounding_matches_nearest_search_on_dense_grid():
    # Second implementation: nearest E2M1 magnitude by argmin, ties to the even index.
    grid = torch.cat([torch.arange(-7 * 512, 7 * 512 + 1) / 512.0, torch.randn(20000) * 3])
    mags = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float64)
    dist = (grid.abs().to(torch.float64).clamp(max=6.0)[:, None] - mags[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cands = dist == best
    # among tied candidates pick the even index (exactly one is even for adjacent pairs)
    even = cands & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(1), even.float().argmax(1), cands.float().argmax(1))
    expected = idx.to(torch.uint8) | ((grid < 0).to(torch.uint8) << 3)
    got = fp4_codes(grid)
    bad = (got != expected).nonzero().flatten()
    assert bad.numel() == 0, [(grid[i].item(), got[i].item(), expected[i].item()) for i in bad[:10]]


# ---------------------------------------------------------------- packing


def test_pack_pinned_with_binary_literals():
    # byte = high:low = code[2k+1]:code[2k]
    assert pack_fp4(torch.tensor([0b0110, 0b1000], dtype=torch.uint8)).tolist() == [0b1000_0110]
    assert pack_fp4(torch.tensor([[0b0001, 0b0010, 0b1111, 0b0000]], dtype=torch.uint8)).tolist() == [
        [0b0010_0001, 0b0000_1111]
    ]
    assert unpack_fp4(torch.tensor([0b1000_0110], dtype=torch.uint8)).tolist() == [0b0110, 0b1000]


def test_unpack_pack_round_trip_all_bytes_and_all_pairs():
    all_bytes = torch.arange(256, dtype=torch.uint8)
    codes = unpack_fp4(all_bytes)
    assert codes.shape == (512,) and codes.max() <= 15
    assert torch.equal(pack_fp4(codes), all_bytes)
    pairs = torch.cartesian_prod(ALL_CODES, ALL_CODES).to(torch.uint8)  # [256, 2] every (low, high)
    assert torch.equal(unpack_fp4(pack_fp4(pairs)), pairs)
    assert torch.equal(pack_fp4(pairs).flatten(), (pairs[:, 0] | pairs[:, 1] << 4))


def test_pack_rejects_odd_columns_and_keeps_leading_dims():
    with pytest.raises(ValueError):
        pack_fp4(torch.zeros(2, 3, dtype=torch.uint8))
    c = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    assert pack_fp4(c).shape == (3, 5, 4) and torch.equal(unpack_fp4(pack_fp4(c)), c)


# ---------------------------------------------------------------- global scale


def test_global_scale_known_values():
    # amax 5: torch evaluates CT's `2688.0 / amax` as reciprocal(amax) * 2688, both in bf16:
    # bf16(1/5) = 0.2001953125, * 2688 = 538.125 -> bf16 540 (true division would give 536).
    assert global_scale(torch.tensor(5.0)).tolist() == [540.0]
    assert global_scale(torch.tensor(5.0), dtype=torch.float32).item() == pytest.approx(537.6, rel=1e-6)
    # formats doc §3.2: q/k/v measured gs = 9216.0 where exact 2688/amax is 9236.6
    amax = torch.tensor(0.291015625)  # exact in bf16; 2688 / amax = 9236.56
    assert global_scale(amax).tolist() == [9216.0]
    assert global_scale(torch.tensor(1.0)).tolist() == [2688.0]
    gs = global_scale(amax)
    assert gs.dtype == torch.float32 and gs.shape == (1,)


def test_global_scale_degenerate_amax():
    for bad in (0.0, 1e-39, math.nan):
        assert global_scale(torch.tensor(bad)).tolist() == [1.0], bad
    assert global_scale(torch.tensor(0.0), dtype=torch.float32).tolist() == [1.0]


def test_global_scale_is_bf16_rounded_and_close_to_exact():
    torch.manual_seed(0)
    amax = (torch.rand(2000) * 20 + 1e-3).to(torch.bfloat16)
    gs = global_scale(amax)
    assert gs.shape == (2000,) and gs.dtype == torch.float32
    assert torch.equal(gs.to(torch.bfloat16).to(torch.float32), gs)  # representable in bf16
    exact = 2688.0 / amax.double()
    assert ((gs.double() - exact).abs() / exact).max() < 2 * 2.0**-8  # two bf16 roundings


def test_shared_global_scale_uses_max_amax():
    torch.manual_seed(1)
    gate = torch.randn(64, 32, dtype=torch.bfloat16)
    up = torch.randn(64, 32, dtype=torch.bfloat16) * 3
    up[5, 7] = 11.0
    gs = shared_global_scale(gate, up)
    assert torch.equal(gs, global_scale(torch.tensor(11.0)))
    assert torch.equal(gs, torch.minimum(shared_global_scale(gate), shared_global_scale(up)))
    assert gs.item() == 244.0  # bf16(1/11) = 0.0908203125; * 2688 = 244.125 -> bf16 244
    assert gs.item() != 2688.0 / 11.0
    # q/k/v: three members
    assert torch.equal(shared_global_scale(gate, up, gate * 0.5), gs)


def test_shared_global_scale_per_expert_for_stacks():
    torch.manual_seed(2)
    gate = torch.randn(4, 32, 48, dtype=torch.bfloat16)
    up = torch.randn(4, 32, 48, dtype=torch.bfloat16)
    gate[1, 0, 0], up[2, 3, 3] = 20.0, -30.0
    gs = shared_global_scale(gate, up)
    assert gs.shape == (4,)
    for e in range(4):
        assert torch.equal(gs[e : e + 1], shared_global_scale(gate[e], up[e]))
    assert gs[1].item() == global_scale(torch.tensor(20.0)).item()
    assert gs[2].item() == global_scale(torch.tensor(30.0)).item()
    with pytest.raises(ValueError):
        shared_global_scale()


# ---------------------------------------------------------------- quantize / dequantize


def _reference_decoder(packed, scale, gs):
    """formats doc §3.2 reference decoder, written independently of quant.nvfp4."""
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)
    sign = torch.where(codes & 8 > 0, -1.0, 1.0)
    vals = (e2m1[(codes & 7).long()] * sign).bfloat16().float()
    return vals * (scale.bfloat16().float() / gs).repeat_interleave(16, 1)


def _sqnr_db(ref, approx):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


def test_quantize_shapes_dtypes_and_reference_decoder():
    torch.manual_seed(3)
    w = torch.randn(96, 256, dtype=torch.bfloat16)
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 128)
    assert scale.dtype == FP8_DTYPE and scale.shape == (96, 16)
    dq = dequantize_nvfp4(packed, scale, gs)
    assert dq.dtype == torch.float32 and dq.shape == w.shape
    assert torch.equal(dq, _reference_decoder(packed, scale, gs))


def test_quantize_matches_formula_written_out():
    # Second implementation, element by element for a few groups, from the formats doc §3.2.
    torch.manual_seed(4)
    w = torch.randn(4, 64, dtype=torch.bfloat16) * 2
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    codes = unpack_fp4(packed)
    g = gs.item()
    for r in range(4):
        for k in range(4):
            grp = w[r, 16 * k : 16 * (k + 1)]
            s_unscaled = grp.abs().max() / 6  # bf16, as the observer computes it
            s = torch.tensor(g * s_unscaled.float().item()).clamp(-448, 448).to(FP8_DTYPE).float().item()
            s = s or 0.125
            assert scale[r, k].float().item() == s
            eff = torch.tensor(s, dtype=torch.float32) / torch.tensor(g, dtype=torch.float32)
            for j in range(16):
                x = min(max((grp[j].float() / eff).item(), -6.0), 6.0)
                mag = min(range(8), key=lambda i: (abs(abs(x) - FP4_E2M1_VALUES[i]), i % 2))
                assert codes[r, 16 * k + j].item() == mag | (8 if x < 0 else 0), (r, k, j, x)


def test_all_zero_tensor_rows_and_groups():
    z = torch.zeros(8, 64, dtype=torch.bfloat16)
    gs = shared_global_scale(z)
    assert gs.tolist() == [1.0]
    packed, scale = quantize_nvfp4(z, gs)
    assert (packed == 0).all() and (scale.float() == 0.125).all()
    assert (dequantize_nvfp4(packed, scale, gs) == 0).all()

    torch.manual_seed(5)
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    w[2] = 0  # zero row
    w[5, 16:32] = 0  # zero group
    w[6, 32:48] = -0.0  # negative-zero group
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    dq = dequantize_nvfp4(packed, scale, gs)
    assert not torch.isnan(dq).any()
    assert (scale[2].float() == 0.125).all() and scale[5, 1].float() == 0.125 and scale[6, 2].float() == 0.125
    assert (dq[2] == 0).all() and (dq[5, 16:32] == 0).all() and (dq[6, 32:48] == 0).all()
    assert (unpack_fp4(packed)[6, 32:48] == 0).all()  # -0.0 weights give code 0, not 8
    assert (scale.float() > 0.125).sum() == 8 * 4 - 6  # every other group has a real scale


def test_group_max_maps_to_six_and_scales_bounded():
    torch.manual_seed(6)
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    mags = (unpack_fp4(packed) & 7).reshape(64, 16, 16)
    assert (mags.amax(-1) == 7).all()  # every group's largest element is ±6
    assert scale.float().max() <= 448.0 and not torch.isnan(scale.float()).any()


@pytest.mark.parametrize("shape", [(256, 512), (3, 96, 256)])
def test_reconstruction_sqnr_floor(shape):
    torch.manual_seed(7)
    w = torch.randn(shape, dtype=torch.bfloat16)
    w.view(-1)[::997] *= 8  # outliers
    gs = shared_global_scale(w)
    dq = dequantize_nvfp4(*quantize_nvfp4(w, gs), gs)
    sqnr = _sqnr_db(w.float(), dq)
    assert sqnr > 18.0, sqnr


def test_idempotent_when_global_scale_is_kept():
    torch.manual_seed(8)
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    w[3] = 0
    w[9, :16] = 0
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    dq = dequantize_nvfp4(packed, scale, gs)
    codes = unpack_fp4(packed)
    assert (codes == 0b1000).any()  # small negatives rounded to -0 exist in this data
    for again in (dq, dq.to(torch.bfloat16)):  # float32, and as CT's decompress returns it
        p2, s2 = quantize_nvfp4(again, gs)
        assert torch.equal(s2.view(torch.uint8), scale.view(torch.uint8))
        # Same codes except -0 (0b1000): it decodes to -0.0, which CT's rounding maps to +0.
        assert torch.equal(unpack_fp4(p2), torch.where(codes == 0b1000, 0, codes))
        assert torch.equal(dequantize_nvfp4(p2, s2, gs), dq)  # equal values (-0.0 == 0.0)
        assert torch.equal(quantize_nvfp4(dequantize_nvfp4(p2, s2, gs), gs)[0], p2)  # a fixed point


def test_stack_equals_per_expert_with_per_expert_gs():
    torch.manual_seed(9)
    w = torch.randn(3, 48, 64, dtype=torch.bfloat16)
    w[1] *= 10
    gs = shared_global_scale(w)  # [3]
    packed, scale = quantize_nvfp4(w, gs)
    assert packed.shape == (3, 48, 32) and scale.shape == (3, 48, 4)
    dq = dequantize_nvfp4(packed, scale, gs)
    for e in range(3):
        pe, se = quantize_nvfp4(w[e], gs[e : e + 1])
        assert torch.equal(packed[e], pe) and torch.equal(scale[e].view(torch.uint8), se.view(torch.uint8))
        assert torch.equal(dq[e], dequantize_nvfp4(pe, se, gs[e : e + 1]))
    # one shared scalar gs also broadcasts over the stack
    p1, _ = quantize_nvfp4(w, gs[:1])
    assert torch.equal(p1[0], packed[0])


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize_nvfp4(torch.randn(4, 24), torch.ones(1))
    with pytest.raises(ValueError, match="global scale"):
        quantize_nvfp4(torch.randn(3, 4, 16), torch.ones(2))
    with pytest.raises(TypeError):
        quantize_nvfp4(torch.ones(4, 16, dtype=torch.int32), torch.ones(1))
    p, s = quantize_nvfp4(torch.randn(4, 32), torch.ones(1))
    with pytest.raises(ValueError):
        dequantize_nvfp4(p, s[:, :1], torch.ones(1))


# ---------------------------------------------------------------- meta planning


@pytest.mark.parametrize("shape", [(96, 256), (3, 48, 64)])
def test_meta_planning_matches_real_run(shape):
    real = torch.randn(shape, dtype=torch.bfloat16)
    meta = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    gs_r, gs_m = shared_global_scale(real, real), shared_global_scale(meta, meta)
    assert gs_m.device.type == "meta" and (gs_m.shape, gs_m.dtype) == (gs_r.shape, gs_r.dtype)
    assert global_scale(meta.abs().amax()).shape == global_scale(real.abs().amax()).shape
    out_r, out_m = quantize_nvfp4(real, gs_r), quantize_nvfp4(meta, gs_m)
    for r, m in zip(out_r, out_m):
        assert m.device.type == "meta" and (m.shape, m.dtype) == (r.shape, r.dtype)
    dq_r, dq_m = dequantize_nvfp4(*out_r, gs_r), dequantize_nvfp4(*out_m, gs_m)
    assert (dq_m.shape, dq_m.dtype) == (dq_r.shape, dq_r.dtype)
    assert fp4_codes(meta).dtype == torch.uint8 and unpack_fp4(out_m[0]).shape == shape
    assert NVFP4_GROUP * out_m[1].shape[-1] == shape[-1]

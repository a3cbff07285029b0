"""FP8 E4M3: exhaustive cast tests over all 256 bit patterns, and the block / channel quantizers
against loop-based reference implementations written from the format's definition."""

import math

import pytest
import torch

from quant.constants import FP8_BLOCK, FP8_DTYPE, FP8_E4M3_MAX
from quant.fp8 import (
    dequantize_fp8_block,
    dequantize_fp8_channel,
    quantize_fp8_block,
    quantize_fp8_channel,
    to_fp8,
)

ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def _e4m3_decode(byte: int) -> float:
    """E4M3FN value of a bit pattern, from the definition: bias 7, subnormals, S.1111.111 = NaN, no inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def _finite_bytes() -> list[int]:
    return [b for b in range(256) if not math.isnan(_e4m3_decode(b))]


def test_oracle_agrees_with_torch_float8_decoding():
    # The spec oracle is itself checked against torch's own view of every pattern.
    torch_vals = ALL_BYTES.view(FP8_DTYPE).to(torch.float64)
    for b in range(256):
        ref = _e4m3_decode(b)
        got = torch_vals[b].item()
        if math.isnan(ref):
            assert math.isnan(got), b
        else:
            assert got == ref and math.copysign(1, got) == math.copysign(1, ref), (b, got, ref)
    assert len(_finite_bytes()) == 254  # only 0x7F and 0xFF are NaN
    assert max(_e4m3_decode(b) for b in _finite_bytes()) == FP8_E4M3_MAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_finite_value_round_trips_exactly(dtype):
    finite = torch.tensor(_finite_bytes(), dtype=torch.uint8)
    values = finite.view(FP8_DTYPE).to(dtype)  # every E4M3 value is exact in bf16 and fp32
    assert torch.equal(_bytes(to_fp8(values)), finite)  # includes -0.0 -> 0x80


def _positive_values() -> list[float]:
    return sorted({_e4m3_decode(b) for b in _finite_bytes() if _e4m3_decode(b) >= 0})


def test_midpoints_round_to_even_mantissa_both_signs():
    vals = _positive_values()
    for lo, hi in zip(vals, vals[1:]):
        mid = (lo + hi) / 2  # exact in float32 (E4M3 has 4 significant bits)
        lo_b, hi_b = _bytes(to_fp8(torch.tensor([lo, hi]))).tolist()
        even = lo if lo_b % 2 == 0 else hi
        assert (lo_b % 2) != (hi_b % 2), (lo, hi)
        x = torch.tensor([mid, -mid], dtype=torch.float32)
        got = to_fp8(x).to(torch.float64).tolist()
        assert got == [even, -even], (lo, hi, mid, got)
        # one float32 ulp either side of the tie goes to the nearer neighbour
        below = torch.nextafter(torch.tensor(mid), torch.tensor(-math.inf))
        above = torch.nextafter(torch.tensor(mid), torch.tensor(math.inf))
        assert to_fp8(below).item() == lo and to_fp8(above).item() == hi, (lo, hi)
        assert to_fp8(-below).item() == -lo and to_fp8(-above).item() == -hi, (lo, hi)


def test_values_beyond_max_saturate_not_nan():
    big = torch.tensor([448.0, 448.5, 464.0, 480.0, 1e4, 3e38, math.inf])
    assert to_fp8(big).to(torch.float32).tolist() == [448.0] * 7
    assert to_fp8(-big).to(torch.float32).tolist() == [-448.0] * 7
    assert not torch.isnan(to_fp8(big).to(torch.float32)).any()
    assert torch.isnan(to_fp8(torch.tensor([math.nan])).to(torch.float32)).all()  # NaN is not hidden
    assert to_fp8(torch.tensor([1e4], dtype=torch.bfloat16)).item() == 448.0


def test_tiny_values_round_to_zero_or_smallest_subnormal():
    smallest = 2.0**-9  # 0x01
    x = torch.tensor([smallest / 2, smallest / 2 * 1.01, -smallest / 2, smallest * 0.49])
    assert _bytes(to_fp8(x)).tolist() == [0x00, 0x01, 0x80, 0x00]


# ---------------------------------------------------------------- block quantizer


def _ref_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over tiles of one 2-D matrix: amax/448 scale, q = fp8(w / scale)."""
    rows, cols = w.shape
    nbr, nbc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nbr, nbc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE)
    wf = w.float()
    for i in range(nbr):
        for j in range(nbc):
            tile = wf[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max() / 448.0
            if s == 0:
                s = torch.tensor(torch.finfo(w.dtype).eps)
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = to_fp8(tile / s + 0.0)
    return q, scale


@pytest.mark.parametrize("shape", [(300, 200), (3, 257, 130), (128, 128), (1, 5), (129, 127)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_matches_tile_loop_reference(shape, dtype):
    torch.manual_seed(1)
    w = (torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 3).to(dtype)
    q, s = quantize_fp8_block(w)
    nbr, nbc = -(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == shape[:-2] + (nbr, nbc)
    mats = w.reshape(-1, *shape[-2:])
    qs, ss = q.reshape(-1, *shape[-2:]), s.reshape(-1, nbr, nbc)
    for k in range(mats.shape[0]):
        rq, rs = _ref_block(mats[k], FP8_BLOCK)
        assert torch.equal(ss[k], rs)
        assert torch.equal(_bytes(qs[k]), _bytes(rq))


def test_block_scale_is_blockwise_amax_over_448_and_amax_hits_448():
    torch.manual_seed(2)
    w = torch.randn(300, 200)
    q, s = quantize_fp8_block(w)
    assert torch.equal(s[2, 1], w[256:, 128:].abs().max() / 448.0)  # partial corner tile
    assert torch.equal(s[0, 0], w[:128, :128].abs().max() / 448.0)
    qf = q.float()
    for i, j in [(0, 0), (2, 1), (1, 1)]:
        assert qf[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().max() == 448.0


def test_block_all_zero_blocks_and_tensor():
    torch.manual_seed(3)
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    w[:128, :128] = 0  # a full zero tile
    w[256:, 128:] = 0  # the partial corner tile
    q, s = quantize_fp8_block(w)
    eps = torch.finfo(torch.bfloat16).eps
    assert s[0, 0] == eps and s[2, 1] == eps and (s[1] > eps).all()
    dq = dequantize_fp8_block(q, s)
    assert not torch.isnan(dq).any()
    assert (dq[:128, :128] == 0).all() and (dq[256:, 128:] == 0).all()
    z = torch.zeros(3, 130, 257)
    qz, sz = quantize_fp8_block(z)
    assert (sz == torch.finfo(torch.float32).eps).all()
    assert (_bytes(qz) == 0).all() and (dequantize_fp8_block(qz, sz) == 0).all()


@pytest.mark.parametrize("fn", [quantize_fp8_block, quantize_fp8_channel])
def test_negative_zero_weight_becomes_positive_zero(fn):
    # CT adds its all-zero zero point before the cast: -0.0 -> 0x00; a negative that rounds to
    # zero (here -1e-6 against amax 448 -> scale 1) stays -0 (0x80), as does to_fp8 itself.
    w = torch.tensor([[448.0, -0.0, -1e-6, 0.0]])
    q, _ = fn(w)
    assert _bytes(q).tolist() == [[0x7E, 0x00, 0x80, 0x00]]
    assert _bytes(to_fp8(torch.tensor([-0.0]))).tolist() == [0x80]


def test_block_negation_symmetry():
    torch.manual_seed(4)
    w = torch.randn(257, 130)
    q, s = quantize_fp8_block(w)
    qn, sn = quantize_fp8_block(-w)
    assert torch.equal(s, sn)
    assert torch.equal(_bytes(qn), _bytes(q) ^ 0x80)  # only the sign bit flips
    assert (q.float()[w < 0] <= 0).all() and (q.float()[w > 0] >= 0).all()


@pytest.mark.parametrize("shape", [(300, 200), (3, 257, 130), (512, 1024)])
def test_block_reconstruction_error(shape):
    torch.manual_seed(5)
    w = torch.randn(shape)
    q, s = quantize_fp8_block(w)
    dq = dequantize_fp8_block(q, s)
    assert dq.dtype == torch.float32 and dq.shape == w.shape
    rel = ((dq - w).norm() / w.norm()).item()
    assert rel < 0.03, rel
    # per element: RNE error is at most half an E4M3 step, i.e. |w|/16 for normals and
    # 2^-10 * scale in the subnormal range
    s_full = dequantize_fp8_block(torch.ones(shape).to(FP8_DTYPE), s)
    bound = (w.abs() / 16 + s_full * 2.0**-10) * (1 + 1e-6)
    assert ((dq - w).abs() <= bound).all()


def test_block_stack_equals_per_matrix():
    torch.manual_seed(6)
    w = torch.randn(3, 257, 130, dtype=torch.bfloat16)
    q, s = quantize_fp8_block(w)
    for e in range(3):
        qe, se = quantize_fp8_block(w[e])
        assert torch.equal(_bytes(q[e]), _bytes(qe)) and torch.equal(s[e], se)


def test_block_dequantize_checks_scale_shape():
    q, s = quantize_fp8_block(torch.randn(300, 200))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_block(q, s[:2])


def test_block_smaller_block_size():
    torch.manual_seed(7)
    w = torch.randn(40, 70)
    q, s = quantize_fp8_block(w, block=32)
    assert s.shape == (2, 3)
    rq, rs = _ref_block(w, 32)
    assert torch.equal(s, rs) and torch.equal(_bytes(q), _bytes(rq))
    s_full = rs.repeat_interleave(32, 0).repeat_interleave(32, 1)[:40, :70]
    assert torch.equal(dequantize_fp8_block(q, s, block=32), q.float() * s_full)


# ---------------------------------------------------------------- channel quantizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channel_matches_row_reference(dtype):
    torch.manual_seed(8)
    w = (torch.randn(3, 33, 70) * torch.rand(3, 33, 1) * 5).to(dtype)
    w[1, 4] = 0
    w[2, 7, 3] = -0.0
    q, s = quantize_fp8_channel(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == dtype and s.shape == (3, 33, 1)
    for e in range(3):
        for r in range(33):
            row = w[e, r]
            ref_s = row.abs().max() / 448.0  # division rounded to the weight dtype, as CT's observer
            if ref_s == 0:
                ref_s = torch.tensor(torch.finfo(dtype).eps, dtype=dtype)
            assert s[e, r, 0] == ref_s and s[e, r, 0].dtype == dtype
            ref_q = torch.clamp(row / ref_s + 0.0, -448, 448).to(FP8_DTYPE)  # +0.0: CT's zero point
            assert torch.equal(_bytes(q[e, r]), _bytes(ref_q)), (e, r)
    assert s[1, 4, 0] == torch.finfo(dtype).eps and (q[1, 4].float() == 0).all()


def test_channel_bf16_division_is_rounded_before_fp8():
    # CT divides in the weight dtype, so w / scale is rounded to bf16 before the RNE cast to FP8.
    # Here the float32 quotient 4.7397 rounds to 4.5, but bf16 makes it 4.75, the tie between
    # 4.5 and 5.0, and RNE picks 5.0 (even mantissa). Bit-identity with CT needs the bf16 step.
    w = torch.tensor([[1.0, 0.01055908203125]], dtype=torch.bfloat16)
    q, s = quantize_fp8_channel(w)
    assert s.item() == 0.002227783203125  # bf16(1 / 448)
    assert q.float()[0, 1].item() == 5.0
    qf, sf = quantize_fp8_channel(w.float())
    assert qf.float()[0, 1].item() == 4.5  # a float32 weight keeps the float32 quotient


def test_channel_dequantize_and_error():
    torch.manual_seed(9)
    w = torch.randn(256, 512)
    q, s = quantize_fp8_channel(w)
    dq = dequantize_fp8_channel(q, s)
    assert dq.dtype == torch.float32
    assert torch.equal(dq, q.float() * s)
    assert ((dq - w).norm() / w.norm()).item() < 0.03


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        quantize_fp8_block(torch.randn(16))
    with pytest.raises(TypeError):
        quantize_fp8_channel(torch.ones(4, 4, dtype=torch.int32))


# ---------------------------------------------------------------- meta planning


@pytest.mark.parametrize("shape", [(300, 200), (3, 257, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_meta_planning_matches_real_run(shape, dtype):
    real = torch.randn(shape).to(dtype)
    meta = torch.empty(shape, dtype=dtype, device="meta")
    for fn in (quantize_fp8_block, quantize_fp8_channel):
        r_out, m_out = fn(real), fn(meta)
        for r, m in zip(r_out, m_out):
            assert m.device.type == "meta"
            assert (m.shape, m.dtype) == (r.shape, r.dtype), fn.__name__
    qb, sb = quantize_fp8_block(meta)
    assert dequantize_fp8_block(qb, sb).shape == shape
    qc, sc = quantize_fp8_channel(meta)
    assert dequantize_fp8_channel(qc, sc).shape == shape

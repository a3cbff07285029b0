"""Differential tests against compressed-tensors 0.19.0, the second implementation.

CT's own path is driven the way llm-compressor drives it: a bf16 `nn.Linear` gets a preset
scheme through `apply_quantization_config`; the weight observer is emulated as LC's
`memoryless_minmax` does it (min/max of the weight in its own dtype, in LC's calibration
layout) feeding CT's `generate_gparam` / `calculate_qparams`; then `ModelCompressor.compress_model`
runs CT's real compressors (`quantize`, `cast_to_fp4`, `pack_fp4_to_uint8`, FP8 casts).
All comparisons are on bytes (`torch.equal`, float8 viewed as uint8, bf16 as int16).
"""

import math

import pytest
import torch

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import (  # noqa: E402
    calculate_qparams,
    generate_gparam,
    maybe_pad_tensor_for_block_quant,
)
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4  # noqa: E402

from quant.constants import FP8_DTYPE  # noqa: E402
from quant.fp8 import (  # noqa: E402
    fp8_tensor_scale,
    quantize_fp8_tensor,
    dequantize_fp8_block,
    dequantize_fp8_channel,
    quantize_fp8_block,
    quantize_fp8_channel,
)
from quant.nvfp4 import (  # noqa: E402
    dequantize_nvfp4,
    fp4_codes,
    global_scale,
    pack_fp4,
    quantize_nvfp4,
    shared_global_scale,
    unpack_fp4,
)


# ---------------------------------------------------------------- CT harness


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.uint8, torch.int8) or t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.dtype.itemsize])


def assert_same_bytes(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Byte equality; on failure report how many and which elements differ."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs CT {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} vs CT {theirs.dtype}"
    diff = _as_bytes(ours) != _as_bytes(theirs)
    if diff.any():
        idx = diff.nonzero()[:10]
        rows = [
            f"  {tuple(i.tolist())}: ours {ours[tuple(i)].float().item()!r} CT {theirs[tuple(i)].float().item()!r}"
            for i in idx
        ]
        msg = f"{name}: {int(diff.sum())} of {diff.numel()} elements differ\n" + "\n".join(rows)
        print(msg)
        raise AssertionError(msg)


def _ct_quantized_linear(w: torch.Tensor, preset: str) -> torch.nn.Module:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    lin.weight.data.copy_(w)
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    config = QuantizationConfig(config_groups={"group_0": scheme})
    apply_quantization_config(torch.nn.Sequential(lin), config, show_progress=False)
    lin._stepq_config = config
    return lin


def _ct_compress(lin: torch.nn.Module) -> dict[str, torch.Tensor]:
    ModelCompressor(quantization_config=lin._stepq_config).compress_model(torch.nn.Sequential(lin))
    return {name: p.detach().clone() for name, p in lin.named_parameters()}


def _observe(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # LC memoryless_minmax: reduce the observation dim and the group/element dim
    return torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1))


def ct_nvfp4(w: torch.Tensor, gs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CT NVFP4A16 compression of a 2-D weight; `gs` overrides the observer's (fused groups)."""
    lin = _ct_quantized_linear(w, "NVFP4A16")
    if gs is None:
        gs = generate_gparam(*_observe(w.reshape(1, 1, -1)))
    lin.weight_global_scale.data.copy_(gs)
    scale, _ = calculate_qparams(
        *_observe(w.unflatten(-1, (-1, 16)).unsqueeze(0)),
        lin.quantization_scheme.weights,
        global_scale=lin.weight_global_scale,
    )
    lin.weight_scale.data.copy_(scale)
    return _ct_compress(lin)


def ct_fp8(w: torch.Tensor, preset: str, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CT FP8_DYNAMIC / FP8_BLOCK compression of a 2-D weight; `scale` overrides the observer's."""
    lin = _ct_quantized_linear(w, preset)
    args = lin.quantization_scheme.weights
    if scale is None:
        if preset == "FP8_DYNAMIC":
            observed = w.unsqueeze(-2).unsqueeze(0)  # (1, rows, 1, cols)
        else:
            bh, bw = args.block_structure
            padded = maybe_pad_tensor_for_block_quant(w, (bh, bw))
            r, c = padded.shape
            observed = padded.reshape(r // bh, bh, c // bw, bw).transpose(1, 2).flatten(-2).unsqueeze(0)
        scale, _ = calculate_qparams(*_observe(observed), args)
    lin.weight_scale.data.copy_(scale)
    return _ct_compress(lin)


def _ct_decompress(w: torch.Tensor, preset: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Load our tensors into a compressed CT module of `w`'s shape/dtype and run CT's decompress."""
    lin = _ct_quantized_linear(w, preset)
    model = torch.nn.Sequential(lin)
    compressor = ModelCompressor(quantization_config=lin._stepq_config)
    compressor.compress_model(model)
    for name, t in tensors.items():
        getattr(lin, name).data.copy_(t)
    compressor.decompress_model(model)
    return lin.weight.detach()


def _awkward(shape: tuple[int, int], seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Random weights with per-row spread, outliers, zero rows/groups, -0.0 and tiny negatives."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(shape, generator=g) * torch.rand(rows, 1, generator=g).mul(4).exp2()
    flat = w.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 3000),), generator=g)] *= 40
    if rows > 2:
        w[1] = 0
        w[rows // 2, : min(cols, 16)] = -0.0
    if rows > 4 and cols >= 32:
        # small negatives next to a normal value: they round to -0 (NVFP4 code 8, FP8 byte 0x80)
        w[3, 16:24] = -1e-4 * torch.rand(8, generator=g)
        w[3, 24:31] = -1e-7 * torch.rand(7, generator=g)
        w[3, 31] = 1.0
    return w.to(dtype)


NVFP4_SHAPES = [(1280, 4096), (96, 256), (3, 16), (130, 48)]


# ---------------------------------------------------------------- NVFP4


@pytest.mark.parametrize("shape", NVFP4_SHAPES)
def test_nvfp4_bytes_identical_to_ct(shape):
    w = _awkward(shape, seed=sum(shape))
    ct = ct_nvfp4(w)
    gs = shared_global_scale(w)
    assert_same_bytes("weight_global_scale", gs, ct["weight_global_scale"])
    packed, scale = quantize_nvfp4(w, gs)
    assert_same_bytes("weight_scale", scale, ct["weight_scale"])
    assert_same_bytes("weight_packed", packed, ct["weight_packed"])
    codes = unpack_fp4(packed)
    assert (codes[shape[0] // 2, :16] == 0).all()  # the -0.0 weights: code 0 in both
    if shape[0] > 4 and shape[1] >= 32:
        assert (codes[3, 16:24] == 0b1000).all()  # small negatives: code 8 in both


def test_nvfp4_fused_gate_up_shared_gs_identical_to_ct():
    gate, up = _awkward((96, 256), seed=1), _awkward((96, 256), seed=2) * 3
    gs = shared_global_scale(gate, up)
    # LC's fused observers give both members the gs of the larger amax
    ct_gs = torch.minimum(
        generate_gparam(*_observe(gate.reshape(1, 1, -1))), generate_gparam(*_observe(up.reshape(1, 1, -1)))
    )
    assert_same_bytes("shared gs", gs, ct_gs)
    for name, w in (("gate", gate), ("up", up)):
        ct = ct_nvfp4(w, gs=gs)
        packed, scale = quantize_nvfp4(w, gs)
        assert_same_bytes(f"{name} weight_scale", scale, ct["weight_scale"])
        assert_same_bytes(f"{name} weight_packed", packed, ct["weight_packed"])


def test_nvfp4_expert_stack_identical_to_ct_per_expert():
    w = torch.stack([_awkward((48, 64), seed=10 + e) for e in range(3)])
    gs = shared_global_scale(w)  # [3], one per expert
    packed, scale = quantize_nvfp4(w, gs)
    for e in range(3):
        ct = ct_nvfp4(w[e])
        assert_same_bytes(f"expert {e} gs", gs[e : e + 1], ct["weight_global_scale"])
        assert_same_bytes(f"expert {e} weight_scale", scale[e], ct["weight_scale"])
        assert_same_bytes(f"expert {e} weight_packed", packed[e], ct["weight_packed"])


def test_nvfp4_dequantize_matches_ct_decompress():
    w = _awkward((96, 256), seed=3)
    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    theirs = _ct_decompress(
        w, "NVFP4A16", {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gs}
    )
    # CT returns bf16: exactly our float32 result rounded once to bf16
    assert_same_bytes("decompressed weight", dequantize_nvfp4(packed, scale, gs).to(torch.bfloat16), theirs)


def test_fp4_rounding_and_packing_identical_to_ct_on_dense_grid():
    grid = torch.arange(-7 * 256, 7 * 256) / 256.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = torch.cat([torch.nextafter(ties, ties - 1), torch.nextafter(ties, ties + 1)])
    x = torch.cat([grid, ties, -ties, near, -near, torch.tensor([-0.0, 0.0, -1e-30, 1e-30, 100.0, -100.0])])
    x = x[: x.numel() // 2 * 2].reshape(1, -1)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        theirs = pack_fp4_to_uint8(cast_to_fp4(torch.clamp(xd, -6.0, 6.0)))
        assert_same_bytes(f"packed codes ({dtype})", pack_fp4(fp4_codes(xd)), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_global_scale_identical_to_generate_gparam(dtype):
    torch.manual_seed(4)
    amax = torch.cat(
        [torch.rand(600) * 30, torch.rand(200) * 1e-3, torch.tensor([0.0, 1e-39, 1e-30, 1.0, 5.0, 448.0, math.nan])]
    ).to(dtype)
    ours = global_scale(amax, dtype=dtype)
    theirs = torch.cat([generate_gparam(-a.reshape(1), a.reshape(1)) for a in amax])
    assert_same_bytes(f"global scale ({dtype})", ours, theirs)


# ---------------------------------------------------------------- FP8 channel (FP8_DYNAMIC)


@pytest.mark.parametrize("shape", [(1280, 4096), (96, 256), (300, 200), (3, 16)])
def test_fp8_channel_identical_to_ct_fp8_dynamic(shape):
    w = _awkward(shape, seed=5 + sum(shape))
    ct = ct_fp8(w, "FP8_DYNAMIC")
    q, scale = quantize_fp8_channel(w)
    assert ct["weight_scale"].dtype == torch.bfloat16  # CT keeps the model dtype
    assert_same_bytes("weight_scale", scale, ct["weight_scale"])
    assert_same_bytes("weight", q, ct["weight"])
    qb = q.view(torch.uint8)
    assert (qb[shape[0] // 2, :16] == 0x00).all()  # -0.0 weights -> +0 in both
    if shape[0] > 4 and shape[1] >= 32:
        assert (qb[3, 24:31] == 0x80).all()  # negatives that round to zero keep the sign in both


def test_fp8_channel_identical_to_ct_fp32_model():
    w = _awkward((96, 256), seed=6, dtype=torch.float32)
    ct = ct_fp8(w, "FP8_DYNAMIC")
    q, scale = quantize_fp8_channel(w)
    assert_same_bytes("weight_scale", scale, ct["weight_scale"])
    assert_same_bytes("weight", q, ct["weight"])


def test_fp8_dequantize_matches_ct_decompress():
    w = _awkward((300, 200), seed=8)
    q, scale = quantize_fp8_channel(w)
    theirs = _ct_decompress(w, "FP8_DYNAMIC", {"weight": q, "weight_scale": scale})
    assert_same_bytes("FP8_DYNAMIC decompressed", dequantize_fp8_channel(q, scale).to(torch.bfloat16), theirs)
    # block: CT with a float32 model keeps our float32 scale_inv, so both sides are float32
    qb, scale_inv = quantize_fp8_block(w.float())
    theirs = _ct_decompress(w.float(), "FP8_BLOCK", {"weight": qb, "weight_scale": scale_inv})
    assert_same_bytes("FP8_BLOCK decompressed", dequantize_fp8_block(qb, scale_inv), theirs)


# ---------------------------------------------------------------- FP8 block (FP8_BLOCK)


@pytest.mark.parametrize("shape", [(1280, 4096), (300, 200), (257, 130), (96, 256)])
def test_fp8_block_vs_ct_fp8_block(shape):
    """What is compared, precisely:

    1. scale: CT's FP8_BLOCK `weight_scale` (bf16, from its own observer path) equals our float32
       `scale_inv` rounded to bf16, bit for bit (zero tiles included).
    2. codes: CT's FP8_BLOCK compressor, run on the float32 weight with our float32 `scale_inv`,
       writes exactly our `weight` bytes (same padding, division and RNE cast).
    3. CT end to end (bf16 scale, division in bf16) differs from ours only by CT rounding the scale
       and the quotient to bf16: a few percent of codes, each by one E4M3 step.
    """
    w = _awkward(shape, seed=7 + sum(shape))
    w[:128, :128] = 0  # a zero tile
    q, scale_inv = quantize_fp8_block(w)
    ct = ct_fp8(w, "FP8_BLOCK")
    assert ct["weight_scale"].dtype == torch.bfloat16
    assert_same_bytes("bf16(scale_inv) vs CT weight_scale", scale_inv.to(torch.bfloat16), ct["weight_scale"])

    ct32 = ct_fp8(w.float(), "FP8_BLOCK", scale=scale_inv)
    assert_same_bytes("weight with our scale", q, ct32["weight"])
    assert_same_bytes("weight_scale with our scale", scale_inv, ct32["weight_scale"])

    ours_b, theirs_b = q.view(torch.uint8).int(), ct["weight"].view(torch.uint8).int()
    diff = ours_b != theirs_b
    frac = diff.float().mean().item()
    print(f"FP8_BLOCK {shape}: {frac:.4%} of codes differ from CT's bf16-scale path")
    assert frac < 0.05
    assert ((ours_b - theirs_b).abs()[diff] == 1).all()  # adjacent E4M3 values, same sign


def test_fp8_block_expert_stack_vs_ct_per_expert():
    w = torch.stack([_awkward((257, 130), seed=20 + e) for e in range(3)])
    q, scale_inv = quantize_fp8_block(w)
    for e in range(3):
        ct = ct_fp8(w[e], "FP8_BLOCK")
        assert_same_bytes(f"expert {e} scale", scale_inv[e].to(torch.bfloat16), ct["weight_scale"])
        ct32 = ct_fp8(w[e].float(), "FP8_BLOCK", scale=scale_inv[e])
        assert_same_bytes(f"expert {e} weight", q[e], ct32["weight"])
    assert q.dtype == FP8_DTYPE


def ct_fp8_static_weight(w: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CT FP8 (static, per-tensor) weight compression; `scale` overrides the observer's (fused groups)."""
    lin = _ct_quantized_linear(w, "FP8")
    if scale is None:
        scale, _ = calculate_qparams(*_observe(w.reshape(1, 1, -1)), lin.quantization_scheme.weights)
    lin.weight_scale.data.copy_(scale)
    return _ct_compress(lin)


@pytest.mark.parametrize("shape", [(1280, 4096), (96, 256), (300, 200)])
def test_fp8_tensor_identical_to_ct_fp8_static(shape):
    w = _awkward(shape, seed=11 + sum(shape))
    ct = ct_fp8_static_weight(w)
    scale = fp8_tensor_scale(w.abs().amax())
    assert_same_bytes("weight_scale", scale, ct["weight_scale"].reshape(1))
    assert_same_bytes("weight", quantize_fp8_tensor(w, scale), ct["weight"])


def test_fp8_tensor_fused_group_shares_the_max_scale():
    q, k = _awkward((96, 256), seed=21), _awkward((64, 256), seed=22) * 3
    scale = fp8_tensor_scale(torch.stack([q.abs().amax(), k.abs().amax()]).amax())
    for w in (q, k):
        ct = ct_fp8_static_weight(w, scale=scale.reshape(ct_fp8_static_weight(w)["weight_scale"].shape))
        assert_same_bytes("weight", quantize_fp8_tensor(w, scale), ct["weight"])
    assert scale.item() == fp8_tensor_scale(k.abs().amax()).item()  # the larger amax wins: nothing saturates

"""quant/gptq.py against llm-compressor's own GPTQ, and the properties stepq relies on.

1. Acceptance: a one-`nn.Linear` model goes through llm-compressor's real `GPTQModifier` path (preset scheme,
   `on_initialize` -> `on_calibration_start` -> forwards through the module, whose `calibrate_module` hook
   accumulates the Hessian -> `on_sequential_epoch_end`: weight observer, `compress_modules`, `quantize_weight`,
   `update_batch_qparams` -> `on_calibration_end`). `quantize_weight` is wrapped only to record what the modifier
   handed it and returned (float32, before the module's storage-dtype cast). stepq then does the same with its own
   pieces (`empty_hessian` / `add_to_hessian` on the same calls, `normalized`, RTN scales from quant.nvfp4 /
   quant.fp8, `gptq`). Hessian, scales, global scale and quantized weights are compared with `torch.equal`.
   FP8 on a bf16 model is the one case that differs, by design, see `test_fp8_bf16_model_differs_only_by_lc_dequant_dtype`.
2. Every GPTQ output lies exactly on its grid (re-encoding with the same scales gives back the same floats).
3. GPTQ beats round-to-nearest on the Hessian-weighted output error (correlated inputs).
4. Dead input channels and factorization failures behave as llm-compressor documents.
5. Importing and running quant.gptq writes nothing to stdout/stderr (llm-compressor's loguru setup is switched off).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# isort: off
import quant.gptq  # noqa: F401  first: switches llm-compressor's loguru off before llmcompressor is imported
import llmcompressor.modifiers.gptq.base as lc_base
from llmcompressor.core import State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from loguru import logger
# isort: on

from quant.constants import FP8_BLOCK
from quant.fp8 import fp8_tensor_scale, quantize_fp8_block, quantize_fp8_channel, to_fp8
from quant.gptq import GptqSettings, Grid, add_to_hessian, empty_hessian, gptq, normalized
from quant.nvfp4 import dequantize_nvfp4, encode_nvfp4, quantize_nvfp4, shared_global_scale

# With its logging switched off (LLM_COMPRESSOR_LOG_DISABLED, set by quant.gptq) llm-compressor never registers
# its "METRIC" loguru level, yet the modifier's CompressionLogger logs at it, and loguru looks the level up before
# it checks whether the caller's logger is disabled: "Level 'METRIC' does not exist". stepq calls
# `quantize_weight` directly (no CompressionLogger); this test drives the modifier, so it registers the level.
if "METRIC" not in logger._core.levels:
    logger.level("METRIC", no=38)

SETTINGS = GptqSettings()  # llm-compressor's defaults: block 128, 1 % damping, static (= "weight") actorder
N_CALLS, BATCH, SEQ = 3, 4, 32  # forward calls of [BATCH, SEQ, cols]: llm-compressor counts BATCH samples per call


# ---------------------------------------------------------------- data


def _weight(shape, seed, dtype=torch.bfloat16):
    """bf16-valued weights with a per-row spread and a few outliers."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    w = torch.randn(shape, generator=g) * 0.02 * torch.rand(rows, 1, generator=g).mul(3).exp2()
    w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)] *= 8
    return w.to(torch.bfloat16).to(dtype)


def _inputs(cols, seed, dtype=torch.bfloat16, calls=N_CALLS):
    """Calibration calls `[BATCH, SEQ, cols]` with correlated channels of unequal size (bf16-valued)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5 * 1.5
    size = torch.rand(cols, generator=g).mul(4).exp2()
    return [((torch.randn(BATCH, SEQ, cols, generator=g) @ mix) * size).to(torch.bfloat16).to(dtype)
            for _ in range(calls)]


def _hessian(xs):
    h, n = empty_hessian(xs[0].shape[-1])
    for x in xs:
        add_to_hessian(h, n, x)
    return normalized(h, n)


# ---------------------------------------------------------------- llm-compressor's own path


def _run_modifier(w, preset, xs, monkeypatch):
    """llm-compressor's GPTQModifier on a one-Linear model -> (module after compression, what `quantize_weight` got
    and returned). The wrapper clones its inputs: `quantize_weight` uses the stacked Hessian as its work buffer."""
    calls = []

    def recording(**kw):
        seen = {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}
        out = quantize_weight(**kw)
        calls.append((seen, out))
        return out

    monkeypatch.setattr(lc_base, "quantize_weight", recording)
    rows, cols = w.shape
    model = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False, dtype=w.dtype))
    model[0].weight.data.copy_(w)
    modifier = GPTQModifier(scheme=preset, targets=["Linear"], block_size=SETTINGS.block_size,
                            dampening_frac=SETTINGS.dampening, actorder=SETTINGS.actorder)
    state = State(model=model)
    modifier.on_initialize(state)
    modifier.on_calibration_start(state, None)
    with torch.no_grad():
        for x in xs:
            model(x)
    modifier.on_sequential_epoch_end(state, None, modules=[model[0]])
    modifier.on_calibration_end(state, None)
    monkeypatch.undo()
    assert len(calls) == 1
    return model[0], calls[0]


def _stepq_grid(kind, w):
    """stepq's round-to-nearest scales for `w` (what quantize.py hands GPTQ)."""
    if kind == "nvfp4":
        gs = shared_global_scale(w)
        return Grid("nvfp4", quantize_nvfp4(w, gs)[1], gs)
    if kind == "fp8_block":
        return Grid("fp8_block", quantize_fp8_block(w)[1])
    if kind == "fp8_channel":
        return Grid("fp8_channel", quantize_fp8_channel(w)[1])
    return Grid("fp8_tensor", fp8_tensor_scale(w.abs().amax(), w.dtype))


PRESET_KIND = {"NVFP4A16": "nvfp4", "FP8_DYNAMIC": "fp8_channel", "FP8_BLOCK": "fp8_block"}


@pytest.mark.parametrize(
    "preset, shape, dtype",
    [
        ("NVFP4A16", (64, 256), torch.bfloat16),
        ("NVFP4A16", (72, 176), torch.bfloat16),  # 176 columns: a partial second GPTQ block
        ("FP8_DYNAMIC", (64, 256), torch.float32),
        ("FP8_DYNAMIC", (200, 300), torch.float32),
        ("FP8_BLOCK", (64, 256), torch.float32),
        ("FP8_BLOCK", (200, 300), torch.float32),  # edge tiles in both directions
    ],
)
def test_bit_identical_to_llmcompressor_gptq_modifier(preset, shape, dtype, monkeypatch):
    """NVFP4 on a bf16 model, FP8 on a float32 model (bf16-valued weights and inputs, so the Hessian and stepq's
    RTN scales are those of the bf16 checkpoint): every tensor llm-compressor produces, stepq produces bit for bit."""
    w = _weight(shape, seed=sum(shape))
    xs = _inputs(shape[1], seed=shape[0])
    w, xs = w.to(dtype), [x.to(dtype) for x in xs]
    lin, (seen, (lc_q, lc_loss, lc_fallback)) = _run_modifier(w, preset, xs, monkeypatch)

    h = _hessian(xs)
    assert torch.equal(seen["hessians"][0], h), "Hessian (same calls, same accumulate_hessian)"
    grid = _stepq_grid(PRESET_KIND[preset], w)
    assert torch.equal(seen["scale"][0].float(), grid.scale.float()), "observer scale vs stepq RTN scale"
    assert torch.equal(lin.weight_scale.float(), grid.scale.float())
    if grid.global_scale is not None:
        assert torch.equal(seen["global_scale"].reshape(1), grid.global_scale)
        assert torch.equal(lin.weight_global_scale, grid.global_scale)
    else:
        assert seen["global_scale"] is None
    assert seen["quant_args"].actorder == SETTINGS.actorder  # "static" is an alias of "weight"

    q, loss, fallback = gptq([w], [h], [grid], SETTINGS)
    assert q.dtype == torch.float32 and q.shape == (1, *shape)
    assert torch.equal(q, lc_q), f"{int((q != lc_q).sum())} of {q.numel()} quantized weights differ"
    assert torch.equal(loss, lc_loss) and torch.equal(fallback, lc_fallback) and not fallback.any()
    assert torch.equal(q[0].to(dtype), lin.weight.data), "the module's fake-quantized weight"
    assert not torch.equal(q[0], w.float())  # GPTQ changed something


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_fp8_bf16_model_differs_only_by_lc_dequant_dtype(preset, monkeypatch):
    """FP8 on a bf16 model: llm-compressor's observer gives bf16 scales, and compressed-tensors' `fake_quantize`
    dequantizes in the scale's dtype (`_quantize_dequantize`: `quantized.to(scale.dtype) * scale`), so each value
    GPTQ settles on is bf16(code * scale), not the grid value code * scale (12 significant bits), and the error it
    propagates is off by that rounding; the runs diverge from the first such column. stepq hands
    `quantize_weight` float32 scales: its values are the exact grid values the checkpoint decodes to.
    Proven here: same Hessian; same scales (channel: identical; block: compressed-tensors' bf16 scale is stepq's
    float32 scale_inv rounded to bf16, stepq keeps vLLM's float32 scale_inv); the modifier's result is exactly
    `quantize_weight` on the same inputs with the bf16 scale, and stepq's `gptq` is the same call with that scale
    in float32; llm-compressor's values are off the exact grid, stepq's are on it; same error level."""
    shape = (200, 300)
    w, xs = _weight(shape, seed=5), _inputs(shape[1], seed=6)
    _, (seen, (lc_q, lc_loss, _)) = _run_modifier(w, preset, xs, monkeypatch)
    h = _hessian(xs)
    assert torch.equal(seen["hessians"][0], h)
    lc_scale = seen["scale"][0]
    assert lc_scale.dtype == torch.bfloat16
    grid = _stepq_grid(PRESET_KIND[preset], w)
    assert torch.equal(grid.scale.to(torch.bfloat16), lc_scale)
    if preset == "FP8_DYNAMIC":
        assert torch.equal(grid.scale, lc_scale)

    def library_call(scale):  # the Hessian is cloned: quantize_weight factorizes it in place
        return quantize_weight(w.float()[None], h.clone()[None], scale[None], seen["zero_point"], None,
                               seen["quant_args"], blocksize=SETTINGS.block_size, percdamp=SETTINGS.dampening)

    again, again_loss, _ = library_call(lc_scale)
    ours32, _, _ = library_call(lc_scale.float())
    assert torch.equal(again, lc_q) and torch.equal(again_loss, lc_loss), "the modifier is quantize_weight(bf16 scale)"
    q, _, _ = gptq([w], [h], [Grid(grid.kind, lc_scale)], SETTINGS)
    assert torch.equal(q, ours32), "stepq's gptq is quantize_weight(float32 scale)"

    full = _expand_scale(grid.kind, lc_scale.float(), shape)
    assert _on_grid_fp8(q[0], full)
    assert not _on_grid_fp8(lc_q[0], full), "llm-compressor's bf16 dequant leaves the exact grid"
    snapped = to_fp8(lc_q[0] / full).float() * full  # ... by one bf16 rounding of the grid value, no more
    assert torch.equal(snapped.bfloat16().float(), lc_q[0])  # bf16(code * scale): up to 2**-8 relative
    x = torch.cat([x.float().reshape(-1, shape[1]) for x in xs])
    ours_err, lc_err = _output_error(x, w, q[0]), _output_error(x, w, lc_q[0])
    print(f"{preset} bf16: {(q != lc_q).float().mean().item():.2%} of values differ; "
          f"output error stepq {ours_err:.4g} vs llm-compressor {lc_err:.4g}")
    assert abs(ours_err / lc_err - 1) < 0.05


# ---------------------------------------------------------------- grids


def _expand_scale(kind, scale, shape):
    rows, cols = shape
    scale = scale.float()
    if kind == "fp8_block":
        return scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return scale.expand(rows, cols)  # channel [rows, 1], tensor [1]


def _on_grid_fp8(q, full_scale):
    """Every value is code * scale exactly, the code an FP8 E4M3 value, as float32 `to_fp8(q / s) * s` gives back."""
    return torch.equal(to_fp8(q / full_scale).float() * full_scale, q)


def _assert_on_grid(q, grid, shape):
    if grid.kind == "nvfp4":
        packed = encode_nvfp4(q, grid.global_scale, grid.scale)
        assert torch.equal(dequantize_nvfp4(packed, grid.scale, grid.global_scale), q)
    else:
        assert _on_grid_fp8(q, _expand_scale(grid.kind, grid.scale, shape))


def _output_error(x, w, q):
    """Mean squared output error `X (W - Q)^T` on the calibration tokens, in float64."""
    return (x.double() @ (w.double() - q.double()).T).square().mean().item()


@pytest.mark.parametrize("actorder", ["weight", None])
@pytest.mark.parametrize(
    "kind, shape",
    [("nvfp4", (48, 272)), ("fp8_block", (136, 160)), ("fp8_channel", (40, 96)), ("fp8_tensor", (40, 96))],
)
def test_every_output_on_its_grid(kind, shape, actorder):
    """Two weights in one batch call (own scales and global scales, one with a dead input channel): each value
    re-encodes with its scales to exactly itself; the batch call equals the two single calls."""
    settings = GptqSettings(actorder=actorder)
    ws = [_weight(shape, seed=1), _weight(shape, seed=2) * 5]
    xs = [_inputs(shape[1], seed=3), _inputs(shape[1], seed=4)]
    for x in xs[1]:
        x[..., 7] = 0
    hs = [_hessian(x) for x in xs]
    grids = [_stepq_grid(kind, w) for w in ws]
    if kind == "nvfp4":
        assert not torch.equal(grids[0].global_scale, grids[1].global_scale)
    q, _, fallback = gptq(ws, hs, grids, settings)
    assert not fallback.any()
    for i in range(2):
        _assert_on_grid(q[i], grids[i], shape)
        if actorder:  # one single call per kind is enough to show batching changes nothing
            assert torch.equal(q[i], gptq([ws[i]], [hs[i]], [grids[i]], settings)[0][0])
    assert (q[1][:, 7] == 0).all()


# ---------------------------------------------------------------- error vs RTN


def _rtn(kind, w, grid):
    if kind == "nvfp4":
        return dequantize_nvfp4(encode_nvfp4(w.float(), grid.global_scale, grid.scale), grid.scale, grid.global_scale)
    full = _expand_scale(kind, grid.scale, w.shape)
    return to_fp8(w.float() / full).float() * full


@pytest.mark.parametrize("kind", ["nvfp4", "fp8_block"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(kind):
    shape = (64, 256)
    w = _weight(shape, seed=11)
    xs = _inputs(shape[1], seed=12, calls=6)
    x = torch.cat([x.float().reshape(-1, shape[1]) for x in xs])
    grid = _stepq_grid(kind, w)
    q, _, _ = gptq([w], [_hessian(xs)], [grid])
    rtn = _rtn(kind, w, grid)
    _assert_on_grid(rtn, grid, shape)
    gptq_err, rtn_err = _output_error(x, w, q[0]), _output_error(x, w, rtn)
    print(f"{kind}: output MSE GPTQ {gptq_err:.4g} RTN {rtn_err:.4g} ({gptq_err / rtn_err:.2f}x)")
    assert gptq_err < 0.5 * rtn_err  # seeded: ~0.25x for both


# ---------------------------------------------------------------- dead columns, factorization failure


@pytest.mark.parametrize("kind", ["nvfp4", "fp8_block"])
def test_dead_columns_zeroed_and_rtn_fallback(kind):
    """llm-compressor's `factorize_hessian`: a zero Hessian diagonal (an input channel that never fired) zeroes that
    weight column; a Hessian still not positive definite after damping gets the identity factor and the fallback
    flag, which makes GPTQ round-to-nearest (no error propagates). A rank-deficient PSD Hessian (fewer tokens
    than columns) is fine: damping makes it positive definite."""
    shape = (64, 256)
    w = _weight(shape, seed=21)
    grid = _stepq_grid(kind, w)
    xs = _inputs(shape[1], seed=22)
    for x in xs:
        x[..., [5, 100]] = 0
    h = _hessian(xs)
    assert h[5].abs().sum() == 0 and h[:, 100].abs().sum() == 0
    few = _hessian([_inputs(shape[1], seed=23)[0][:1, :16]])  # 16 tokens, rank <= 16
    n = shape[1]
    indefinite = torch.eye(n) - 8 / n * torch.ones(n, n)  # eigenvalues 1 and -7 (along the ones vector)
    indefinite[100, :] = indefinite[:, 100] = 0

    q, _, fallback = gptq([w, w, w], [h, few, indefinite], [grid] * 3)
    assert fallback.tolist() == [False, False, True]
    assert (w[:, [5, 100]] != 0).all()
    assert (q[0][:, [5, 100]] == 0).all() and (q[2][:, 100] == 0).all()
    assert torch.isfinite(q).all()
    for i in range(3):
        _assert_on_grid(q[i], grid, shape)
    rtn = _rtn(kind, w, grid)
    rtn[:, 100] = 0
    assert torch.equal(q[2], rtn), "fallback = round-to-nearest (dead column still zeroed)"
    assert not torch.equal(q[1], rtn)  # the rank-deficient one still ran GPTQ


# ---------------------------------------------------------------- llm-compressor's logging


def test_llmcompressor_stays_quiet():
    """llm-compressor logs on import ("No accelerator available! ...", on stdout through its own loguru handler)
    and per module; quant.gptq switches that off before importing it."""
    code = (
        "import torch, quant.gptq as g\n"
        "from quant.nvfp4 import quantize_nvfp4, shared_global_scale\n"
        "w = torch.randn(16, 32).bfloat16(); gs = shared_global_scale(w)\n"
        "h, n = g.empty_hessian(32); g.add_to_hessian(h, n, torch.randn(64, 32))\n"
        "g.gptq([w], [g.normalized(h, n)], [g.Grid('nvfp4', quantize_nvfp4(w, gs)[1], gs)])\n"
        "import llmcompressor.modifiers.gptq.base\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLM_COMPRESSOR_LOG_DISABLED"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == "", (out.stdout, out.stderr)


@pytest.mark.parametrize("scheme", ["nvfp4a16", "fp8-block", "fp8-dynamic", "fp8-static"])
def test_members_sharing_a_hessian_in_one_call_equal_separate_calls(scheme):
    """q/k/v (different heights) and gate/up share one input: one stacked GPTQ call gives each member's own result."""
    from quant.gptq import gptq_shared
    from quant.layouts import layout_for

    torch.manual_seed(7)
    cols = 512
    x = torch.randn(2048, cols) @ torch.randn(cols, cols) * 0.1
    h, n = empty_hessian(cols)
    add_to_hessian(h, n, x)
    hessian = normalized(h, n)
    ws = [torch.randn(256, cols).bfloat16(), torch.randn(128, cols).bfloat16(), torch.randn(128, cols).bfloat16()]
    grids = layout_for(scheme, "gptq").grids(ws)
    stacked, _, _ = gptq_shared(ws, hessian, grids)
    for w, g, q in zip(ws, grids, stacked):
        assert torch.equal(q, gptq([w], [hessian], [g])[0][0])

"""The fused NVFP4 kernel (quant/fast_nvfp4.py) against the reference functions in quant/nvfp4.py, byte for byte.

Exhaustive where the domain is small: every finite bf16 value as a group amax (the FP8 group scale path) and as
an element under fixed scales (the E2M1 rounding path, every tie included); random matrices for the rest
(3-D stacks with per-expert global scales, zero groups, huge and tiny values, -0.0), and non-finite inputs, which
must fall back to the reference.
"""

import pytest
import torch

from quant import fast_common, fast_nvfp4, nvfp4
from quant.constants import FP8_DTYPE

@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """These tests are about the numba kernels: STEPQ_FAST=0 in the environment must not turn them into comparisons
    of the reference with itself. numba is a dependency, so its absence fails here rather than skipping."""
    monkeypatch.delenv("STEPQ_FAST", raising=False)
    assert fast_common.available(), "numba is not importable: the fast kernels cannot be tested"

ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
FINITE_BF16 = ALL_BF16[torch.isfinite(ALL_BF16)]
GLOBAL_SCALES = [1.0, 26496.0, 540.0, 2688.0, 1e30, 3e-30, 0.0]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def assert_same(fast, ref):
    for name, a, b in zip(("packed", "scale"), fast, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        diff = _bytes(a) != _bytes(b)
        assert not diff.any(), f"{name}: {int(diff.sum())} of {diff.numel()} bytes differ, first at {diff.nonzero()[:5].tolist()}"


def fast_and_ref(w, gs):
    fast = fast_nvfp4.quantize_nvfp4(w, gs)
    assert fast is not None, "the fast kernel refused a finite input"
    return fast, nvfp4.quantize_nvfp4_reference(w, gs)


def _pad16(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.new_zeros(-v.numel() % 16)])


@pytest.mark.parametrize("gs", GLOBAL_SCALES)
def test_every_bf16_amax_gives_the_reference_group_scale(gs):
    # one group per finite non-negative bf16 value: [amax, 0, ..., 0] and [-amax, amax/2 rounded, ...]
    amax = FINITE_BF16[FINITE_BF16 >= 0]
    groups = torch.zeros(amax.numel(), 16, dtype=torch.bfloat16)
    groups[:, 0] = amax
    groups[:, 1] = -(amax * 0.5)
    w = torch.cat([groups, -groups.flip(-1)], dim=1)  # [N, 32]: the amax group and its mirror
    w = torch.cat([w, w.new_zeros(w.shape[0] % 2, 32)]).reshape(-1, 64)
    fast, ref = fast_and_ref(w, torch.tensor([gs]))
    assert_same(fast, ref)


@pytest.mark.parametrize("amax", [6.0, 1.0, 0.75, 3e-3, 1e-38, 448.0 * 6])
@pytest.mark.parametrize("gs", [1.0, 448.0, 26496.0])
def test_every_bf16_element_under_a_fixed_scale(amax, gs):
    # every bf16 value v with |v| <= amax, 15 per group behind the group's amax, so all groups share one scale:
    # each element's E2M1 rounding (all ties included) is checked for that effective scale
    vals = FINITE_BF16[FINITE_BF16.float().abs() <= amax]
    vals = torch.cat([vals, vals.new_zeros(-vals.numel() % 15)]).reshape(-1, 15)
    groups = torch.cat([torch.full((vals.shape[0], 1), amax, dtype=torch.bfloat16), vals], dim=1)
    groups = torch.cat([groups, groups.new_zeros(-groups.shape[0] % 8, 16)])
    fast, ref = fast_and_ref(groups.reshape(-1, 128), torch.tensor([gs]))
    assert_same(fast, ref)


def test_e2m1_ties_and_neighbours_exactly():
    # eff = 1 (gs 1, amax 6): the codes of every tie, its bf16 neighbours, both signs, and -0.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.bfloat16)
    up = torch.nextafter(ties, torch.tensor(10.0, dtype=torch.bfloat16))
    down = torch.nextafter(ties, torch.tensor(-10.0, dtype=torch.bfloat16))
    v = torch.cat([ties, up, down, -ties, -up, -down, torch.tensor([-0.0, 0.0, 6.0, -6.0], dtype=torch.bfloat16)])
    w = _pad16(torch.cat([torch.tensor([6.0], dtype=torch.bfloat16), v])).reshape(1, -1)
    w[:, ::16] = 6.0  # every group's amax 6 -> scale 1, eff 1
    fast, ref = fast_and_ref(w, torch.tensor([1.0]))
    assert_same(fast, ref)


def _awkward(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g).mul(8).exp2() * 0.01
    flat = w.view(-1)
    n = flat.numel()
    flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] *= 1e4  # outliers
    flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] = 3e38  # near bf16 max
    flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] = 1e-39  # bf16 subnormals
    flat[torch.randint(0, n, (max(1, n // 500),), generator=g)] = -0.0
    w = w.to(torch.bfloat16)
    w[..., 1, :] = 0  # an all-zero row
    w[..., 2, 16:48] = 0  # all-zero groups
    w[..., 3, :16] = -1e-30  # tiny negatives: code -0 (8)
    return w


@pytest.mark.parametrize("shape", [(1280, 4096), (96, 256), (7, 16), (130, 48), (3, 64, 160), (5, 40, 32)])
def test_random_matrices_with_their_own_global_scale(shape):
    w = _awkward(shape, seed=sum(shape))
    gs = nvfp4.global_scale(w.abs().amax(dim=(-2, -1)).float(), w.dtype)  # per expert for 3-D stacks
    fast, ref = fast_and_ref(w, gs)
    assert_same(fast, ref)


def test_stack_with_one_shared_scale_and_with_per_expert_scales():
    w = _awkward((4, 48, 64), seed=3)
    for gs in (torch.tensor([448.0]), torch.tensor(26496.0), torch.tensor([1.0, 540.0, 3e9, 0.5])):
        assert_same(*fast_and_ref(w, gs))


def test_shared_global_scale_uses_the_fast_amax_and_matches():
    w = _awkward((4, 48, 64), seed=4)
    up = _awkward((4, 48, 64), seed=5) * 3
    expected = nvfp4.global_scale(torch.stack([w.abs().amax(dim=(-2, -1)).float(),
                                               up.abs().amax(dim=(-2, -1)).float()]).amax(0), torch.bfloat16)
    assert torch.equal(nvfp4.shared_global_scale(w, up), expected)
    assert torch.equal(fast_nvfp4.absmax(w), w.abs().amax(dim=(-2, -1)))
    assert torch.equal(fast_nvfp4.absmax(w[0]), w[0].abs().amax())


def test_encode_with_given_scales_matches():
    w = _awkward((64, 256), seed=6)
    gs = torch.tensor([26496.0])
    scale = torch.randint(0, 0x7F, (64, 16), dtype=torch.uint8).view(FP8_DTYPE)  # any positive FP8 codes
    fast = fast_nvfp4.encode_nvfp4(w, gs, scale)
    assert fast is not None and torch.equal(fast, nvfp4.encode_nvfp4_reference(w, gs, scale))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_fall_back_to_the_reference(bad):
    w = _awkward((32, 64), seed=7)
    w[5, 17] = bad
    gs = torch.tensor([448.0])
    assert fast_nvfp4.quantize_nvfp4(w, gs) is None
    assert fast_nvfp4.absmax(w) is None
    assert_same(nvfp4.quantize_nvfp4(w, gs), nvfp4.quantize_nvfp4_reference(w, gs))
    assert torch.equal(nvfp4.encode_nvfp4(w, gs, nvfp4.quantize_nvfp4_reference(w, gs)[1]),
                       nvfp4.encode_nvfp4_reference(w, gs, nvfp4.quantize_nvfp4_reference(w, gs)[1]))


@pytest.mark.parametrize("gs", [float("nan"), float("inf"), -2.0])
def test_unusual_global_scales_fall_back(gs):
    w = _awkward((32, 64), seed=8)
    g = torch.tensor([gs])
    assert fast_nvfp4.quantize_nvfp4(w, g) is None
    assert_same(nvfp4.quantize_nvfp4(w, g), nvfp4.quantize_nvfp4_reference(w, g))


def test_public_function_takes_the_fast_path_for_bf16_only(monkeypatch):
    calls = []
    real = fast_nvfp4.quantize_nvfp4
    monkeypatch.setattr(fast_nvfp4, "quantize_nvfp4", lambda *a: calls.append(1) or real(*a))
    w = _awkward((32, 64), seed=9)
    gs = torch.tensor([448.0])
    nvfp4.quantize_nvfp4(w, gs)
    assert calls == [1]
    nvfp4.quantize_nvfp4(w.float(), gs)  # float32: reference
    nvfp4.quantize_nvfp4(torch.empty(32, 64, dtype=torch.bfloat16, device="meta"), gs.to("meta"))  # planning
    assert calls == [1]
    monkeypatch.setenv("STEPQ_FAST", "0")
    nvfp4.quantize_nvfp4(w, gs)
    assert calls == [1]


def test_chunked_threads_give_the_same_bytes(monkeypatch):
    w = _awkward((1024, 1024), seed=10)  # > 2 chunks' worth: split across the pool
    gs = nvfp4.shared_global_scale(w)
    monkeypatch.setenv("STEPQ_THREADS", "1")
    one = fast_nvfp4.quantize_nvfp4(w, gs)
    monkeypatch.setenv("STEPQ_THREADS", "3")
    assert fast_common.threads() == 3
    many = fast_nvfp4.quantize_nvfp4(w, gs)
    assert_same(one, many)
    assert_same(one, nvfp4.quantize_nvfp4_reference(w, gs))


def test_non_contiguous_input():
    w = _awkward((64, 128), seed=11).t()  # [128, 64], a transposed view
    gs = torch.tensor([2688.0])
    assert_same(*fast_and_ref(w, gs))  # the fast path copies it to contiguous first


@pytest.mark.parametrize("shape", [(1280, 4096), (7, 16), (3, 64, 160), (1, 48, 32)])
def test_meta_shortcuts_give_the_reference_shapes(shape):
    # quantize.py plans every output with a meta dry run; the shortcut must agree with the reference on meta
    w = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    up = torch.empty(shape, dtype=torch.float32, device="meta")
    gs = nvfp4.shared_global_scale(w, up)
    ref_gs = nvfp4.global_scale(torch.stack(torch.broadcast_tensors(
        w.abs().amax(dim=(-2, -1)).float(), up.abs().amax(dim=(-2, -1)).float())).amax(0), torch.float32)
    assert (gs.shape, gs.dtype, gs.device) == (ref_gs.shape, ref_gs.dtype, ref_gs.device)
    for a, b in zip(nvfp4.quantize_nvfp4(w, gs), nvfp4.quantize_nvfp4_reference(w, gs)):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_all_finite(bad):
    for shape in [(300, 700), (5, 64, 48), (17,), ()]:
        w = torch.randn(shape).to(torch.bfloat16)
        if bad is not None:
            w.view(-1)[w.numel() // 2] = bad
        assert fast_common.all_finite(w) == bool(torch.isfinite(w).all())
        assert fast_common.all_finite(w.float()) == bool(torch.isfinite(w).all())  # reference path
    every = FINITE_BF16.reshape(-1, 2)
    assert fast_common.all_finite(every)
    for v in ALL_BF16[~torch.isfinite(ALL_BF16)][::97]:  # NaN payloads and both infinities
        assert not fast_common.all_finite(torch.cat([FINITE_BF16[:1000], v.reshape(1)]))

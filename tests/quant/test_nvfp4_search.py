import torch

from quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4, shared_global_scale
from quant.nvfp4_search import quantize_nvfp4_search


def _w(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) ** 2  # uneven channels
    w[..., 0, :16] = 0  # an all-zero group
    return w.bfloat16()


def _group_err(w, packed, scale, gs, imp):
    d = dequantize_nvfp4(packed, scale, gs) - w.float()
    return ((d**2) * imp).unflatten(-1, (-1, 16)).sum(-1)


def test_search_never_worse_per_group_and_better_overall():
    w = _w((96, 256), 0)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(1)) * 4
    gs = shared_global_scale(w)
    p0, s0 = quantize_nvfp4(w, gs)
    p1, s1 = quantize_nvfp4_search(w, gs, imp)
    assert p1.shape == p0.shape and p1.dtype == p0.dtype and s1.shape == s0.shape and s1.dtype == s0.dtype
    e0, e1 = _group_err(w, p0, s0, gs, imp), _group_err(w, p1, s1, gs, imp)
    assert (e1 <= e0 + 1e-12).all()
    assert e1.sum() < 0.9 * e0.sum()
    assert torch.equal(s1[0, 0].view(torch.uint8), s0[0, 0].view(torch.uint8))  # all-zero group untouched
    assert (s1.view(torch.uint8) != s0.view(torch.uint8)).any()


def test_importance_changes_the_choice():
    w = _w((64, 128), 2)
    gs = shared_global_scale(w)
    flat = quantize_nvfp4_search(w, gs)[1]
    skew = torch.ones(128)
    skew[::16] = 1000.0  # one channel per group dominates
    skewed = quantize_nvfp4_search(w, gs, skew)[1]
    assert not torch.equal(flat.view(torch.uint8), skewed.view(torch.uint8))


def test_per_expert_importance_on_a_stack_matches_expert_by_expert():
    w = _w((3, 32, 64), 3)
    imp = torch.rand(3, 64, generator=torch.Generator().manual_seed(4))
    gs = shared_global_scale(w)  # one per expert
    p, s = quantize_nvfp4_search(w, gs, imp)
    for e in range(3):
        pe, se = quantize_nvfp4_search(w[e], gs[e:e + 1], imp[e])
        assert torch.equal(pe, p[e]) and torch.equal(se.view(torch.uint8), s[e].view(torch.uint8))


def test_search_runs_on_meta():
    w = torch.empty(8, 64, dtype=torch.bfloat16, device="meta")
    gs = torch.empty(1, device="meta")
    p, s = quantize_nvfp4_search(w, gs, torch.empty(64, device="meta"))
    assert p.shape == (8, 32) and s.shape == (8, 4) and p.device.type == "meta"

"""The eval forward: artifacts read back from disk, with the engine's input quantization, streamed layer by layer;
its figures, computed a block of positions at a time against the reference on disk, equal the definitions on
whole logits."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.step3p7.modeling_step3p7 import Step3p7Experts

from calib.data import load_calibration
from calib.reference import text_config
from convert.checkpoint import open_checkpoint
from eval.forward import _experts_forward, artifact_forward, artifact_outputs, in_memory_model, source_outputs
from eval.metrics import PositionSink, acceptance, token_figures
from eval.reference import ReferenceSink, reference_outputs
from stepq.cli import main

CHUNK_TOKENS = 4096


def token_stats(ref_logits, q_logits, ids):
    """The figures' definitions on whole logits [N, T, V]: eval.metrics.token_stats as it was before the eval
    streamed, kept as the oracle."""
    n = ref_logits.shape[0]
    targets = torch.cat([ids[:, 1:], torch.full((n, 1), -1, dtype=ids.dtype)], dim=1).reshape(-1)
    ref, q = ref_logits.reshape(-1, ref_logits.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    kl, same, nll_r, nll_q = [], [], [], []
    for a in range(0, ref.shape[0], CHUNK_TOKENS):
        lp_r = F.log_softmax(ref[a:a + CHUNK_TOKENS].float(), -1)
        lp_q = F.log_softmax(q[a:a + CHUNK_TOKENS].float(), -1)
        kl.append((lp_r.exp() * (lp_r - lp_q)).sum(-1).clamp(min=0))
        same.append(lp_r.argmax(-1) == lp_q.argmax(-1))
        tgt = targets[a:a + CHUNK_TOKENS]
        keep = tgt >= 0
        nll_r.append(-lp_r[keep].gather(-1, tgt[keep, None]).squeeze(-1))
        nll_q.append(-lp_q[keep].gather(-1, tgt[keep, None]).squeeze(-1))
    kl_all = torch.cat(kl).double()
    mean_r, mean_q = torch.cat(nll_r).double().mean().item(), torch.cat(nll_q).double().mean().item()
    return {
        "kld": {"mean": kl_all.mean().item(), "median": kl_all.median().item(),
                "p99": torch.quantile(kl_all, 0.99).item(), "max": kl_all.max().item()},
        "top1": torch.cat(same).double().mean().item(),
        "ppl": math.exp(mean_q), "ppl_ref": math.exp(mean_r), "ppl_ratio": math.exp(mean_q - mean_r),
        "positions": int(kl_all.numel()),
    }


def mtp_acceptance(trunk_logits, mtp_logits):
    """Oracle (eval.metrics.mtp_acceptance before streaming): depth k's greedy draft at t against the trunk's
    greedy token at t+k."""
    own = trunk_logits.argmax(-1)
    return [(m.argmax(-1) == own[:, k:]).double().mean().item() for k, m in enumerate(mtp_logits, start=1)]


def streamed_figures(ref, q, ids, block: int = 50):
    """The eval's figures on logits in memory: the reference through `ReferenceSink` into a log-prob array, the
    variant through `PositionSink`, both fed `block` positions of one sequence at a time (as the stream does)."""
    n, t, v = ref.logits.shape
    depths = len(ref.mtp_logits)
    ref_sink = ReferenceSink(np.zeros((n, t, v), np.float32), ids, depths)
    q_sink = PositionSink(ref_sink.logprobs, ids, depths)
    for out, sink in ((ref, ref_sink), (q, q_sink)):
        for row in range(n):
            for p in range(0, t, block):
                sink.trunk(row, p, out.logits[row, p:p + block])
            for k, m in enumerate(out.mtp_logits, start=1):
                for p in range(0, t - k, block):
                    sink.mtp(k, row, p, m[row, p:p + block])
    small = ref_sink.tensors()
    positions = q_sink.positions()
    ref_drafts = [small[f"mtp.{k}"] for k in range(1, depths + 1)]
    return (token_figures(positions, small["nll"]), acceptance(positions.greedy, positions.drafts),
            acceptance(small["greedy"], ref_drafts))


def assert_same_figures(got: dict, want: dict) -> None:
    for name in ("mean", "median", "p99", "max"):
        assert got["kld"][name] == pytest.approx(want["kld"][name], rel=1e-6, abs=1e-12), name
    for name in ("ppl", "ppl_ref", "ppl_ratio"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    assert got["top1"] == want["top1"] and got["positions"] == want["positions"]


def test_experts_forward_without_quantizers_is_transformers_own(bundled_fixture):
    import json

    cfg = text_config(json.loads((bundled_fixture / "config.json").read_text()))
    experts = Step3p7Experts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=g)
        experts.down_proj.normal_(generator=g)
    x = torch.randn(40, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(cfg.num_local_experts, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    patched = _experts_forward([(None, None)] * cfg.num_local_experts)
    assert torch.equal(patched(experts, x, idx, w), experts(x, idx, w))


@pytest.fixture(scope="module")
def variants(tmp_path_factory, bundled_fixture):
    out = tmp_path_factory.mktemp("variants")
    assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    assert main(["quantize", str(bundled_fixture), "--scheme", "nvfp4", "--out", str(out), "--num-samples", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def ids(bundled_fixture):
    return load_calibration(bundled_fixture, str(bundled_fixture.parent / "tiny-step35-data" / "eval.txt"),
                            4, 128).ids


def test_streamed_artifact_equals_in_memory_model(variants, bundled_fixture, ids):
    src = open_checkpoint(bundled_fixture)
    for name in ("NVFP4A16", "NVFP4"):
        art = variants / f"tiny-step35-{name}"
        streamed, hooked = artifact_outputs(src, art, ids, progress=False)
        whole = in_memory_model(src, art).logits(ids)
        assert (streamed.logits - whole).abs().max() < 1e-3, name
        # weight-only: no input quantized; W4A4: every quantized trunk linear and each MoE layer's experts
        assert (hooked == []) == (name == "NVFP4A16"), hooked
    assert {"model.layers.0.self_attn.q_proj", "model.layers.4.moe.experts",
            "model.layers.2.share_expert.down_proj"} <= set(hooked)
    assert not any(h.startswith(("model.layers.5.", "model.layers.6.")) for h in hooked)  # MTP kept BF16


def test_w4a4_adds_activation_error_and_keeps_mtp(variants, bundled_fixture, ids):
    src = open_checkpoint(bundled_fixture)
    ref = source_outputs(src, ids, progress=False)
    a16, _ = artifact_outputs(src, variants / "tiny-step35-NVFP4A16", ids, progress=False)
    w4a4, _ = artifact_outputs(src, variants / "tiny-step35-NVFP4", ids, progress=False)
    (stats_a16, _, _), (stats_w4a4, acc_q, acc_ref) = (streamed_figures(ref, q, ids) for q in (a16, w4a4))
    kl_a16, kl_w4a4 = stats_a16["kld"]["mean"], stats_w4a4["kld"]["mean"]
    print(f"KLD nvfp4a16 {kl_a16:.2e}, nvfp4 (W4A4) {kl_w4a4:.2e}")
    # measured on the bundled fixture: 1.2e-3 < 5.4e-3 (doubled expert scales measure > 0.05)
    assert 0 < kl_a16 < kl_w4a4 < 0.05
    same, _, _ = streamed_figures(ref, ref, ids)
    assert same["kld"]["max"] == 0 and same["top1"] == 1 and same["ppl_ratio"] == 1
    # measured on the bundled fixture: BF16 0.467 / 0.417, W4A4 0.461 / 0.425
    assert len(acc_ref) == 2 and all(0.2 < a < 0.7 for a in acc_ref + acc_q), (acc_ref, acc_q)


def test_streamed_figures_equal_the_definitions_on_whole_logits(variants, bundled_fixture, ids, tmp_path):
    """Same logits: the block-wise figures against the log-prob array equal the whole-logit definitions (means to
    1e-6, top-1 and MTP acceptance exactly). Then the eval's own path, the reference written to disk by the streamed
    forward and the variant streamed against its memory map, gives the same figures."""
    src = open_checkpoint(bundled_fixture)
    ref = source_outputs(src, ids, progress=False)
    art = variants / "tiny-step35-NVFP4"
    w4a4, _ = artifact_outputs(src, art, ids, progress=False)
    want, want_acc, want_acc_ref = token_stats(ref.logits, w4a4.logits, ids), *(
        mtp_acceptance(o.logits, o.mtp_logits) for o in (w4a4, ref))
    got, acc, acc_ref = streamed_figures(ref, w4a4, ids, block=37)
    assert_same_figures(got, want)
    assert acc == want_acc and acc_ref == want_acc_ref

    on_disk = reference_outputs(src, ids, tmp_path / "evalref", "key", progress=False, compute=None)
    sink = PositionSink(on_disk.logprobs, ids, depths=len(on_disk.drafts))
    artifact_forward(src, art, ids, sink, progress=False)
    q = sink.positions()
    assert_same_figures(token_figures(q, on_disk.nll), want)
    assert acceptance(q.greedy, q.drafts) == want_acc and acceptance(on_disk.greedy, on_disk.drafts) == want_acc_ref
    assert sorted(p.name for p in (tmp_path / "evalref" / "key").iterdir()) == ["logprobs.npy",
                                                                                 "positions.safetensors"]

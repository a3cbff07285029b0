"""The eval forward: artifacts read back from disk, with the engine's input quantization, streamed layer by layer."""

import pytest
import torch
from transformers.models.step3p7.modeling_step3p7 import Step3p7Experts

from calib.data import load_calibration
from calib.reference import text_config
from convert.checkpoint import open_checkpoint
from eval.forward import _experts_forward, artifact_outputs, in_memory_model, source_outputs
from eval.metrics import mtp_acceptance, token_stats
from stepq.cli import main


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
    kl_a16 = token_stats(ref.logits, a16.logits, ids)["kld"]["mean"]
    kl_w4a4 = token_stats(ref.logits, w4a4.logits, ids)["kld"]["mean"]
    print(f"KLD nvfp4a16 {kl_a16:.2e}, nvfp4 (W4A4) {kl_w4a4:.2e}")
    # measured on the bundled fixture: 1.2e-3 < 5.4e-3 (doubled expert scales measure > 0.05)
    assert 0 < kl_a16 < kl_w4a4 < 0.05
    same = token_stats(ref.logits, ref.logits, ids)
    assert same["kld"]["max"] == 0 and same["top1"] == 1 and same["ppl_ratio"] == 1
    acc_ref, acc_q = mtp_acceptance(ref.logits, ref.mtp_logits), mtp_acceptance(w4a4.logits, w4a4.mtp_logits)
    # measured on the bundled fixture: BF16 0.467 / 0.417, W4A4 0.461 / 0.425
    assert len(acc_ref) == 2 and all(0.2 < a < 0.7 for a in acc_ref + acc_q), (acc_ref, acc_q)

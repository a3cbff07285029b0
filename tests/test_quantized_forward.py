"""Each variant, read back from disk and dequantized, runs in the reference forward close to the BF16 source.

transformers + compressed-tensors cannot reload these MoE variants correctly (fused experts drop NVFP4 global
scales and crash on FP8 blocks, see the formats reference), so the read-back goes through stepq's ArtifactReader
and the same transformers-based forward the BF16 source runs in.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer

from calib.reference import ReferenceModel, load_reference
from convert.artifact import ArtifactReader
from quant.layouts import NEEDS_ACTIVATION_STATS
from stepq.cli import main

# (max mean KL(BF16 || variant) in nats, min top-1 agreement) on held-out text: about 5x the KL measured on the
# bundled fixture (fp8-block 3.7e-5, fp8-block-all 3.7e-4, fp8-dynamic 2.5e-4, nvfp4a16 / nvfp4 / nvfp4-modelopt
# 1.0e-3, fp8-static 2.7e-4; top-1 0.994 / 0.989 / 0.989 / 0.976 / 0.985), so a regression in scales or layouts
# fails while run-to-run noise does not.
BOUNDS = {"fp8-block": (2e-4, 0.985), "fp8-block-all": (2e-3, 0.97), "fp8-dynamic": (1.3e-3, 0.98),
          "nvfp4a16": (5e-3, 0.93), "nvfp4": (5e-3, 0.93), "nvfp4-modelopt": (5e-3, 0.93),
          "fp8-static": (2e-3, 0.97)}
SEQ, NSEQ = 256, 4


@pytest.fixture(scope="module")
def eval_ids(bundled_fixture):
    tok = Tokenizer.from_file(str(bundled_fixture / "tokenizer.json"))
    text = (bundled_fixture.parent / "tiny-step35-data" / "eval.txt").read_text()
    ids = tok.encode(text).ids[: SEQ * NSEQ]
    return torch.tensor(ids).reshape(NSEQ, SEQ)


@pytest.fixture(scope="module")
def bf16_logits(bundled_fixture, eval_ids):
    with torch.no_grad():
        return load_reference(bundled_fixture)(eval_ids)[0]


def _logits_of_artifact(path, eval_ids):
    reader = ArtifactReader(path)
    tensors = {name: reader.read(name).float() for name in reader.source_names()}
    model = ReferenceModel(json.loads((path / "config.json").read_text()))
    model.load_checkpoint_tensors(tensors)
    with torch.no_grad():
        return model.float().eval()(eval_ids)[0]


@pytest.fixture(scope="module")
def calib_out(tmp_path_factory, bundled_fixture):
    """A small calibration shared by the static-activation schemes (`stepq quantize` reuses it: same settings)."""
    out = tmp_path_factory.mktemp("calib")
    assert main(["calibrate", str(bundled_fixture), "--out", str(out), "--num-samples", "16"]) == 0
    return out


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_variant_forward_stays_close_to_bf16(calib_out, bundled_fixture, eval_ids, bf16_logits, scheme):
    # Weights only: activation fake-quantization (W4A4, FP8 static) is the eval stage's business.
    tmp_path = calib_out
    calibrated = ["--num-samples", "16"] if scheme in NEEDS_ACTIVATION_STATS else []  # refused by data-free ones
    assert main(["quantize", str(bundled_fixture), "--scheme", scheme, "--out", str(tmp_path), *calibrated]) == 0
    logits = _logits_of_artifact(tmp_path / f"{bundled_fixture.name}-{scheme.upper()}", eval_ids)
    p = torch.log_softmax(bf16_logits.float(), -1)
    q = torch.log_softmax(logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (bf16_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    max_kl, min_top1 = BOUNDS[scheme]
    print(f"{scheme}: KL {kl:.5f} top-1 {top1:.4f}")
    assert 0 < kl < max_kl and top1 > min_top1, (kl, top1)

"""End to end: `stepq quantize` on the bundled fixture, read back from disk with an independent decoder."""

import json
import re

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme

from convert.artifact import ArtifactReader
from convert.checkpoint import open_checkpoint
from convert.hashing import file_sha256
from stepq.cli import main

SCHEMES = ["fp8-block", "fp8-block-all", "fp8-dynamic", "nvfp4a16"]
# Relative Frobenius error bounds of a weight's reconstruction (random-normal-like weights: FP8 ~2.7%,
# NVFP4 ~9.5%); trained weights have outliers, so the bounds leave some room.
ERROR_BOUND = {"fp8-block": 0.04, "fp8-block-all": 0.04, "fp8-dynamic": 0.04, "nvfp4a16": 0.13}
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, bundled_fixture):
    out = tmp_path_factory.mktemp("out")
    made = {}
    for scheme in SCHEMES:
        assert main(["quantize", str(bundled_fixture), "--scheme", scheme, "--out", str(out)]) == 0
        made[scheme] = out / f"{bundled_fixture.name}-{scheme.upper()}"
    return made


# -- an independent decoder: formulas of the formats, nothing from quant/ ---------------------------------
def decode_fp8_block(q, scale_inv):
    out, inn = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(128, -2)[..., :out, :].repeat_interleave(128, -1)[..., :inn]
    return q.float() * s


def decode_nvfp4(packed, scale, gs):
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)
    vals = E2M1[(codes & 7).long()] * torch.where(codes & 8 > 0, -1.0, 1.0)
    return vals * (scale.float() / gs.float()).repeat_interleave(16, -1)


def rel_err(w, ref):
    return ((w - ref.float()).norm() / ref.float().norm()).item()


def _decoded(scheme, art, info, src):
    """Reconstruct one quantized source tensor (a 2-D linear or a 3-D expert stack) from the artifact."""
    rd = lambda n: art.read(n)  # noqa: E731
    m = info.module
    if info.role.startswith("experts_"):
        head, proj = m.rsplit(".", 1)
        if scheme.startswith("fp8-block"):
            return decode_fp8_block(rd(f"{m}.weight"), rd(f"{m}.weight_scale_inv"))
        return torch.stack([_decoded_linear(scheme, rd, f"{head}.experts.{e}.{proj}") for e in range(src.shape[0])])
    return _decoded_linear(scheme, rd, m)


def _decoded_linear(scheme, rd, m):
    if scheme.startswith("fp8-block"):
        return decode_fp8_block(rd(f"{m}.weight"), rd(f"{m}.weight_scale_inv"))
    if scheme == "fp8-dynamic":
        return rd(f"{m}.weight").float() * rd(f"{m}.weight_scale").float()
    return decode_nvfp4(rd(f"{m}.weight_packed"), rd(f"{m}.weight_scale"), rd(f"{m}.weight_global_scale"))


class _Artifact:
    def __init__(self, path):
        from convert.safetensors_io import SafetensorsFile

        self.index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        self.files = {s: SafetensorsFile(path / s) for s in set(self.index.values())}

    def read(self, name):
        return self.files[self.index[name]].read(name)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_tensor_decided_kept_bytes_identical_and_quantized_within_bounds(artifacts, bundled_fixture, scheme):
    path = artifacts[scheme]
    prov = json.loads((path / "stepq.json").read_text())
    art = _Artifact(path)
    reader = ArtifactReader(path)  # stepq's own read-back, checked against the independent decoder below
    src = open_checkpoint(bundled_fixture)
    assert set(prov["tensors"]) == set(src.tensors)
    errors = {}
    for name, t in src.tensors.items():
        d = prov["tensors"][name]
        assert d["role"] == t.info.label
        w = src.read(name)
        if d["action"] == "kept":
            assert d["outputs"] == [name]
            assert torch.equal(art.read(name).view(torch.uint8), w.view(torch.uint8)), name
        else:
            assert d["outputs"] and all(o in art.index for o in d["outputs"])
            got = _decoded(scheme, art, t.info, w)
            assert got.shape == w.shape and torch.isfinite(got).all()
            assert torch.equal(reader.read(name), got), name
            if got.ndim == 3:  # per-expert read-back, from that expert's bytes only
                assert all(torch.equal(reader.read_expert(name, e), got[e]) for e in range(got.shape[0])), name
            errors.setdefault(t.info.role, []).append(rel_err(got, w))
    assert errors, "the recipe quantized nothing"
    worst = {role: max(v) for role, v in errors.items()}
    assert all(v < ERROR_BOUND[scheme] for v in worst.values()), worst
    assert all(v > 0 for v in worst.values())  # really quantized, not copied


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mtp_layers_untouched_and_present(artifacts, bundled_fixture, scheme):
    prov = json.loads((artifacts[scheme] / "stepq.json").read_text())
    src = open_checkpoint(bundled_fixture)
    mtp = [n for n, t in src.tensors.items() if t.info.mtp]
    assert mtp and all(prov["tensors"][n]["action"] == "kept" for n in mtp)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_artifact_folder_contents_and_provenance(artifacts, bundled_fixture, scheme):
    path = artifacts[scheme]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "stepq.json", "model.safetensors.index.json"} <= names
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bundled_fixture / f).exists():
            assert (path / f).read_bytes() == (bundled_fixture / f).read_bytes()
    prov = json.loads((path / "stepq.json").read_text())
    for f, meta in prov["source"]["files"].items():
        assert meta["sha256"] == file_sha256(bundled_fixture / f)
    assert prov["recipe"]["name"] == scheme and prov["versions"]["torch"] == torch.__version__


def test_fp8_block_layout_matches_stepfun_release(artifacts):
    path = artifacts["fp8-block"]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["fmt"], q["activation_scheme"], q["weight_block_size"]) == \
        ("fp8", "e4m3", "dynamic", [128, 128])
    skip = set(q["modules_to_not_convert"])
    # vLLM matches exact prefixes: fused names and the MTP drafter's runtime names must be listed.
    for name in ["lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.2.moe.gate",
                 "model.layers.2.share_expert.gate_up_proj", "model.layers.5.mtp_block.self_attn.qkv_proj",
                 "model.layers.5.mtp_block.mlp.gate_up_proj", "model.layers.6.eh_proj",
                 "model.layers.6.shared_head.head", "model.layers.0.self_attn.g_proj"]:
        assert name in skip, name
    assert not any(".moe.gate_proj" in s or ".moe.down_proj" in s for s in skip)
    art = _Artifact(path)
    w, s = art.read("model.layers.2.moe.gate_proj.weight"), art.read("model.layers.2.moe.gate_proj.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and w.ndim == 3 and s.dtype == torch.float32
    assert s.shape == (w.shape[0], -(-w.shape[1] // 128), -(-w.shape[2] // 128))


def _ignored(ignore, module):
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "nvfp4a16"])
def test_compressed_tensors_config_and_ignore_rules(artifacts, scheme):
    path = artifacts[scheme]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    ignore = q["ignore"]
    for runtime in ["lm_head", "model.layers.2.moe.gate", "model.layers.5.mtp_block.self_attn.qkv_proj",
                    "model.layers.5.eh_proj", "model.layers.6.shared_head.head", "model.layers.6.mtp_block.mlp.down_proj",
                    "model.layers.1.self_attn.g_proj"]:
        assert _ignored(ignore, runtime), runtime
    for quantized in ["model.layers.2.moe.experts.0.gate_proj", "model.layers.0.self_attn.qkv_proj",
                      "model.layers.4.share_expert.down_proj"]:
        assert not _ignored(ignore, quantized), quantized
    QuantizationScheme.model_validate({"targets": ["Linear"], **{k: v for k, v in q["config_groups"]["group_0"].items()
                                                                if k != "format"}})


def test_nvfp4_fused_groups_share_one_global_scale(artifacts, bundled_fixture):
    art = _Artifact(artifacts["nvfp4a16"])
    cfg = open_checkpoint(bundled_fixture).config
    gs = lambda m: art.read(f"{m}.weight_global_scale").item()  # noqa: E731
    for layer in range(cfg.num_trunk_layers):
        p = f"model.layers.{layer}"
        assert gs(f"{p}.self_attn.q_proj") == gs(f"{p}.self_attn.k_proj") == gs(f"{p}.self_attn.v_proj")
        if cfg.is_moe(layer):
            assert gs(f"{p}.share_expert.gate_proj") == gs(f"{p}.share_expert.up_proj")
            per_expert = [gs(f"{p}.moe.experts.{e}.gate_proj") for e in range(cfg.num_experts)]
            assert per_expert == [gs(f"{p}.moe.experts.{e}.up_proj") for e in range(cfg.num_experts)]
            assert len(set(per_expert)) > 1  # each expert has its own scale
        else:
            assert gs(f"{p}.mlp.gate_proj") == gs(f"{p}.mlp.up_proj")


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "nvfp4a16"])
def test_compressed_tensors_decompressor_agrees_with_the_independent_decoder(artifacts, scheme):
    path = artifacts[scheme]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    group = {k: v for k, v in q["config_groups"]["group_0"].items() if k != "format"}
    scheme_obj = QuantizationScheme.model_validate({"targets": ["Linear"], **group})
    compressor = NVFP4PackedCompressor if scheme == "nvfp4a16" else FloatQuantizationCompressor
    art = _Artifact(path)
    for m in ["model.layers.2.moe.experts.3.down_proj", "model.layers.0.self_attn.q_proj",
              "model.layers.4.share_expert.up_proj"]:
        sd = {k.removeprefix(m + "."): art.read(k).clone() for k in art.index if k.startswith(m + ".")}
        ct = compressor.decompress(sd, scheme_obj)["weight"]
        ours = _decoded_linear(scheme, art.read, m)
        # compressed-tensors decodes into the model dtype (bf16); ours is exact float32, so round it the same way.
        assert ct.dtype == torch.bfloat16
        assert torch.equal(ct, ours.to(ct.dtype)), (m, (ct.float() - ours).abs().max())

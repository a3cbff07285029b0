"""Schemes with static activation scales (NVFP4 W4A4, ModelOpt NVFP4, FP8 static), fed synthetic statistics.

The statistics here are made up on purpose (known values per module and per expert), so the test checks the
plumbing from statistics to the on-disk scales exactly; real calibration is tested in tests/calib.
"""

import json

import pytest
import torch

from convert.artifact import ArtifactReader
from convert.checkpoint import open_checkpoint
from quant.fp8 import fp8_tensor_scale
from quant.nvfp4 import global_scale
from stepq.quantize import quantize


class FakeStats:
    """input absmax = 1 + (hash of the module name % 97) / 10, per expert + e; expert 5 of layer 3 saw no tokens."""

    sha256 = "0" * 64
    meta = {"fake": True}

    def _base(self, module):
        return 1.0 + (sum(map(ord, module)) % 97) / 10

    def tokens(self, module, expert=None):
        return 0 if (expert == 5 and ".layers.3." in module) else 10

    def input_amax(self, module, expert=None):
        if expert is not None and self.tokens(module, expert) == 0:
            return torch.tensor(0.0)
        return torch.tensor(self._base(module) + (expert or 0), dtype=torch.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from convert.fixtures import fixture_config, write_random_checkpoint

    tmp = tmp_path_factory.mktemp("cal")
    src = write_random_checkpoint(tmp / "rand-step35", fixture_config(), seed=3)
    return src, {s: quantize(src, s, tmp / "out", stats=FakeStats()) for s in ("nvfp4", "nvfp4-modelopt", "fp8-static")}


def test_w4a4_input_global_scales_come_from_the_statistics(artifacts):
    src, arts = artifacts
    art, fake = ArtifactReader(arts["nvfp4"]), FakeStats()
    q = json.loads((arts["nvfp4"] / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    for m in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert art.stored(f"{m}.input_global_scale").item() == global_scale(fake.input_amax(m)).item()
    # q/k/v (and gate/up) see one input: one input scale for the fused module, from the max over the group
    group = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    expected = global_scale(torch.stack([fake.input_amax(m) for m in group]).amax()).item()
    assert all(art.stored(f"{m}.input_global_scale").item() == expected for m in group)
    for e in range(8):
        g = art.stored(f"model.layers.2.moe.experts.{e}.gate_proj.input_global_scale").item()
        u = art.stored(f"model.layers.2.moe.experts.{e}.up_proj.input_global_scale").item()
        d = art.stored(f"model.layers.2.moe.experts.{e}.down_proj.input_global_scale").item()
        amax = max(fake.input_amax("model.layers.2.moe.gate_proj", e), fake.input_amax("model.layers.2.moe.up_proj", e))
        assert g == u == global_scale(amax).item()
        assert d == global_scale(fake.input_amax("model.layers.2.moe.down_proj", e)).item()


def test_expert_without_tokens_falls_back_to_its_siblings_and_is_recorded(artifacts):
    _, arts = artifacts
    art, fake = ArtifactReader(arts["nvfp4"]), FakeStats()
    m = "model.layers.3.moe.down_proj"
    got = art.stored("model.layers.3.moe.experts.5.down_proj.input_global_scale").item()
    assert got == global_scale(torch.tensor(max(fake.input_amax(m, e).item() for e in range(8)))).item()
    prov = json.loads((arts["nvfp4"] / "stepq.json").read_text())
    fallbacks = {(f["module"], f["expert"]) for f in prov["calibration"]["activation_fallbacks"]}
    assert fallbacks == {(f"model.layers.3.moe.{p}_proj", 5) for p in ("gate", "up", "down")}


def test_modelopt_is_compressed_tensors_bytes_with_reciprocal_scales(artifacts):
    _, arts = artifacts
    ct, mo = ArtifactReader(arts["nvfp4"]), ArtifactReader(arts["nvfp4-modelopt"])
    for m in ("model.layers.0.self_attn.k_proj", "model.layers.4.share_expert.down_proj"):
        assert torch.equal(mo.stored(f"{m}.weight"), ct.stored(f"{m}.weight_packed"))
        assert torch.equal(mo.stored(f"{m}.weight_scale").view(torch.uint8), ct.stored(f"{m}.weight_scale").view(torch.uint8))
        assert mo.stored(f"{m}.weight_scale_2").item() == pytest.approx(1 / ct.stored(f"{m}.weight_global_scale").item(), rel=1e-7)
        assert mo.stored(f"{m}.input_scale").item() == pytest.approx(1 / ct.stored(f"{m}.input_global_scale").item(), rel=1e-7)
    stack = "model.layers.2.moe.gate_proj"
    w, s2 = mo.stored(f"{stack}.weight"), mo.stored(f"{stack}.weight_scale_2")
    assert w.shape == (8, 256, 128) and s2.shape == (8,) and len(set(s2.tolist())) > 1  # per-expert scales
    assert torch.equal(s2, mo.stored("model.layers.2.moe.up_proj.weight_scale_2"))  # gate/up tied per expert
    for e in range(8):
        assert torch.equal(w[e], ct.stored(f"model.layers.2.moe.experts.{e}.gate_proj.weight_packed"))
    for name in ct.source_names():
        if ct.decisions[name]["action"] == "quantized":
            assert torch.allclose(mo.read(name), ct.read(name), rtol=1e-6, atol=0), name
    for reader in (ct, mo):  # one expert decoded from its own slice equals that expert of the whole stack
        whole = reader.read(stack + ".weight")
        assert all(torch.equal(reader.read_expert(stack + ".weight", e), whole[e]) for e in range(8))
    hf = json.loads((arts["nvfp4-modelopt"] / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and "model.layers.5.*" in hf["exclude_modules"]


def test_fp8_static_scales_tied_and_from_statistics(artifacts):
    src, arts = artifacts
    art, fake, ckpt = ArtifactReader(arts["fp8-static"]), FakeStats(), open_checkpoint(src)
    p = "model.layers.0.self_attn"
    scales = {x: art.stored(f"{p}.{x}_proj.weight_scale") for x in "qkv"}
    amax = max(ckpt.read(f"{p}.{x}_proj.weight").float().abs().max().item() for x in "qkv")
    assert all(torch.equal(s, fp8_tensor_scale(torch.tensor(amax))) for s in scales.values())
    assert art.stored(f"{p}.o_proj.input_scale").item() == fp8_tensor_scale(fake.input_amax(f"{p}.o_proj")).item()
    for name in art.source_names():
        d = art.decisions[name]
        if d["action"] == "quantized":
            w = ckpt.read(name).float()
            assert ((art.read(name) - w).norm() / w.norm()).item() < 0.05, name


def test_static_schemes_refuse_to_run_without_statistics(artifacts, tmp_path):
    from convert.errors import BadInput

    src, _ = artifacts
    with pytest.raises(BadInput, match="needs calibration statistics"):
        quantize(src, "nvfp4", tmp_path)


def test_scale_search_keeps_format_and_scales_tied_and_records_the_method(tmp_path):
    from convert.fixtures import fixture_config, write_random_checkpoint

    src = write_random_checkpoint(tmp_path / "rand-step35", fixture_config(), seed=5)
    inputs = {t.info.module: t.entry.shape[-1] for t in open_checkpoint(src)}

    class Stats(FakeStats):
        def channel_sumsq(self, module, expert=None):
            return torch.linspace(0.5, 2.0, inputs[module]) * self.tokens(module, expert)

    rtn = ArtifactReader(quantize(src, "nvfp4", tmp_path / "rtn", stats=Stats()))
    srch = ArtifactReader(quantize(src, "nvfp4", tmp_path / "search", stats=Stats(), method="search"))
    assert json.loads((srch.path / "stepq.json").read_text())["method"] == "search"
    ckpt = open_checkpoint(src)
    changed = 0
    for name in rtn.source_names():
        if rtn.decisions[name]["action"] != "quantized":
            continue
        w = ckpt.read(name).float()
        e_rtn, e_search = ((rtn.read(name) - w).norm() / w.norm()).item(), ((srch.read(name) - w).norm() / w.norm()).item()
        assert e_search < e_rtn * 1.02, name  # importance-weighted, so plain error may move a little either way
        changed += e_search != e_rtn
    assert changed > 0
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.2.moe.experts.3.gate_proj"):
        for suffix in ("weight_global_scale", "input_global_scale"):  # the format's per-tensor scales are untouched
            assert torch.equal(srch.stored(f"{m}.{suffix}"), rtn.stored(f"{m}.{suffix}"))
    with pytest.raises(Exception, match="--method search: not available for fp8-block"):
        quantize(src, "fp8-block", tmp_path / "x", method="search")


def test_mtp_recipe_quantizes_the_mtp_blocks_with_their_own_statistics(artifacts, tmp_path):
    src, _ = artifacts
    art = ArtifactReader(quantize(src, "nvfp4-mtp", tmp_path, stats=FakeStats()))
    fake = FakeStats()
    q = json.loads((art.path / "config.json").read_text())["quantization_config"]
    assert not any(p.startswith("re:") for p in q["ignore"])  # no blanket MTP pattern: modules listed one by one
    for kept in ("model.layers.5.eh_proj", "model.layers.6.shared_head.head", "model.layers.5.mtp_block.self_attn.g_proj"):
        assert kept in q["ignore"]
    m = "model.layers.6.self_attn.o_proj"
    assert art.decisions[f"{m}.weight"]["action"] == "quantized"
    assert art.stored(f"{m}.input_global_scale").item() == global_scale(fake.input_amax(m)).item()
    for name in ("model.layers.5.eh_proj.weight", "model.layers.5.transformer.shared_head.output.weight",
                 "model.layers.5.enorm.weight"):
        assert art.decisions[name]["action"] == "kept"

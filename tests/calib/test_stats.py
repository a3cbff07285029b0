"""Statistics: per-expert routing counts, all-experts mode, agreement with independent measurements on the reference
model, experts without tokens, the store round trip and `matches`."""

import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calib.data import load_calibration
from calib.reference import load_reference, to_checkpoint_names
from calib.stats import CalibStats, StatsCollector
from calib.stream import stream_forward
from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, fixture_config
from stepq.calibrate import calibrate, stats_path

N, L = 8, 128


@pytest.fixture(scope="module")
def cfg():
    return fixture_config()


@pytest.fixture(scope="module")
def ids(model_dir):
    return load_calibration(model_dir, n=N, seq_len=L).ids


def _collect(model_dir, ids, all_experts):
    ckpt = open_checkpoint(model_dir)
    try:
        c = StatsCollector(ckpt.config, all_experts=all_experts)
        res = stream_forward(ckpt, ids, c, keep_outputs=True, micro_batch_tokens=3 * L, progress=False)
    finally:
        ckpt.close()
    tensors, summary = c.result()
    return CalibStats(None, tensors, summary), res


@pytest.fixture(scope="module")
def routed(model_dir, ids):
    return _collect(model_dir, ids, all_experts=False)


@pytest.fixture(scope="module")
def all_exp(model_dir, ids):
    return _collect(model_dir, ids, all_experts=True)


def moe_layers(cfg):
    return [int(i) for i in cfg["moe_layers_enum"].split(",")]


def test_expert_token_counts_sum_to_top_k(routed, cfg):
    stats, _ = routed
    k, e = cfg["moe_top_k"], cfg["moe_num_experts"]
    for layer in moe_layers(cfg):
        load = stats.expert_load(layer)
        assert load.dtype == torch.int64 and load.shape == (e,)
        assert int(load.sum()) == k * N * L
        for proj in ("gate_proj", "up_proj", "down_proj"):
            per = [stats.tokens(f"model.layers.{layer}.moe.{proj}", x) for x in range(e)]
            assert per == load.tolist()
        assert stats.tokens(f"model.layers.{layer}.share_expert.gate_proj") == N * L


def test_all_experts_mode_sees_every_token_and_keeps_outputs(routed, all_exp, cfg):
    (r, r_res), (a, a_res) = routed, all_exp
    assert torch.equal(a_res.logits, r_res.logits)  # statistics never change the forward
    assert all(torch.equal(x, y) for x, y in zip(a_res.mtp_logits, r_res.mtp_logits))
    for layer in moe_layers(cfg):
        assert torch.equal(a.expert_load(layer), r.expert_load(layer))  # load = the real routing
        router_in = a.input_amax(f"model.layers.{layer}.moe.gate")
        for e in range(cfg["moe_num_experts"]):
            assert a.tokens(f"model.layers.{layer}.moe.down_proj", e) == N * L
            assert torch.equal(a.input_amax(f"model.layers.{layer}.moe.gate_proj", e), router_in)
            assert r.input_amax(f"model.layers.{layer}.moe.gate_proj", e) <= router_in
        assert a.meta["experts_without_tokens"][str(layer)] == []


@pytest.fixture(scope="module")
def reference_hooks(model_dir, ids, cfg):
    """Independent measurement: forward pre-hooks on the whole reference model's linears and MoE blocks."""
    from transformers.models.step3p7.modeling_step3p7 import Step3p7SparseMoeBlock

    ref = load_reference(model_dir)
    seen, moe_in = {}, {}

    def hook(name):
        def f(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            amax, sumsq, n = seen.get(name, (0.0, 0.0, 0))
            seen[name] = (max(amax, x.abs().max().item()), sumsq + x.square().sum(0), n + x.shape[0])
        return f

    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(hook(name))
        elif isinstance(m, Step3p7SparseMoeBlock):
            layer = int(name.split(".")[2])
            m.register_forward_pre_hook(lambda mod, args, layer=layer: moe_in.setdefault(layer, []).append(args[0]))
    with torch.no_grad():
        ref.forward_with_mtp(ids)
    return seen, {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for k, v in moe_in.items()}


def test_linear_stats_match_reference_hooks(routed, reference_hooks, cfg):
    stats, _ = routed
    seen, _ = reference_hooks
    assert len(seen) > 40
    for ref_name, (amax, sumsq, n) in seen.items():
        (ck,) = to_checkpoint_names({ref_name + ".weight": None}, cfg)
        module = ck.removesuffix(".weight")
        got = stats.input_amax(module)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(amax, rel=1e-5, abs=1e-6), module
        assert stats.tokens(module) == n, module
        torch.testing.assert_close(stats.channel_sumsq(module).double(), sumsq, rtol=1e-4, atol=1e-6)
    assert {m for m in stats.modules() if ".moe." not in m or m.endswith("moe.gate")} == {
        to_checkpoint_names({n + ".weight": None}, cfg).popitem()[0].removesuffix(".weight") for n in seen
    } | {f"model.layers.{i}.moe.gate" for i in moe_layers(cfg)}


def test_expert_stats_match_independent_routing(routed, reference_hooks, model_dir, cfg):
    """Router per the model card: sigmoid in fp32, top-k of p + router_bias; down input = clamped SwiGLU."""
    stats, _ = routed
    _, moe_in = reference_hooks
    ckpt = open_checkpoint(model_dir)
    try:
        for layer, x in moe_in.items():
            pre = f"model.layers.{layer}.moe."
            p = torch.sigmoid(x.float() @ ckpt.read(pre + "gate.weight").float().T)
            sel = torch.topk(p + ckpt.read(pre + "router_bias").float(), cfg["moe_top_k"], dim=-1).indices
            load = torch.bincount(sel.flatten(), minlength=cfg["moe_num_experts"])
            assert torch.equal(stats.expert_load(layer), load)
            lim = cfg["swiglu_limits"][layer] or float("inf")
            for e in range(cfg["moe_num_experts"]):
                xe = x[(sel == e).any(-1)]
                if xe.shape[0] == 0:
                    assert stats.tokens(pre + "down_proj", e) == 0
                    continue
                g = xe @ ckpt.read_expert(pre + "gate_proj.weight", e).float().T
                u = xe @ ckpt.read_expert(pre + "up_proj.weight", e).float().T
                act = F.silu(g).clamp(max=lim) * u.clamp(-lim, lim)
                for proj, inp in (("gate_proj", xe), ("up_proj", xe), ("down_proj", act)):
                    assert stats.input_amax(pre + proj, e).item() == pytest.approx(inp.abs().max().item(), rel=1e-4)
                    torch.testing.assert_close(stats.channel_amax(pre + proj, e), inp.abs().amax(0), rtol=1e-4,
                                               atol=1e-6)
                    torch.testing.assert_close(stats.channel_sumsq(pre + proj, e).double(),
                                               inp.double().square().sum(0), rtol=1e-4, atol=1e-6)
    finally:
        ckpt.close()


def _with_dead_expert(src, dst, layer, expert):
    """Copy of a checkpoint whose router never selects `expert` in `layer` (selection bias -1e4)."""
    shutil.copytree(src, dst)
    name = f"model.layers.{layer}.moe.router_bias"
    shard = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(dst / shard)
    tensors[name] = tensors[name].clone()
    tensors[name][expert] = -1e4
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    return dst


def test_experts_without_tokens_are_listed(model_dir, tmp_path, cfg):
    layer = moe_layers(cfg)[0]
    dead = _with_dead_expert(model_dir, tmp_path / "dead", layer, 5)
    path = calibrate(dead, out_root=tmp_path / "out", n=2, seq_len=64, progress=False)
    s = CalibStats.load(path)
    assert 5 in s.meta["experts_without_tokens"][str(layer)] and 5 in s.experts_without_tokens(layer)
    assert 5 in s.meta["experts_never_routed"][str(layer)]
    assert s.tokens(f"model.layers.{layer}.moe.down_proj", 5) == 0
    assert s.input_amax(f"model.layers.{layer}.moe.down_proj", 5).item() == 0.0
    assert int(s.expert_load(layer)[5]) == 0
    path = calibrate(dead, out_root=tmp_path / "out", n=2, seq_len=64, all_experts=True, progress=False)
    s = CalibStats.load(path)
    assert s.experts_without_tokens(layer) == [] and 5 in s.meta["experts_never_routed"][str(layer)]
    assert s.tokens(f"model.layers.{layer}.moe.down_proj", 5) == 2 * 64


def test_store_roundtrip_reuse_and_matches(model_dir, tmp_path, cfg):
    data = tmp_path / "data.txt"
    data.write_text((BUNDLED_FIXTURE.parent / "tiny-step35-data" / "calib.txt").read_text()[:40_000])
    out = tmp_path / "out"
    kw = dict(dataset=str(data), n=3, seq_len=64, seed=1)
    path = calibrate(model_dir, out_root=out, progress=False, **kw)
    assert path == stats_path(model_dir, out) == out / f"{model_dir.resolve().name}-calib" / "stats.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors"]  # no temp file left

    s = CalibStats.load(path)
    with safe_open(path, "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    q, layer = "model.layers.0.self_attn.q_proj", moe_layers(cfg)[0]
    stack, e = f"model.layers.{layer}.moe.down_proj", cfg["moe_num_experts"]
    h, ie = cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert (dtypes[q + ".input_amax"], shapes[q + ".input_amax"]) == ("F32", [])
    assert (dtypes[q + ".input_channel_amax"], shapes[q + ".input_channel_amax"]) == ("F32", [h])
    assert dtypes[q + ".input_sumsq"] in ("F32", "F64") and shapes[q + ".input_sumsq"] == [h]
    assert (dtypes[q + ".tokens"], shapes[q + ".tokens"]) == ("I64", [])
    assert shapes[stack + ".input_amax"] == [e] and shapes[stack + ".input_channel_amax"] == [e, ie]
    assert shapes[stack + ".input_sumsq"] == [e, ie] and (dtypes[stack + ".tokens"], shapes[stack + ".tokens"]) == (
        "I64", [e])
    assert (dtypes[f"model.layers.{layer}.moe.expert_load"], shapes[f"model.layers.{layer}.moe.expert_load"]) == (
        "I64", [e])
    assert s.tokens(q) == 3 * 64 and s.input_amax(q) == s.channel_amax(q).max()
    assert s.input_amax(stack, 0).dim() == 0 and s.input_amax(stack) == s.tensors[stack + ".input_amax"].max()
    assert len(s.sha256) == 64
    m = s.meta
    for key in ("source", "dataset", "n", "seq_len", "seed", "all_experts", "experts_without_tokens",
                "stepq_version", "timings"):
        assert key in m, key
    assert m["source"]["config_sha256"] and m["source"]["shards"] and m["dataset"]["files"]["data.txt"]["sha256"]
    assert (m["n"], m["seq_len"], m["seed"], m["all_experts"]) == (3, 64, 1, False)
    with pytest.raises(BadInput, match="no statistics for module"):
        s.input_amax("model.layers.0.self_attn.nope")

    assert s.matches(model_dir, str(data), 3, 64, 1, False)
    assert not s.matches(model_dir, str(data), 4, 64, 1, False)
    assert not s.matches(model_dir, str(data), 3, 32, 1, False)
    assert not s.matches(model_dir, str(data), 3, 64, 0, False)
    assert not s.matches(model_dir, str(data), 3, 64, 1, True)
    assert not s.matches(model_dir, None, 3, 64, 1, False)  # the default dataset is another file
    other = tmp_path / "copy"
    shutil.copytree(model_dir, other)
    assert s.matches(other, str(data), 3, 64, 1, False)  # same weights elsewhere: reusable
    cfg2 = json.loads((other / "config.json").read_text())
    cfg2["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg2))
    assert not s.matches(other, str(data), 3, 64, 1, False)

    # reuse when everything matches, recompute when forced or when the dataset changed
    stamp = os.stat(path).st_ino, os.stat(path).st_mtime_ns
    assert calibrate(model_dir, out_root=out, progress=False, **kw) == path
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == stamp
    calibrate(model_dir, out_root=out, force=True, progress=False, **kw)
    assert os.stat(path).st_ino != stamp[0]
    data.write_text(data.read_text() + "\nmore text\n")
    assert not CalibStats.load(path).matches(model_dir, str(data), 3, 64, 1, False)
    calibrate(model_dir, out_root=out, progress=False, **kw)
    assert CalibStats.load(path).matches(model_dir, str(data), 3, 64, 1, False)


def test_load_rejects_other_files(tmp_path, model_dir):
    with pytest.raises(BadInput, match="not found"):
        CalibStats.load(tmp_path / "missing.safetensors")
    p = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, p, metadata={"format": "pt"})
    with pytest.raises(BadInput, match="not a stepq statistics file"):
        CalibStats.load(p)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(BadInput, match="junk.safetensors"):
        CalibStats.load(tmp_path / "junk.safetensors")

"""Per-layer keep rules in recipes (quant/recipe.py `keep:`): validation, decisions, and the ignore lists the
engines read, under vLLM's runtime names (the vLLM load itself: tests/test_vllm_keep_rules.py)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from convert.errors import BadInput
from convert.safetensors_export import RECIPES_DIR, load_recipe
from quant.recipe import Recipe
from stepq.quantize import quantize

BASE = {"name": "r", "scheme": "nvfp4a16",
        "quantize": ["experts_gate", "experts_up", "experts_down", "shared_gate", "shared_up", "shared_down",
                     "mlp_gate", "mlp_up", "mlp_down", "attn_q", "attn_k", "attn_v", "attn_o"]}
QKV = ["attn_q", "attn_k", "attn_v"]
EXPERTS = ["experts_gate", "experts_up", "experts_down"]


def _load(tmp_path, keep) -> Recipe:
    path = tmp_path / "my-recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "keep": keep}))
    return load_recipe("nvfp4a16", str(path))


@pytest.mark.parametrize("keep, message", [
    ({"layers": [0], "roles": QKV}, "keep must be a list"),
    ([{"layers": [0], "roles": QKV, "why": "x"}], "keep rule 1: must be a mapping with exactly the keys"),
    ([{"roles": QKV}], "keep rule 1: must be a mapping with exactly the keys"),
    ([{"layers": [-1], "roles": QKV}], "keep rule 1: layers must be a non-empty list of layer numbers >= 0"),
    ([{"layers": [], "roles": QKV}], "layers must be a non-empty list"),
    ([{"layers": ["0"], "roles": QKV}], "layers must be a non-empty list"),
    ([{"layers": [True], "roles": QKV}], "layers must be a non-empty list"),
    ([{"layers": 3, "roles": QKV}], "layers must be a non-empty list"),
    ([{"layers": [1, 1], "roles": QKV}], "layers [1, 1] repeat a layer"),
    ([{"layers": [0], "roles": ["attn_qq"]}], "unknown roles ['attn_qq']"),
    ([{"layers": [0], "roles": "attn_q"}], "roles must be a non-empty list"),
    ([{"layers": [0], "roles": ["attn_gate"]}], "roles ['attn_gate'] are not quantized by this recipe"),
    ([{"layers": [0], "roles": ["attn_q", "attn_k"]}], "layer 0 keeps ['attn_k', 'attn_q'] but quantizes ['attn_v']"),
    # vLLM runs a layer's routed experts as one FusedMoE with one scheme: down goes with gate/up
    ([{"layers": [2], "roles": ["experts_gate", "experts_up"]}], "layer 2 keeps ['experts_gate', 'experts_up'] but "
                                                                 "quantizes ['experts_down']"),
    # the rules are checked together, per layer: q/k/v split over two rules is whole in layer 0 only
    ([{"layers": [0, 1], "roles": ["attn_q"]}, {"layers": [0], "roles": ["attn_k", "attn_v"]}],
     "layer 1 keeps ['attn_q'] but quantizes"),
])
def test_bad_keep_rules_are_one_line_naming_the_file(tmp_path, keep, message):
    with pytest.raises(BadInput) as e:
        _load(tmp_path, keep)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "my-recipe.yaml")), text
    assert message in text, text


def test_uniform_recipes_keep_the_routed_experts_whole():
    with pytest.raises(ValueError, match=r"\['experts_down'\] are fused with \['experts_gate', 'experts_up'\]"):
        Recipe.from_dict({**BASE, "quantize": ["experts_down"]}, "r.yaml")


def test_per_layer_decisions_and_reasons(tmp_path):
    r = _load(tmp_path, [{"layers": [0, 4], "roles": QKV}, {"layers": [2], "roles": EXPERTS}])
    d = r.decide("attn_k", False, 4)
    assert not d.quantize
    assert d.reason == "recipe r: keep rule 1 (layers [0, 4], roles ['attn_q', 'attn_k', 'attn_v']) keeps attn_k BF16 in layer 4"
    assert r.decide("attn_k", False, 1).quantize and r.decide("attn_o", False, 0).quantize
    assert "keep rule 2" in r.decide("experts_down", False, 2).reason
    assert r.decide("experts_down", False, 3).quantize
    assert r.decide("attn_k", False).quantize  # no layer: the uniform rule
    assert r.decide("norm", False, 0).reason == "norm weight"  # protected roles stay what they were
    assert r.decide("attn_q", True, 5).reason.startswith("MTP head kept BF16")
    assert r.to_dict()["keep"] == [{"layers": [0, 4], "roles": QKV}, {"layers": [2], "roles": EXPERTS}]
    assert Recipe.from_dict(BASE).to_dict()["keep"] == []


def test_keep_rules_name_layers_of_the_model(tmp_path):
    r = _load(tmp_path, [{"layers": [0, 9], "roles": QKV}])
    r.check_layers(10)
    with pytest.raises(ValueError, match=r"my-recipe.yaml: keep rule 1: layers \[9\] not in this model \(layers 0..6\)"):
        r.check_layers(7)


def _ignored(patterns, module):
    return any(re.match(p[3:], module) if p.startswith("re:") else p == module for p in patterns)


@pytest.fixture(scope="module")
def kept_artifacts(tmp_path_factory, constant_stats):
    """The bundled fixture (trunk layers 0-4, MoE 2-4) with q/k/v kept in layers 0 and 4 and the routed experts in
    layer 2, in each engine config family: compressed-tensors, native fp8, ModelOpt."""
    from convert.fixtures import BUNDLED_FIXTURE

    tmp = tmp_path_factory.mktemp("keep")
    made = {}
    for scheme, base in (("nvfp4a16", "nvfp4a16"), ("fp8-block", "fp8-block-all"), ("nvfp4-modelopt", "nvfp4-modelopt")):
        recipe = yaml.safe_load((RECIPES_DIR / f"{base}.yaml").read_text())
        recipe.update(name=f"{base}-keep", keep=[{"layers": [0, 4], "roles": QKV}, {"layers": [2], "roles": EXPERTS}])
        path = tmp / f"{base}-keep.yaml"
        path.write_text(yaml.safe_dump(recipe))
        stats = constant_stats if scheme == "nvfp4-modelopt" else None
        made[scheme] = quantize(BUNDLED_FIXTURE, base, tmp / "out", recipe_file=str(path), stats=stats)
    return made


def test_kept_modules_are_in_the_compressed_tensors_ignore_list(kept_artifacts):
    art = kept_artifacts["nvfp4a16"]
    ignore = json.loads((art / "config.json").read_text())["quantization_config"]["ignore"]
    for kept in ["model.layers.0.self_attn.qkv_proj", "model.layers.4.self_attn.qkv_proj",
                 "model.layers.2.moe.experts.0.gate_proj", "model.layers.2.moe.experts.7.down_proj",
                 "model.layers.2.moe.experts.3.up_proj"]:
        assert _ignored(ignore, kept), kept
    for quantized in ["model.layers.1.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                      "model.layers.3.moe.experts.0.gate_proj", "model.layers.2.share_expert.gate_up_proj",
                      "model.layers.12.moe.experts.0.gate_proj"]:
        assert not _ignored(ignore, quantized), quantized
    prov = json.loads((art / "stepq.json").read_text())
    d = prov["tensors"]["model.layers.2.moe.down_proj.weight"]
    assert d["action"] == "kept" and "keep rule 2" in d["reason"]
    assert prov["tensors"]["model.layers.3.moe.down_proj.weight"]["action"] == "quantized"
    assert prov["recipe"]["keep"][1] == {"layers": [2], "roles": EXPERTS}
    # the recipe file itself travels with the artifact
    assert prov["recipe"]["file"] == "recipe.yaml"
    assert Recipe.from_dict(yaml.safe_load((art / "recipe.yaml").read_text())).keep == Recipe.from_dict(
        yaml.safe_load((art.parent.parent / "nvfp4a16-keep.yaml").read_text())).keep


def test_kept_modules_are_skipped_by_the_fp8_and_modelopt_configs(kept_artifacts):
    skip = json.loads((kept_artifacts["fp8-block"] / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    assert {"model.layers.2.moe.experts", "model.layers.0.self_attn.qkv_proj", "model.layers.4.self_attn.qkv_proj"} \
        <= set(skip)
    assert "model.layers.3.moe.experts" not in skip and "model.layers.1.self_attn.qkv_proj" not in skip
    art = kept_artifacts["nvfp4-modelopt"]
    for f in ("config.json", "hf_quant_config.json"):
        cfg = json.loads((art / f).read_text())
        exclude = (cfg.get("quantization_config") or cfg["quantization"])["exclude_modules"]
        assert {"model.layers.2.moe.experts", "model.layers.0.self_attn.qkv_proj"} <= set(exclude), f
        assert "model.layers.3.moe.experts" not in exclude, f


def test_quantize_refuses_keep_rules_outside_the_model(tmp_path):
    from convert.fixtures import BUNDLED_FIXTURE

    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump({**BASE, "keep": [{"layers": [40], "roles": QKV}]}))
    with pytest.raises(BadInput, match=r"far.yaml: keep rule 1: layers \[40\] not in this model \(layers 0..6\)"):
        quantize(BUNDLED_FIXTURE, "nvfp4a16", tmp_path / "out", recipe_file=str(path))
    assert not (tmp_path / "out").exists()

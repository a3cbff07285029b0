"""The role table's names in other formats (convert/arch/step35.py) and the MTP rule (quant/mtp.py).

transformers names are checked against the reference model's own parameters, vLLM names against the ignore-list
names the layouts wrote before the table carried them, GGUF's MTP selection against the GGUF planner.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from convert.arch.step35 import (
    LAYER_TENSORS, MTP_BLOCK, checkpoint_names, classify, expected_tensors, transformers_name, vllm_names,
)
from convert.config import parse_config
from convert.fixtures import fixture_config
from quant import mtp
from quant.recipe import QUANTIZABLE_ROLES, Recipe
from quant.roles import MTP_OWN_ROLES, Role


def _fixture_cfg():
    return parse_config(fixture_config(), Path("config.json"))


def test_every_checkpoint_tensor_is_one_parameter_of_the_transformers_reference():
    """Mapped through the table, the fixture's tensors are exactly the reference model's parameters (transformers'
    Step3p7 text model, lm_head, and the MTP layers built from Step3p7 decoder layers), fused halves together."""
    from calib.reference import ReferenceModel

    raw = fixture_config()
    with torch.device("meta"):
        params = set(ReferenceModel(raw).state_dict())
    mapped: dict[str, set[int | None]] = {}
    for spec in expected_tensors(_fixture_cfg()):
        ref, part = transformers_name(spec.info.name, raw["num_hidden_layers"])
        mapped.setdefault(ref, set()).add(part)
    assert set(mapped) == params
    assert {ref for ref, parts in mapped.items() if parts != {None}} == {
        f"model.layers.{i}.mlp.experts.gate_up_proj" for i in _fixture_cfg().moe_layers}
    assert all(parts in ({None}, {0, 1}) for parts in mapped.values())


def test_transformers_names_invert(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    n = cfg.num_trunk_layers
    for spec in expected_tensors(cfg):
        ref, part = transformers_name(spec.info.name, n)
        names = checkpoint_names(ref, n)
        assert names[part or 0] == spec.info.name
    assert transformers_name("model.layers.45.self_attn.q_proj.weight", n)[0] == f"mtp.0.{MTP_BLOCK}.self_attn.q_proj.weight"
    assert transformers_name("model.layers.46.transformer.shared_head.output.weight", n)[0] == \
        "mtp.1.transformer.shared_head.output.weight"


@pytest.mark.parametrize("name", ["model.layers.3.mlp.qkv.weight", f"mtp.0.{MTP_BLOCK}.eh_proj.weight",
                                  "mtp.0.self_attn.q_proj.weight", "vision_model.x.weight"])
def test_unknown_transformers_names_are_errors(name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        checkpoint_names(name, 45)


def test_vllm_names_of_mtp_modules_are_the_drafters(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    assert vllm_names(classify("model.layers.45.self_attn.k_proj.weight", cfg)) == [
        "model.layers.45.self_attn.k_proj", "model.layers.45.self_attn.qkv_proj",
        "model.layers.45.mtp_block.self_attn.k_proj", "model.layers.45.mtp_block.self_attn.qkv_proj"]
    assert vllm_names(classify("model.layers.47.transformer.shared_head.output.weight", cfg)) == [
        "model.layers.47.transformer.shared_head.output", "model.layers.47.shared_head.head"]
    assert vllm_names(classify("model.layers.46.eh_proj.weight", cfg)) == ["model.layers.46.eh_proj"]
    assert vllm_names(classify("model.layers.3.share_expert.up_proj.weight", cfg)) == [
        "model.layers.3.share_expert.up_proj", "model.layers.3.share_expert.gate_up_proj"]


def test_the_table_marks_the_mtp_layers_own_tensors():
    assert {row.role for row in LAYER_TENSORS.values() if row.layers == "mtp"} == MTP_OWN_ROLES


# ---- the MTP rule -------------------------------------------------------------------------------------------------
def test_recipes_keep_the_mtp_head_by_the_mtp_rule():
    keep = Recipe.from_dict({"scheme": "nvfp4", "quantize": ["attn_o"]})
    quantize = Recipe.from_dict({"scheme": "nvfp4", "quantize": ["attn_o"], "mtp": "quantize"})
    assert keep.decide(Role.ATTN_O, mtp=True).reason == mtp.KEPT_REASON
    assert keep.decide(Role.ATTN_O, mtp=False).quantize and quantize.decide(Role.ATTN_O, mtp=True).quantize
    assert mtp.layers_kept_whole(keep.mtp, range(45, 48)) == [45, 46, 47]
    assert mtp.layers_kept_whole(quantize.mtp, range(45, 48)) == []
    # the drafter's own linears are not quantizable in any mode
    assert not mtp.ALWAYS_BF16 & QUANTIZABLE_ROLES
    with pytest.raises(ValueError, match="cannot be quantized"):
        Recipe.from_dict({"scheme": "nvfp4", "quantize": ["mtp_head"], "mtp": "quantize"})


@pytest.mark.parametrize("with_mtp, mtp_only", [(True, False), (False, False), (True, True)])
def test_gguf_planner_selects_what_the_mtp_rule_says(bundled_fixture, with_mtp, mtp_only):
    from convert.checkpoint import open_checkpoint
    from convert.gguf_export import plan_tensors

    ckpt = open_checkpoint(bundled_fixture)
    try:
        planned = {p.source for p in plan_tensors(ckpt, "BF16", with_mtp, mtp_only) if p.source}
        wanted = {t.info.name for t in ckpt.tensors.values()
                  if mtp.in_gguf(t.info.role, t.info.layer, t.info.mtp, with_mtp, mtp_only)}
    finally:
        ckpt.close()
    assert planned == wanted
    assert any(ckpt.config.is_mtp(int(n.split(".")[2])) for n in planned if n.startswith("model.layers.")) == with_mtp

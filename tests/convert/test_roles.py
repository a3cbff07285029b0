from collections import Counter
from pathlib import Path

import pytest

from convert.arch.step35 import Role, classify, expected_tensors
from convert.config import parse_config
from convert.errors import BadInput

DATA = Path(__file__).parent.parent / "data"


def _real_inventory() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (DATA / "step35_flash_tensors.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            rows.append((name, tuple(int(d) for d in shape.split("x")), dtype))
    return rows


def test_every_real_tensor_maps_with_the_right_counts(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    rows = _real_inventory()
    assert len(rows) == 804
    infos = [classify(name, cfg) for name, _, _ in rows]
    labels = Counter(i.label for i in infos)
    # 45 trunk layers: 3 dense + 42 MoE; 3 MTP layers (dense MLP); 12 full-attention layers.
    assert labels["attn_q"] == 45 and labels["mtp.attn_q"] == 3
    assert labels["experts_gate"] == labels["experts_up"] == labels["experts_down"] == 42
    assert labels["router"] == labels["router_bias"] == 42
    assert labels["shared_gate"] == labels["shared_up"] == labels["shared_down"] == 42
    assert labels["mlp_gate"] == 3 and labels["mtp.mlp_gate"] == 3
    assert labels["norm"] == 1 + 45 * 4 and labels["mtp.norm"] == 3 * 4
    for r in ("mtp_eh_proj", "mtp_enorm", "mtp_hnorm", "mtp_head_norm", "mtp_head"):
        assert labels[r] == 3
    assert labels["embed"] == labels["lm_head"] == 1
    assert sum(1 for i in infos if not i.mtp) == 753 and sum(1 for i in infos if i.mtp) == 51
    assert all(i.layer in (45, 46, 47) for i in infos if i.mtp)


def test_expected_tensors_match_the_real_inventory(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    expected = {s.info.name: (s.shape, s.dtype) for s in expected_tensors(cfg)}
    real = {name: (shape, dtype) for name, shape, dtype in _real_inventory()}
    assert expected == real


def test_real_config_layout(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    assert cfg.num_trunk_layers == 45 and list(cfg.mtp_layers) == [45, 46, 47]
    assert sorted(cfg.moe_layers) == list(range(3, 45))
    assert cfg.num_heads(0) == 64 and cfg.num_heads(1) == 96 and cfg.num_heads(45) == 96
    assert cfg.swiglu_limits[43] == cfg.swiglu_limits[44] == 7.0 and cfg.swiglu_limits_shared[44] == 16.0
    assert len(cfg.rope_theta) == 48  # MTP tail kept


@pytest.mark.parametrize("name, why", [
    ("model.layers.0.self_attn.qkv_proj.weight", "unknown"),
    ("model.layers.3.mlp.gate_proj.weight", "moe layer"),         # dense MLP name in a MoE layer
    ("model.layers.0.moe.gate.weight", "dense layer"),            # router in a dense layer
    ("model.layers.48.input_layernorm.weight", "out-of-range"),   # beyond trunk + MTP
    ("model.layers.10.eh_proj.weight", "moe layer"),              # MTP tensor in a trunk layer
    ("vision_model.embeddings.weight", "text-only"),             # a vision tensor in a Step-3.5 checkpoint
    ("model.language_model.layers.0.input_layernorm.weight", "re-saved layout"),
])
def test_unmapped_names_are_errors_naming_the_tensor(real_config, name, why):
    cfg = parse_config(real_config, Path("config.json"))
    with pytest.raises(BadInput, match=name.replace(".", r"\.")) as e:
        classify(name, cfg)
    assert why in str(e.value)


def test_unknown_model_type_is_rejected(real_config):
    with pytest.raises(BadInput, match="model_type 'llama'"):
        parse_config({**real_config, "model_type": "llama"}, Path("x/config.json"))


def test_short_per_layer_list_is_rejected(real_config):
    with pytest.raises(BadInput, match="rope_theta.*45 entries, need 48"):
        parse_config({**real_config, "rope_theta": real_config["rope_theta"][:45]}, Path("config.json"))


def test_transformers_config_keeps_the_mtp_tail(real_config):
    cfg = parse_config(real_config, Path("config.json"))
    hf = cfg.hf_text_config()
    assert len(hf.layer_types) == 45 and hf.mtp_layer_types == ["sliding_attention"] * 3
    assert hf.num_key_value_heads == 8


def test_roles_are_complete_on_the_fixture_config():
    from convert.fixtures import fixture_config

    from convert.config import load_config
    from convert.fixtures import STEP37_FIXTURE
    from quant.roles import VISION_ROLES

    cfg = parse_config(fixture_config(), Path("config.json"))
    roles = {s.info.role for s in expected_tensors(cfg)}
    assert roles == set(Role) - VISION_ROLES
    assert {s.info.role for s in expected_tensors(load_config(STEP37_FIXTURE))} == set(Role)  # Step-3.7: all

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from convert.fixtures import fixture_config, write_random_checkpoint


def _index(ckpt):
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _set_index(ckpt, idx):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_random_checkpoint_opens_with_every_role(random_ckpt):
    ckpt = open_checkpoint(random_ckpt)
    assert len(ckpt.tensors) == len(_index(random_ckpt)["weight_map"])
    assert {t.info.layer for t in ckpt if t.info.mtp} == {5, 6}
    order = [(t.shard, t.entry.start) for t in ckpt]
    assert order == sorted(order)  # iteration follows the disk


def test_missing_shard(random_ckpt):
    os.remove(random_ckpt / "model-00002-of-00002.safetensors")
    with pytest.raises(BadInput, match="model-00002-of-00002.safetensors: shard listed .* is missing"):
        open_checkpoint(random_ckpt)


def test_tensor_in_index_but_not_in_shard(random_ckpt):
    idx = _index(random_ckpt)
    idx["weight_map"]["model.layers.0.self_attn.q_proj.weight_extra"] = "model-00001-of-00002.safetensors"
    _set_index(random_ckpt, idx)
    with pytest.raises(BadInput, match="q_proj.weight_extra: listed in .* but not in the shard"):
        open_checkpoint(random_ckpt)


@pytest.mark.parametrize("path", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_weight_map_paths_cannot_leave_the_folder(random_ckpt, path):
    idx = _index(random_ckpt)
    idx["weight_map"]["model.norm.weight"] = path
    _set_index(random_ckpt, idx)
    with pytest.raises(BadInput, match="leaves the model folder"):
        open_checkpoint(random_ckpt)


def test_symlinked_shard_outside_the_folder(random_ckpt, tmp_path):
    shard = random_ckpt / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(BadInput, match="symlink points outside the model folder"):
        open_checkpoint(random_ckpt)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(fixture_config()))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not-loaded")
    with pytest.raises(BadInput, match="only pickle weights .*pytorch_model.bin.*never unpickles"):
        open_checkpoint(d)


def test_unknown_model_type(random_ckpt):
    (random_ckpt / "config.json").write_text(json.dumps(fixture_config(model_type="qwen3_moe")))
    with pytest.raises(BadInput, match="config.json: model_type 'qwen3_moe' is not supported"):
        open_checkpoint(random_ckpt)


def _edit_shard(ckpt, shard, fn):
    path = ckpt / shard
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    idx = _index(ckpt)
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard}
    idx["weight_map"].update({k: shard for k in tensors})
    _set_index(ckpt, idx)


def _shard_of(ckpt, name):
    return _index(ckpt)["weight_map"][name]


def test_shape_disagreeing_with_config(random_ckpt):
    name = "model.layers.2.moe.gate_proj.weight"
    _edit_shard(random_ckpt, _shard_of(random_ckpt, name), lambda t: t.__setitem__(name, t[name][:7].clone()))
    with pytest.raises(BadInput, match=r"tensor model\.layers\.2\.moe\.gate_proj\.weight: shape \[7, 256, 256\] "
                                       r"disagrees with config.json \(\[8, 256, 256\]\)"):
        open_checkpoint(random_ckpt)


def test_tensor_missing_from_role_table(random_ckpt):
    name = "model.layers.1.self_attn.rotary_emb.inv_freq"
    _edit_shard(random_ckpt, _shard_of(random_ckpt, "model.norm.weight"),
                lambda t: t.__setitem__(name, torch.zeros(4)))
    with pytest.raises(BadInput, match=r"rotary_emb\.inv_freq: unknown to the step3p5 role table"):
        open_checkpoint(random_ckpt)


def test_declared_mtp_layer_missing(random_ckpt):
    name = "model.layers.6.eh_proj.weight"
    _edit_shard(random_ckpt, _shard_of(random_ckpt, name), lambda t: t.pop(name))
    with pytest.raises(BadInput, match=r"model\.layers\.6\.eh_proj\.weight: MTP layer declared .* missing"):
        open_checkpoint(random_ckpt)


def test_undeclared_mtp_layer_present(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "m", fixture_config())
    cfg = fixture_config(num_nextn_predict_layers=1)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"model\.layers\.6\..*out-of-range"):
        open_checkpoint(ckpt)


def test_moe_layers_enum_naming_a_layer_without_moe_tensors(random_ckpt):
    (random_ckpt / "config.json").write_text(json.dumps(fixture_config(moe_layers_enum="1,2,3,4")))
    with pytest.raises(BadInput, match=r"model\.layers\.1\.mlp\.\w+_proj\.weight: not expected in layer 1"):
        open_checkpoint(random_ckpt)

"""Step-3.7-Flash: reading (config, vision role table, inspect), the safetensors variants (vision tower and projector
kept BF16 byte for byte, named in every ignore list, config and processor files whole), and its bad inputs through
the real CLI (exit 2, one line naming the file and tensor, nothing written).

The fixture is fixtures/tiny-step37 (the Step-3.5 fixture's trained text stack + a 2-layer vision tower).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.arch.step35 import classify, expected_tensors, vllm_names
from convert.artifact import ArtifactReader
from convert.checkpoint import open_checkpoint
from convert.config import load_config
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, STEP37_FIXTURE
from quant.roles import VISION_ROLES, Role
from stepq.cli import main

VISION_SHARD = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
SCHEMES = ("fp8-block", "fp8-dynamic", "nvfp4", "nvfp4-modelopt")  # the three config formats vLLM reads
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def test_config_reads_text_and_vision():
    cfg = load_config(STEP37_FIXTURE)
    text = json.loads((BUNDLED_FIXTURE / "config.json").read_text())
    assert cfg.model_type == "step3p7" and cfg.is_multimodal
    assert cfg.num_trunk_layers == text["num_hidden_layers"] and cfg.num_mtp_layers == 2
    assert cfg.vocab_size == text["vocab_size"] + 6
    v = cfg.vision
    assert (v.width, v.layers, v.heads, v.intermediate, v.grid, v.image_token_id) == (96, 2, 2, 560, 52, 1536)
    assert cfg.raw["model_type"] == "step3p5" and cfg.file_raw["model_type"] == "step3p7"
    assert not load_config(BUNDLED_FIXTURE).is_multimodal


def test_every_tensor_maps_and_the_text_stack_keeps_its_step35_roles():
    ckpt = open_checkpoint(STEP37_FIXTURE)
    step35 = open_checkpoint(BUNDLED_FIXTURE)
    try:
        text = {n: t.info for n, t in ckpt.tensors.items() if t.info.role not in VISION_ROLES}
        assert text == {n: t.info for n, t in step35.tensors.items()}
        vision = {n: t.info.role for n, t in ckpt.tensors.items() if t.info.role in VISION_ROLES}
        assert set(vision) == {n for n in ckpt.tensors if n.startswith(("vision_model.", "vit_large_projector."))}
        assert vision["vit_large_projector.weight"] is Role.VISION_PROJECTOR
        assert [n for n, r in vision.items() if r is Role.VISION_LINEAR] == sorted(
            f"vision_model.transformer.resblocks.{i}.{s}" for i in range(2)
            for s in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        assert {s.info.name for s in expected_tensors(ckpt.config)} == set(ckpt.tensors)
    finally:
        ckpt.close()
        step35.close()


def test_vision_names_in_engines():
    cfg = load_config(STEP37_FIXTURE)
    qkv = classify("vision_model.transformer.resblocks.1.attn.in_proj_weight", cfg)
    assert vllm_names(qkv) == [f"vision_model.transformer.resblocks.1.attn.{m}"
                               for m in ("in_proj", "qkv_proj", "q_proj", "k_proj", "v_proj")]
    assert vllm_names(classify("vision_model.transformer.resblocks.0.mlp.c_fc.weight", cfg)) == [
        "vision_model.transformer.resblocks.0.mlp.c_fc", "vision_model.transformer.resblocks.0.mlp.fc1"]
    assert vllm_names(classify("vit_large_projector.weight", cfg)) == ["vit_large_projector"]


@pytest.mark.parametrize("name, why", [
    ("vision_model.transformer.resblocks.2.ln_1.weight", "past vision_config's 2 layers"),
    ("vision_model.transformer.resblocks.0.attn.qkv.weight", "unknown to the step3p7 vision role table"),
    ("vit_large_projector.bias", "unknown"),  # projector_bias is false
])
def test_vision_names_the_config_does_not_imply_are_errors(name, why):
    with pytest.raises(BadInput, match=why):
        classify(name, load_config(STEP37_FIXTURE))


def test_inspect_shows_the_vision_tower(capsys):
    assert main(["inspect", str(STEP37_FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "step3p7" in out.splitlines()[0]
    assert "vision: 2 layers, width 96, 2 heads, MLP 560, 728px / 14px patches -> 169 tokens per view" in out
    assert "vision_projector" in out and "vision_linear" in out


# -- the safetensors variants -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("q37")
    arts = {}
    for scheme in SCHEMES:
        assert main(["quantize", str(STEP37_FIXTURE), "--scheme", scheme, "--method", "rtn", "--out", str(out)]) == 0
        arts[scheme] = next(p for p in out.iterdir() if p.name.endswith(scheme.upper()))
    return arts


@pytest.mark.parametrize("scheme", SCHEMES)
def test_vision_side_is_copied_byte_for_byte(artifacts, scheme):
    source = load_file(STEP37_FIXTURE / VISION_SHARD)
    art = ArtifactReader(artifacts[scheme])
    for name, t in source.items():
        got = art.read(name)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), t.view(torch.int16)), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_and_processor_files_are_whole(artifacts, scheme):
    source = json.loads((STEP37_FIXTURE / "config.json").read_text())
    config = json.loads((artifacts[scheme] / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source  # text_config lists whole
    assert len(config["text_config"]["layer_types"]) == 7 and len(config["text_config"]["swiglu_limits"]) == 7
    for f in PROCESSOR_FILES:
        assert (artifacts[scheme] / f).read_bytes() == (STEP37_FIXTURE / f).read_bytes(), f


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ignore_lists_name_every_vision_module(artifacts, scheme):
    q = json.loads((artifacts[scheme] / "config.json").read_text())["quantization_config"]
    ignore = q.get("ignore") or q.get("modules_to_not_convert") or q.get("exclude_modules")
    for i in range(2):
        head = f"vision_model.transformer.resblocks.{i}."
        assert {head + m for m in ("attn.qkv_proj", "attn.out_proj", "mlp.fc1", "mlp.fc2")} <= set(ignore)
    assert "vit_large_projector" in ignore


def test_the_text_stack_is_quantized_as_for_step35(artifacts, tmp_path):
    """Same recipe, same text weights: the Step-3.7 artifact's text tensors equal the Step-3.5 fixture's, except
    the rows the image tokens added to the embeddings and heads."""
    assert main(["quantize", str(BUNDLED_FIXTURE), "--scheme", "fp8-block", "--out", str(tmp_path)]) == 0
    step35, step37 = _stored(tmp_path / "tiny-step35-FP8-BLOCK"), _stored(artifacts["fp8-block"])
    assert set(step35) == {n for n in step37 if not n.startswith(("vision_model.", "vit_large_projector."))}
    for name, a in step35.items():
        b = step37[name]
        if a.shape != b.shape:  # embed_tokens, lm_head, MTP heads: 6 more rows
            assert b.shape[0] == a.shape[0] + 6 and torch.equal(b[:a.shape[0]], a), name
        else:
            assert torch.equal(a, b), name


def _stored(artifact: Path) -> dict[str, torch.Tensor]:
    index = json.loads((artifact / INDEX).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        out |= load_file(artifact / shard)
    return out


def test_a_recipe_cannot_quantize_the_vision_tower(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: v\nscheme: fp8-block\nquantize: [vision_linear]\n")
    assert main(["quantize", str(STEP37_FIXTURE), "--scheme", "fp8-block", "--recipe", str(recipe),
                 "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# -- bad input --------------------------------------------------------------------------------------------------------

def _copy_fixture(tmp_path: Path) -> Path:
    model = tmp_path / "tiny-step37"
    shutil.copytree(STEP37_FIXTURE, model)
    return model


def _edit_vision_shard(model: Path, fn) -> None:
    tensors = load_file(model / VISION_SHARD)
    fn(tensors)
    save_file(tensors, model / VISION_SHARD, metadata={"format": "pt"})
    index = json.loads((model / INDEX).read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != VISION_SHARD} | {
        n: VISION_SHARD for n in tensors}
    (model / INDEX).write_text(json.dumps(index))


def _drop_tower(t):
    for n in [n for n in t if n.startswith("vision_model.")]:
        del t[n]


def _drop_projector(t):
    del t["vit_large_projector.weight"]


def _shrink(t):
    t["vision_model.transformer.resblocks.1.mlp.c_fc.weight"] = t[
        "vision_model.transformer.resblocks.1.mlp.c_fc.weight"][:-1].clone()


@pytest.mark.parametrize("damage, file, tensor, says", [
    (_drop_tower, INDEX, "vision_model.", "expected by config.json but missing"),
    (_drop_projector, INDEX, "vit_large_projector.weight", "expected by config.json but missing"),
    (_shrink, VISION_SHARD, "vision_model.transformer.resblocks.1.mlp.c_fc.weight", r"shape \[559, 96\]"),
])
def test_a_broken_vision_side_is_one_line_exit_2_nothing_written(tmp_path, capsys, damage, file, tensor, says):
    model = _copy_fixture(tmp_path)
    _edit_vision_shard(model, damage)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and file in err[0] and tensor in err[0] and __import__("re").search(says, err[0]), err
    assert not out.exists() or sorted(out.rglob("*")) == []


@pytest.mark.parametrize("edit, says", [
    (lambda c: c.pop("vision_config"), "needs a 'vision_config' object"),
    (lambda c: c.update(image_token_id=99999), "image_token_id 99999 is outside the text vocabulary"),
    (lambda c: c["vision_config"].update(heads=5), "not a vision tower stepq reads"),
])
def test_a_broken_vision_config_is_one_line_exit_2(tmp_path, capsys, edit, says):
    model = _copy_fixture(tmp_path)
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["quantize", str(model), "--scheme", "fp8-block", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0] and says in err[0], err
    assert not (tmp_path / "out").exists()


def test_lm_eval_model_is_the_text_stack():
    """lm-eval's in-memory model of a Step-3.7 source is its text stack: the Step-3.5 fixture's logits, plus the
    image tokens' six columns (the vision tower is not loaded for text tasks)."""
    from eval.forward import in_memory_model

    ids = torch.arange(3, 67).reshape(2, 32)
    logits = {}
    for fixture in (BUNDLED_FIXTURE, STEP37_FIXTURE):
        ckpt = open_checkpoint(fixture)
        try:
            logits[fixture.name] = in_memory_model(ckpt).logits(ids)
        finally:
            ckpt.close()
    assert logits["tiny-step37"].shape[-1] == logits["tiny-step35"].shape[-1] + 6
    assert torch.equal(logits["tiny-step37"][..., :-6], logits["tiny-step35"])


def test_transformers_generates_text_for_an_image():
    """The fixture in transformers' own Step3p7ForConditionalGeneration: a chat with an image (a generated drawing,
    preprocessed and expanded into its placeholder tokens by calib.images) generates text tokens, and the image
    changes what is generated."""
    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer, Step3p7ForConditionalGeneration

    from calib.images import Preprocessor, placeholder_text, plan, preprocess

    tok = AutoTokenizer.from_pretrained(STEP37_FIXTURE)
    model = Step3p7ForConditionalGeneration.from_pretrained(STEP37_FIXTURE, dtype=torch.float32).eval()
    pre = Preprocessor.from_dir(STEP37_FIXTURE)
    image = Image.new("RGB", (1000, 600), "white")
    ImageDraw.Draw(image).ellipse((100, 100, 500, 500), fill="red")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "def describe(image):"}]}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.count("<im_patch>") == 1
    pixels = preprocess(image, pre)
    assert pixels.local is not None and pixels.local.shape[0] == 2  # two 504 px windows + the global view
    ids = tok(text.replace("<im_patch>", placeholder_text(plan(*image.size, pre), pre)), return_tensors="pt").input_ids
    kwargs = {"pixel_values": pixels.global_view}
    if pixels.local is not None:
        kwargs |= {"pixel_values_local": pixels.local, "num_local_patches": [pixels.local.shape[0]]}
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **kwargs)[0, ids.shape[1]:]
        blank = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **{
            k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in kwargs.items()})[0, ids.shape[1]:]
    assert len(out) == 12 and all(t < 1536 for t in out.tolist())  # text tokens, never an image placeholder
    assert tok.decode(out).strip()
    assert not torch.equal(out, blank)

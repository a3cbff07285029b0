"""Images for Step-3.7 (calib/images.py, image sets in calib/data.py, the streamed forward, calibrate and eval).

The references are transformers 5.17's own: the patch plan and placeholder text of Step3p7ImageProcessor /
Step3p7Processor, its PIL-backend resize for the pixels (its torchvision backend cannot be installed here), and
`Step3p7ForConditionalGeneration.from_pretrained(fixture)` for the features and the forward with images. Data: the
committed fixtures/tiny-step37-data (8 + 8 samples) and images generated here.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from calib import images as I
from calib.data import is_image_set, load_calibration
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, STEP37_FIXTURE
from stepq.cli import main

DATA = STEP37_FIXTURE.with_name("tiny-step37-data")
CALIB, EVAL = DATA / "calib.jsonl", DATA / "eval.jsonl"
PRE = I.Preprocessor.from_dir(STEP37_FIXTURE)
# sizes covering every branch of the plan: global view only, elongated within 728 (short side as the window),
# larger than 728 (504 windows, snapping up and down), very elongated (> 4:1), extreme (square-padded), > 3024
SIZES = [(64, 64), (728, 600), (300, 120), (180, 90), (1100, 600), (1600, 900), (2000, 300), (200, 20), (20, 150),
         (4000, 3000), (729, 729), (1200, 1300)]


def drawing(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ImageDraw.Draw(im).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill="red")
    return im


@functools.cache
def from_pretrained(dtype: torch.dtype):
    from transformers import Step3p7ForConditionalGeneration

    return Step3p7ForConditionalGeneration.from_pretrained(STEP37_FIXTURE, dtype=dtype).eval()


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model with its tower's RoPE in the engines' axis order (what stepq's tower computes)."""
    from transformers import Step3p7ForConditionalGeneration

    model = Step3p7ForConditionalGeneration.from_pretrained(STEP37_FIXTURE, dtype=torch.float32).eval()
    I.use_engine_rope_order(model.model.vision_model)
    return model


# ---- preprocessing and placeholder tokens ----------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placeholder_text_is_the_processors(size):
    """The token expansion is what Step3p7Processor.replace_image_token writes for the processor's plan, and the
    number of `<im_patch>` tokens is the features' count."""
    from transformers.models.step3p7.processing_step3p7 import Step3p7Processor

    p = I.plan(*size, PRE)
    processor = SimpleNamespace(  # the attributes Step3p7Processor.__init__ derives from the image processor
        patch_feature_placeholder=I.IMAGE_TOKEN * (PRE.patch_size // PRE.stride) ** 2,
        image_feature_placeholder=I.IMAGE_TOKEN * (PRE.image_size // PRE.stride) ** 2)
    # the image processor's newline mask: padded to the batch's largest patch count, here one image
    inputs = {"num_local_patches": [p.num_patches], "patch_newline_masks": [p.newlines()] if p.num_patches else None}
    want = Step3p7Processor.replace_image_token(processor, inputs, 0)
    assert I.placeholder_text(p, PRE) == want
    assert want.count(I.IMAGE_TOKEN) == I.feature_count(p, PRE)
    tok_ids = {t: 1000 + i for i, t in enumerate(I.PLACEHOLDER_TOKENS)}
    ids = I.placeholder_ids(p, PRE, tok_ids)
    assert "".join(I.PLACEHOLDER_TOKENS[i - 1000] for i in ids) == want


def test_plan_covers_the_branches():
    plans = {s: I.plan(*s, PRE) for s in SIZES}
    assert plans[(64, 64)].num_patches == 0 and plans[(728, 600)].num_patches == 0
    assert plans[(300, 120)].window == 120 and plans[(300, 120)].num_patches == 3  # 60 px left over > 20 %: up
    assert plans[(1100, 600)].window == 504 and (plans[(1100, 600)].nx, plans[(1100, 600)].ny) == (2, 1)
    assert plans[(200, 20)].square_pad and plans[(4000, 3000)].global_wh == (3024, 2268)
    assert sum(p.newlines().count(True) for p in plans.values()) > 0


def _hf_pil_reference(im: Image.Image, p: I.Plan):
    """Step3p7ImageProcessor._get_image_patches + _preprocess: the resizes with transformers' PIL-backend resize,
    the rescale + normalise as its torchvision backend fuses them (`_fuse_mean_std_and_rescale_factor`, then
    torchvision's normalize: subtract, divide)."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_transforms import divide_to_patches, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    mean, std, _ = TorchvisionBackend._fuse_mean_std_and_rescale_factor(
        None, do_normalize=True, image_mean=tuple(PRE.mean), image_std=tuple(PRE.std), do_rescale=True,
        rescale_factor=PRE.rescale_factor)

    def rs(x, wh):
        return resize(x, (wh[1], wh[0]), resample=PILImageResampling.BILINEAR, data_format=first,
                      input_data_format=first)

    def norm(x):
        return ((torch.from_numpy(np.ascontiguousarray(x)).float() - mean[:, None, None]) / std[:, None, None]).numpy()

    x = np.asarray(im).transpose(2, 0, 1)
    if p.square_pad:
        side = max(x.shape[1:])
        x = np.pad(x, ((0, 0), (0, side - x.shape[1]), (0, side - x.shape[2])))
    glob = norm(rs(rs(x, p.global_wh), (PRE.image_size, PRE.image_size)))
    local = [norm(rs(t, (PRE.patch_size, PRE.patch_size))) for t in divide_to_patches(rs(x, p.crop_wh), p.window)] \
        if p.window else []
    return glob, local


@pytest.mark.parametrize("size", [(96, 80), (300, 120), (1100, 600), (200, 20), (1200, 1300)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_match_transformers_pil_backend(size):
    im = drawing(size)
    px = I.preprocess(im, PRE)
    glob, local = _hf_pil_reference(im, px.plan)
    assert torch.equal(px.global_view[0], torch.from_numpy(np.ascontiguousarray(glob)))
    assert (px.local is None) == (not local)
    if local:
        assert torch.equal(px.local, torch.from_numpy(np.stack(local)))


def test_a_bad_image_names_its_sample(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(BadInput, match=r"^sample 3: cannot decode image .*bad\.png"):
        I.open_image(bad, "sample 3")


# ---- features ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_features_are_from_pretrained_bit_for_bit(dtype):
    """Tower + projector from the vision tensors alone (transformers' step3p5_vision conversion applied to them) give
    exactly from_pretrained's get_image_features: local patches first, then the global view."""
    tower, model = I.load_tower_from_dir(STEP37_FIXTURE, dtype, engine_rope=False), from_pretrained(dtype)
    for size in [(1100, 600), (96, 80)]:
        px = I.preprocess(drawing(size, seed=1), PRE)
        mine = tower.features(px)
        with torch.no_grad():
            want = model.model.get_image_features(
                px.global_view.to(dtype), None if px.local is None else px.local.to(dtype),
                [0 if px.local is None else px.local.shape[0]]).pooler_output[0]
        assert mine.shape == (I.feature_count(px.plan, PRE), 256)
        assert torch.equal(mine, want)


def test_the_tower_computes_what_vllm_and_llama_cpp_serve(vision_reference):
    """stepq's tower (transformers' with the engines' RoPE axis order) against vLLM's Perception Encoder formula in
    plain torch (tests/vision_reference.py, which llama.cpp's mmproj also matches): equal to float32 rounding on
    the global view and on a local patch; transformers' own order is far from it."""
    px = I.preprocess(drawing((1100, 600), seed=2), PRE)
    assert px.local is not None
    engines, theirs = I.load_tower_from_dir(STEP37_FIXTURE), I.load_tower_from_dir(STEP37_FIXTURE, engine_rope=False)
    for view in (px.global_view, px.local[:1]):
        with torch.no_grad():
            ref = vision_reference.perception_encoder(STEP37_FIXTURE, view)
            mine = engines.projector(engines.vision_model(view).last_hidden_state)[0]
            hf = theirs.projector(theirs.vision_model(view).last_hidden_state)[0]
        rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
        assert rel(mine) < 1e-5 and rel(hf) > 5e-3, (rel(mine), rel(hf))


def test_the_rope_permutation_matters():
    """The q/k split is not a plain chunk: without transformers' PermuteForRope the rows are in another order."""
    from calib.images import hf_config, vision_state_dict
    from safetensors.torch import load_file

    raw = load_file(STEP37_FIXTURE / "model-00002-of-00002.safetensors")
    cfg = hf_config(json.loads((STEP37_FIXTURE / "config.json").read_text()))
    state = vision_state_dict({k: v for k, v in raw.items() if k.startswith("vision_model.")}, cfg)
    q, k, v = raw["vision_model.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)
    assert torch.equal(state["layers.0.self_attn.v_proj.weight"], v)
    mine = state["layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(mine, q)
    assert torch.equal(mine.float().sum(1).sort().values, q.float().sum(1).sort().values)  # the same rows, reordered


def test_missing_projector_is_bad_input():
    with pytest.raises(BadInput, match=r"no projector \(vit_large_projector"):
        I.load_tower(json.loads((STEP37_FIXTURE / "config.json").read_text()), lambda n: None,
                     ["vision_model.conv1.weight"], where="x")


# ---- image sets -----------------------------------------------------------------------------------------------

def test_image_set_rows_and_features():
    data = load_calibration(STEP37_FIXTURE, str(CALIB), images=True)
    assert is_image_set(str(CALIB)) and not is_image_set(str(BUNDLED_FIXTURE.with_name("tiny-step35-data")))
    assert data.ids.shape == (8, 256) and len(data.images.images) == 8  # N = the 8 samples (default 64 capped)
    image_tokens = (data.ids == data.images.image_token_id).sum(1)
    assert all(int(c) == sum(hi - lo for _, lo, hi in r) for c, r in zip(image_tokens, data.images.rows))
    # each window starts with its own sample's whole image (171 placeholder tokens: global view only)
    starts = [r[0] for r in data.images.rows]
    assert sorted(i for i, _, _ in starts) == list(range(8)) and all(hi - lo == 169 for _, lo, hi in starts)
    assert set(data.dataset["files"]) == {"calib.jsonl", *(f"images/calib-{i}.{'jpg' if i == 3 else 'png'}"
                                                           for i in range(8))}
    assert load_calibration(STEP37_FIXTURE, str(CALIB), images=True, seed=1).ids.tolist() != data.ids.tolist()


def test_image_folder_convention(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    for i, size in enumerate([(80, 60), (300, 120)]):
        drawing(size, i).save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n")
    data = load_calibration(STEP37_FIXTURE, str(folder), seq_len=512, images=True)
    assert data.ids.shape == (2, 512) and len(data.images.images) == 2
    assert {r.features for r in data.images.images} == {169, 169 + 3 * 81}  # the elongated one has 3 local patches
    with pytest.raises(BadInput, match="takes text only"):
        load_calibration(STEP37_FIXTURE, str(folder), seq_len=512)
    with pytest.raises(BadInput, match=r"s1\.png.*take 420 tokens, more than L = 256"):
        load_calibration(STEP37_FIXTURE, str(folder), images=True)
    drawing((40, 40)).save(folder / "lonely.png")
    with pytest.raises(BadInput, match=r"lonely\.png: no text for this image"):
        load_calibration(STEP37_FIXTURE, str(folder), images=True)


def test_image_set_needs_a_vision_tower():
    with pytest.raises(BadInput, match="no vision tower"):
        load_calibration(BUNDLED_FIXTURE, str(CALIB), images=True)


def test_stream_with_images_is_transformers_forward(hf_model):
    """The layer-streamed forward with image features = transformers' Step3p7ForConditionalGeneration on the same
    embeddings (get_image_features, masked_scatter at the image tokens), and far from the text-only forward."""
    from calib.stream import stream_forward
    from convert.checkpoint import open_checkpoint

    data = load_calibration(STEP37_FIXTURE, str(EVAL), n=3, images=True)
    ckpt = open_checkpoint(STEP37_FIXTURE)
    try:
        res = stream_forward(ckpt, data.ids, keep_outputs=True, images=data.images, progress=False)
        text_only = stream_forward(ckpt, data.ids, keep_outputs=True, progress=False)
    finally:
        ckpt.close()
    assert res.vision_runs == len({i for row in data.images.rows for i, _, _ in row})  # once per image
    m = hf_model.model
    for r, placed in enumerate(data.images.rows):
        feats = []
        for i, lo, hi in placed:
            px = I.preprocess(I.open_image(data.images.images[i].path, ""), PRE)
            with torch.no_grad():
                feats.append(m.get_image_features(px.global_view, px.local, [0]).pooler_output[0][lo:hi])
        ids = data.ids[r:r + 1]
        emb = m.get_input_embeddings()(ids).masked_scatter((ids == 1536)[..., None], torch.cat(feats))
        with torch.no_grad():
            want = hf_model(inputs_embeds=emb).logits[0]
        assert (res.logits[r] - want).abs().max() < 1e-4
        assert (text_only.logits[r] - want).abs().max() > 1


def test_router_and_experts_see_the_image_tokens():
    """Same token ids, with and without the image features: every MoE layer's expert token counts differ."""
    from calib.stats import StatsCollector
    from calib.stream import stream_forward
    from convert.checkpoint import open_checkpoint

    data = load_calibration(STEP37_FIXTURE, str(CALIB), n=4, images=True)
    ckpt = open_checkpoint(STEP37_FIXTURE)
    loads = []
    try:
        for images in (data.images, None):
            collector = StatsCollector(ckpt.config)
            stream_forward(ckpt, data.ids, collector, images=images, progress=False)
            tensors, _ = collector.result()
            loads.append(tensors)
    finally:
        ckpt.close()
    with_images, text_only = loads
    counts = [k for k in with_images if k.endswith("moe.expert_load")]
    assert len(counts) == 3  # MoE layers 2, 3, 4
    assert all(with_images[k].sum() == text_only[k].sum() and not torch.equal(with_images[k], text_only[k])
               for k in counts)
    router_inputs = [k for k in with_images if ".moe.gate.input" in k]  # the router input statistics
    assert router_inputs and all(not torch.equal(with_images[k], text_only[k]) for k in router_inputs)


# ---- the commands ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """NVFP4 and FP8 static of the fixture, calibrated on the image set."""
    out = tmp_path_factory.mktemp("s37")
    for scheme in ("nvfp4", "fp8-static"):
        assert main(["quantize", str(STEP37_FIXTURE), "--scheme", scheme, "--dataset", str(CALIB), "--out", str(out),
                     "--device", "cpu"]) == 0
    return out


def test_calibration_metadata_counts_the_images(variants):
    from calib.stats import CalibStats

    stats = CalibStats.load(variants / "tiny-step37-calib" / "stats.safetensors")
    assert stats.meta["images"]["count"] == 8 and stats.meta["images"]["vision_runs"] == 8
    assert stats.meta["images"]["image_tokens"] > 1000
    assert "images/calib-3.jpg" in stats.meta["dataset"]["files"]


@pytest.mark.parametrize("variant", ["NVFP4", "FP8-STATIC"])
def test_eval_reports_text_and_image_kld(variants, variant):
    art = variants / f"tiny-step37-{variant}"
    assert main(["eval", str(art), "--model", str(STEP37_FIXTURE), "--out", str(variants), "--dataset", str(EVAL),
                 "--tasks", "", "--no-speed", "--no-engine-check", "--device", "cpu"]) == 0
    r = json.loads((art / "eval" / "report.json").read_text())
    acc, im = r["accuracy"], r["accuracy"]["image"]
    assert r["text"]["source"].startswith("tiny-step35-data/eval.txt") and acc["positions"] == 16 * 256
    data = load_calibration(STEP37_FIXTURE, str(EVAL), images=True)
    placeholders = torch.tensor([1536 + i for i in range(6)])
    assert im["positions"] == int((~torch.isin(data.ids[:, 1:], placeholders)).sum())
    assert im["set"]["images"] == 8 and im["set"]["image_tokens"] == int((data.ids == 1536).sum())
    assert 0 < im["kld"]["mean"] < 0.1 and 0 < acc["kld"]["mean"] < 0.1 and im["kld"]["mean"] != acc["kld"]["mean"]
    assert 0.8 < im["top1"] <= 1
    assert re.search(r"image-conditioned KLD mean .* \| [\d.e-]+ / ", (art / "eval" / "report.md").read_text())


def test_eval_without_an_image_set_says_so(variants):
    art = variants / "tiny-step37-FP8-STATIC"
    assert main(["eval", str(art), "--model", str(STEP37_FIXTURE), "--out", str(variants), "--tasks", "",
                 "--no-speed", "--no-engine-check", "--device", "cpu", "--num-samples", "2"]) == 0
    r = json.loads((art / "eval" / "report.json").read_text())
    assert r["accuracy"]["image"] == {"not_measured": "no image set (--dataset naming images)"}


@pytest.fixture
def bad_set(tmp_path) -> Path:
    """The eval set with its sixth image's bytes cut short."""
    folder = Path(shutil.copytree(DATA, tmp_path / "data"))
    img = folder / "images" / "eval-5.png"
    img.write_bytes(img.read_bytes()[:60])
    return folder / "eval.jsonl"


@pytest.mark.parametrize("command", ["calibrate", "quantize", "eval"])
def test_a_bad_image_exits_2_naming_the_sample_writes_nothing(command, bad_set, variants, tmp_path, capsys):
    out = tmp_path / "out"
    if command == "eval":
        art = Path(shutil.copytree(variants / "tiny-step37-FP8-STATIC", tmp_path / "tiny-step37-FP8-STATIC"))
        shutil.rmtree(art / "eval", ignore_errors=True)
        before = sorted(p.name for p in tmp_path.iterdir())
        argv = ["eval", str(art), "--model", str(STEP37_FIXTURE), "--tasks", "", "--no-speed", "--no-engine-check"]
    else:
        argv = [command, str(STEP37_FIXTURE), *(["--scheme", "fp8-static"] if command == "quantize" else [])]
    capsys.readouterr()
    assert main([*argv, "--dataset", str(bad_set), "--out", str(out), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"stepq: error: .*eval\.jsonl row 6: cannot decode image .*eval-5\.png",
                                        lines[0]), lines
    assert not out.exists() or sorted(out.rglob("*")) == []
    if command == "eval":
        assert not (art / "eval").exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_text_only_calibration_of_step37_is_step35s(tmp_path):
    """Text calibration works on Step-3.7 as before: the same text stack on the same text gives the Step-3.5
    fixture's statistics exactly (the six image tokens' rows are never looked up)."""
    from calib.stats import CalibStats

    stats = []
    for model in (STEP37_FIXTURE, BUNDLED_FIXTURE):
        assert main(["calibrate", str(model), "--num-samples", "4", "--seq-len", "64", "--out", str(tmp_path),
                     "--device", "cpu", "--dtype", "float32"]) == 0
        stats.append(CalibStats.load(tmp_path / f"{model.name}-calib" / "stats.safetensors"))
    from safetensors.torch import load_file

    a, b = (load_file(s.path) for s in stats)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "images" not in stats[0].meta and stats[0].meta["dataset"] == stats[1].meta["dataset"]

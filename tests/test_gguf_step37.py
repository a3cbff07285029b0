"""GGUF of Step-3.7 (fixtures/tiny-step37: the Step-3.5 fixture's text stack + a 2-layer vision tower) against
llama.cpp itself (the tree vendored in llama-cpp-python 0.3.36, built by `make llama-cpp`).

- the text GGUF is identical to llama.cpp's converter (`Step35Model`, which it registers for
  Step3p7ForConditionalGeneration): BF16 with the MTP head as nextn, Q8_0 without it, the draft-only MTP file;
  K/IQ types (one with an imatrix from stepq's calibration) are identical to `llama-quantize` on that BF16 file;
- the mmproj is identical to the converter's `--mmproj` (`Step3VLVisionModel`): F16, what `make quant-gguf` writes
  beside the text file, and the other types the converter writes. The converter asserts Step3-VL-10B's vision dims
  (width 1536, 47 layers); the fixture's tower is 96 wide with 2 layers, so the reference runs with that one assert
  removed (convert/gguf_tools.py CONVERTER_HARNESS), every other line unchanged;
- the variant folder holds the text file, `mmproj-<model>-F16.gguf` and stepq.json recording both;
- `llama-mtmd-cli` runs the pair on a generated image: the image becomes the tokens transformers' Step-3.7
  processor plans for it (81 per 504-px local window, then the 169-token global view) and text is generated;
- llama.cpp's image embeddings from the mmproj equal the vision tower + projector as vLLM computes them (to the F16
  weights' precision); transformers 5.17 differs from both (its 2-D RoPE swaps the row and column axes;
  stepq's tower swaps them back);
- bad input: a projector bias (llama.cpp's step3vl has no place for it), an mmproj of a text-only model.

Tests needing llama.cpp build it through the Makefile (cached outside the repo); they never skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from calib.stats import CalibStats
from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, STEP37_FIXTURE
from convert.gguf_export import write_gguf
from convert.gguf_imatrix import write_imatrix
from convert.gguf_job import export_gguf, read_tensor_types
from convert.gguf_mmproj import write_mmproj
from convert.gguf_recipe import recipe_for
from convert.gguf_tools import llama_quantize, reference_converter_cmd, tool
from convert.hashing import file_sha256
from eval.gguf_variant import main_file
from stepq.calibrate import calibrate
from stepq.cli import main


DATA = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-step35-data"
TEXT, MMPROJ = "tiny-step37-Q4_K_M.gguf", "mmproj-tiny-step37-F16.gguf"
N_TRUNK, N_MTP = 5, 2


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf37")


@pytest.fixture(scope="module")
def stats(work) -> CalibStats:
    return CalibStats.load(calibrate(STEP37_FIXTURE, str(DATA / "calib.txt"), out_root=work / "calib", n=8,
                                     seq_len=128, progress=False))


@pytest.fixture(scope="module")
def variants(work, llama_cpp, stats) -> dict[str, Path]:
    """Q4_K_M as `make quant-gguf MODEL=fixtures/tiny-step37` writes it (the CLI, default type), IQ2_XS with an
    imatrix, and the draft-only MTP file."""
    out = work / "out"
    assert main(["quantize", str(STEP37_FIXTURE), "--scheme", "gguf", "--out", str(out)]) == 0
    return {"Q4_K_M": out / "tiny-step37-GGUF-Q4_K_M",
            "IQ2_XS": export_gguf(STEP37_FIXTURE, out, "IQ2_XS", imatrix=stats),
            "MTP": export_gguf(STEP37_FIXTURE, out, "Q8_0", mtp_only=True)}


def _reference(out: Path, *args: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(reference_converter_cmd(STEP37_FIXTURE, out, *args), capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, f"llama.cpp's convert_hf_to_gguf.py failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return out


# -- identity with llama.cpp ------------------------------------------------------------------------------------

@pytest.mark.parametrize("outtype,mode", [("BF16", "full"), ("Q8_0", "no-mtp"), ("BF16", "mtp-only")],
                         ids=["BF16", "Q8_0-no-mtp", "BF16-mtp-only"])
def test_text_gguf_identical_to_converter(tmp_path, llama_cpp, gguf_compare, outtype, mode):
    args = ["--outtype", outtype.lower()] + {"full": [], "no-mtp": ["--no-mtp"], "mtp-only": ["--mtp"]}[mode]
    ref = _reference(tmp_path / "ref.gguf", *args)
    ours = write_gguf(STEP37_FIXTURE, tmp_path / "ours.gguf", outtype, mtp=mode != "no-mtp",
                      mtp_only=mode == "mtp-only").files
    assert len(ours) == 1
    gguf_compare.assert_same(ours[0], ref)
    kv = gguf_compare.metadata(ours[0])
    names = {t.name for t in gguf.GGUFReader(ours[0]).tensors}
    assert kv["general.architecture"] == "step35" and kv["step35.embedding_length"] == 256
    assert len(kv["tokenizer.ggml.tokens"]) == 1542 and kv["tokenizer.ggml.tokens"][1536] == "<im_patch>"
    assert not any(n.startswith(("v.", "mm.")) for n in names)  # the vision side is the mmproj's
    mtp = mode != "no-mtp"
    assert kv["step35.block_count"] == N_TRUNK + (N_MTP if mtp else 0)
    assert kv.get("step35.nextn_predict_layers") == (N_MTP if mtp else None)
    assert ({f"blk.{i}.nextn.eh_proj.weight" for i in (5, 6)} <= names) == mtp


@pytest.mark.parametrize("outtype", ["F16", "Q8_0", "BF16", "F32"])
def test_mmproj_identical_to_converter(tmp_path, variants, gguf_compare, outtype):
    """F16 is the file in the variant folder (written in the export's one pass); the other types through
    write_mmproj. Q8_0: the 560-wide MLP rows fall back to F16, the convolutions stay F32, as the converter does."""
    ref = _reference(tmp_path / "ref.gguf", "--mmproj", "--outtype", outtype.lower())
    if outtype == "F16":
        ours = variants["Q4_K_M"] / MMPROJ
    else:
        ckpt = open_checkpoint(STEP37_FIXTURE)
        try:
            ours = write_mmproj(ckpt, tmp_path / "ours.gguf", outtype)
        finally:
            ckpt.close()
    gguf_compare.assert_same(ours, ref)
    kv = gguf_compare.metadata(ours)
    assert (kv["general.architecture"], kv["general.type"], kv["clip.projector_type"]) == ("clip", "mmproj", "step3vl")
    assert (kv["clip.vision.embedding_length"], kv["clip.vision.block_count"], kv["clip.vision.projection_dim"]) == \
        (96, 2, 256)
    types = read_tensor_types([ours])
    assert len(types) == 2 + 1 + 1 + 2 * 14 + 4 + 1  # conv1, ln_pre x2, pos, 14 per block, downsamplers, fc
    assert types["v.position_embd.weight"] == "F32" and types["mm.model.fc.weight"] == outtype
    if outtype == "Q8_0":
        assert types["v.blk.0.ffn_down.weight"] == "F16" and types["mm.0.weight"] == "F32"


def _two_pass(work: Path, qtype: str, stats: CalibStats | None) -> Path:
    """llama.cpp's flow on the text stack: the BF16 GGUF (identical to the converter's, above) (+ the imatrix
    file of the same statistics) -> llama-quantize with the recipe's arguments."""
    work.mkdir(parents=True)
    ckpt = open_checkpoint(STEP37_FIXTURE)
    try:
        recipe = recipe_for(qtype, tuple(ckpt.config.mtp_layers), imatrix=stats is not None,
                            n_embd=ckpt.config.hidden_size)
        inter = write_gguf(ckpt, work / "intermediate-BF16.gguf", "BF16").files[0]
        args = recipe.llama_quantize_args()
        if stats is not None:
            write_imatrix(stats, ckpt, work / "imatrix.gguf")
            args = ["--imatrix", "imatrix.gguf", *args]  # relative, as stepq records it
    finally:
        ckpt.close()
    out = work / f"tiny-step37-{qtype}.gguf"
    llama_quantize(inter, out, qtype, args, cwd=work)
    return out


@pytest.mark.parametrize("qtype", ["Q4_K_M", "IQ2_XS"])
def test_k_iq_types_identical_to_llama_quantize(tmp_path, variants, stats, qtype):
    ref = _two_pass(tmp_path / "ref", qtype, stats if qtype == "IQ2_XS" else None)
    ours = variants[qtype] / f"tiny-step37-{qtype}.gguf"
    assert ours.read_bytes() == ref.read_bytes(), f"{ours.name} differs from llama-quantize's"


# -- the variant folder ------------------------------------------------------------------------------------------

def test_variant_folder(variants):
    q4 = variants["Q4_K_M"]
    assert sorted(p.name for p in q4.iterdir()) == [MMPROJ, "stepq.json", TEXT]
    assert main_file(q4).name == TEXT  # what the GGUF eval opens
    prov = json.loads((q4 / "stepq.json").read_text())
    assert prov["variant"] == "GGUF-Q4_K_M" and prov["mtp_layers"] == [5, 6]
    assert prov["files"] == {f: {"size": (q4 / f).stat().st_size, "sha256": file_sha256(q4 / f)}
                             for f in (TEXT, MMPROJ)}
    assert {"preprocessor_config.json", "processor_config.json", "model-00002-of-00002.safetensors"} <= \
        set(prov["source"]["files"])
    mm = prov["mmproj"]
    assert mm["file"] == MMPROJ and mm["type"] == "F16" and mm["projector_type"] == "step3vl"
    assert {n: d["type"] for n, d in mm["tensors"].items()} == read_tensor_types([q4 / MMPROJ])
    assert {d["source"] for d in mm["tensors"].values()} == {
        n for n in open_checkpoint(STEP37_FIXTURE).tensors if n.startswith(("vision_model.", "vit_large_projector."))}
    # the text file: the Step-3.5 recipe, every text tensor, no vision tensor
    text = read_tensor_types([q4 / TEXT])
    assert set(prov["tensors"]) == set(text) and not set(text) & set(mm["tensors"])
    assert text["blk.5.nextn.eh_proj.weight"] == "Q8_0" and text["blk.2.ffn_up_exps.weight"] == "Q4_K"
    assert json.loads((variants["IQ2_XS"] / "stepq.json").read_text())["imatrix"]["statistics_sha256"]
    # the draft-only MTP folder pairs with a trunk folder: no mmproj of its own
    assert sorted(p.name for p in variants["MTP"].iterdir()) == ["mtp-tiny-step37-Q8_0.gguf", "stepq.json"]


# -- llama.cpp runs the pair on an image -------------------------------------------------------------------------

IMAGE_W, IMAGE_H = 1008, 600  # longer than the 728-px global view: 504-px local windows, 2 x 1 of them


def _expected_image_tokens() -> list[int]:
    """Tokens per encoded chunk in transformers' Step-3.7 processor plan: its `_plan_patches` (pure Python; the
    processor itself needs torchvision) gives the local windows, each 504 px -> 36 x 36 patches -> two stride-2
    convolutions -> 9 x 9 = 81 tokens, then the 728-px global view -> 13 x 13 = 169."""
    from transformers.models.step3p7.image_processing_step3p7 import Step3p7ImageProcessor as P

    pre = json.loads((STEP37_FIXTURE / "preprocessor_config.json").read_text())
    stand_in = SimpleNamespace(max_image_size=pre["max_image_size"], _is_extreme_aspect=P._is_extreme_aspect)
    window = pre["patch_size"]
    nx, ny = P._plan_patches(stand_in, IMAGE_W, IMAGE_H, pre["size"]["height"], window)[3:5]
    per = lambda side: (side // pre["vision_patch_size"] // pre["downsampler_stride"]) ** 2
    return [per(window)] * (nx * ny) + [per(pre["size"]["height"])]


def _mtmd_run(model: Path, mmproj: Path, image: Path) -> tuple[list[int], int, str]:
    """(tokens of each image chunk encoded, tokens generated, generated text) from llama-mtmd-cli, greedy. Its log
    goes through an async logger that can lose the last lines at exit; the run is deterministic, so rerun."""
    args = ["-m", model, "--mmproj", mmproj, "--image", image, "-p", "Describe the picture.", "-n", 8, "--temp", 0,
            "-c", 1024, "-t", 2, "--seed", 1, "-v"]
    for _ in range(4):
        p = subprocess.run([str(tool("llama-mtmd-cli")), *map(str, args)], capture_output=True, text=True,
                           errors="replace", timeout=600, check=False)
        log = p.stdout + p.stderr
        assert p.returncode == 0, f"llama-mtmd-cli exited {p.returncode}:\n{log[-4000:]}"
        chunks = [int(n) for n in re.findall(r"encoding batch with \d+ entries and total (\d+) tokens", log)]
        runs = re.search(r"\beval time =.*?/\s*(\d+) runs", log)
        if chunks and runs:
            return chunks, int(runs.group(1)) + 1, p.stdout  # + the token sampled from the prompt's logits
    pytest.fail(f"no image-encoding or eval summary in 4 runs:\n{log[-4000:]}")


def test_llama_mtmd_cli_runs_the_pair(variants, tmp_path):
    from PIL import Image

    y, x = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    pixels = np.stack([x * 255 // (IMAGE_W - 1), y * 255 // (IMAGE_H - 1), (x ^ y) & 255], -1).astype(np.uint8)
    image = tmp_path / "gradient.png"
    Image.fromarray(pixels).save(image)
    q4 = variants["Q4_K_M"]
    chunks, generated, text = _mtmd_run(q4 / TEXT, q4 / MMPROJ, image)
    assert chunks == _expected_image_tokens() == [81, 81, 169]
    assert generated == 8 and text.strip(), text
    print(f"\nllama-mtmd-cli: image -> {chunks} tokens ({sum(chunks)}), {generated} tokens generated: {text.strip()!r}")


def _llama_cpp_image_embeddings(model: Path, mmproj: Path, image: Path) -> np.ndarray:
    """[tokens, n_embd] the mmproj makes of `image` in llama.cpp (libmtmd through llama-cpp-python's ctypes binding,
    both from the build `make llama-cpp` made): what llama.cpp puts at the image's positions."""
    import ctypes

    from PIL import Image

    from convert.gguf_tools import llama_cpp_dir
    from eval.gguf_logits import import_llama_cpp

    llama_cpp = import_llama_cpp()
    os.environ["MTMD_CPP_LIB"] = str(llama_cpp_dir() / "src" / "build" / "bin")  # read at the binding's import
    from llama_cpp import mtmd_cpp as M
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's loader log, decoded per piece by the binding, splits UTF-8 token texts
    lm = llama_cpp.llama_model_load_from_file(str(model).encode(), llama_cpp.llama_model_default_params())
    params = M.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings = False, 2, False
    ctx = M.mtmd_init_from_file(str(mmproj).encode(), lm, params)
    assert lm and ctx, "llama.cpp did not load the text GGUF and its mmproj"
    im = Image.open(image).convert("RGB")
    rgb = im.tobytes()
    bitmap = M.mtmd_bitmap_init(im.width, im.height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
    chunks = M.mtmd_input_chunks_init()
    try:
        marker = M.mtmd_get_marker(ctx)
        text = M.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        n_embd = llama_cpp.llama_model_n_embd(lm)
        out = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                assert M.mtmd_encode_chunk(ctx, chunk) == 0
                n = M.mtmd_input_chunk_get_n_tokens(chunk)
                embd = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
                out.append(embd.reshape(n, n_embd).copy())  # the context's buffer is reused by the next encode
        return np.concatenate(out)
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)
        llama_cpp.llama_model_free(lm)


def test_mmproj_image_embeddings_match_the_vision_tower(variants, tmp_path, vision_reference):
    """llama.cpp's image embeddings from the mmproj against the vision tower + projector as vLLM computes them
    (tests/vision_reference.py), on a 728 x 728 image (the global view alone, no resize on any side): equal to the F16
    weights' precision.

    transformers 5.17 (calib.images' tower with engine_rope=False, bit-identical to Step3p7ForConditionalGeneration's)
    differs from both by 1.7e-2: its 2-D RoPE gives the first half of each head the row positions where vLLM and
    llama.cpp (step3vl.cpp: build_rope_2d(pos_w, pos_h)) give it the column; stepq's tower (the axes swapped,
    calib.images.EngineOrderRope) equals the reference to float32 rounding."""
    from PIL import Image

    from calib.images import Preprocessor, load_tower_from_dir, preprocess

    y, x = np.mgrid[0:728, 0:728]
    image = tmp_path / "square.png"
    Image.fromarray(np.stack([x * 255 // 727, y * 255 // 727, (x ^ y) & 255], -1).astype(np.uint8)).save(image)
    q4 = variants["Q4_K_M"]
    ours = _llama_cpp_image_embeddings(q4 / TEXT, q4 / MMPROJ, image)

    pixels = preprocess(Image.open(image).convert("RGB"), Preprocessor.from_dir(STEP37_FIXTURE))
    assert pixels.local is None  # a square image of the global view's size: one view, no local patches
    with torch.no_grad():
        ref = vision_reference.perception_encoder(STEP37_FIXTURE, pixels.global_view).numpy()
    transformers_as_is = load_tower_from_dir(STEP37_FIXTURE, engine_rope=False).features(pixels).float().numpy()
    stepq_tower = load_tower_from_dir(STEP37_FIXTURE).features(pixels).float().numpy()  # stepq's tower

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

    assert ours.shape == ref.shape == (169, 256)
    print(f"\nimage embeddings vs vLLM's PerceptionEncoder: llama.cpp (F16 mmproj) {rel(ours):.1e}, transformers "
          f"{rel(transformers_as_is):.1e}, stepq's tower (engine RoPE order) {rel(stepq_tower):.1e}")
    assert rel(ours) < 2e-3  # measured 4.0e-4: F16 weights (an F32 mmproj gives 3.4e-4)
    assert rel(stepq_tower) < 1e-5  # measured 5e-7
    assert rel(transformers_as_is) > 5e-3  # measured 1.7e-2


# -- bad input -------------------------------------------------------------------------------------------------

def test_projector_bias_refused(tmp_path, capsys):
    """A projector bias: the converter drops it without a word and llama.cpp's step3vl graph has none, so the
    mmproj would compute other image embeddings; refused in one line, nothing written."""
    src = tmp_path / "biased"
    shutil.copytree(STEP37_FIXTURE, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["projector_bias"] = True
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    shard = "model-00002-of-00002.safetensors"
    tensors = load_file(src / shard)
    tensors["vit_large_projector.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    save_file(tensors, src / shard, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["vit_large_projector.bias"] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--scheme", "gguf", "--qtype", "Q8_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "vit_large_projector.bias" in err and "projector_bias" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_mmproj_of_a_text_only_model_refused(tmp_path):
    for model, outtype, message in ((BUNDLED_FIXTURE, "F16", "has no vision tower"),
                                    (STEP37_FIXTURE, "Q4_K", "mmproj type 'Q4_K'")):
        ckpt = open_checkpoint(model)
        try:
            with pytest.raises(BadInput, match=message):
                write_mmproj(ckpt, tmp_path / "m.gguf", outtype)
        finally:
            ckpt.close()
    assert not list(tmp_path.iterdir())

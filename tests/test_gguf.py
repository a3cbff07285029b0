"""GGUF export against llama.cpp itself (the tree vendored in llama-cpp-python 0.3.36, built by `make llama-cpp`).

- identical to llama.cpp's own converter: metadata key for key, tensors name/shape/type/bytes, whole file;
- llama.cpp loads and runs every GGUF stepq writes (single file and split, gguf-py types and llama-quantize mixes);
- the BF16 GGUF reproduces the reference forward (calib.reference) on the same tokens: perplexity, KL divergence
  and top-1 agreement, from the log-probs llama-perplexity saves;
- llama.cpp tokenizes like the Hugging Face tokenizer; the MTP head drafts tokens that get accepted, also as a
  draft-only GGUF (`--mtp-only`, identical to the converter's `--mtp`) next to a `--no-mtp` trunk;
- rows that do not fill a type's blocks get llama.cpp's fallback type, recorded in stepq.json.

Tests needing llama.cpp build it through the Makefile (cached outside the repo); they never skip.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from convert.config import parse_config
from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE, fixture_config, write_random_checkpoint
from convert.gguf_export import add_model_metadata, llama3_rope_factors, write_gguf
from convert.gguf_kld import perplexity
from convert.gguf_recipe import fallback_type, recipe_for
from convert.gguf_tools import reference_converter_cmd, tool
from convert.gguf_job import export_gguf, read_tensor_types

REPO = Path(__file__).resolve().parent.parent
EVAL_TEXT = REPO / "fixtures" / "tiny-step35-data" / "eval.txt"
N_CTX, N_CHUNK = 128, 4  # 4 chunks of 128 tokens: 252 scored positions


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny() -> Path:
    if not any(BUNDLED_FIXTURE.glob("*.safetensors")):
        pytest.fail(f"{BUNDLED_FIXTURE}: the bundled fixture has no weights (make fixture)")
    return BUNDLED_FIXTURE


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def artifacts(tiny, work, llama_cpp) -> dict[str, list[Path]]:
    """Every kind of GGUF stepq writes, each as its list of files (first = the one llama.cpp is given)."""
    out = work / "out"
    arts = {"BF16": write_gguf(tiny, work / "bf16" / "tiny-BF16.gguf", "BF16").files}
    q8 = export_gguf(tiny, out, "Q8_0", max_shard_bytes=4_000_000)
    arts["Q8_0-split"] = sorted(q8.glob("*.gguf"))
    for qtype in ("Q4_K_M", "Q6_K", "IQ4_XS"):
        arts[qtype] = sorted(export_gguf(tiny, out, qtype).glob("*.gguf"))
    nomtp = export_gguf(tiny, out / "nomtp", "Q4_K_M", mtp=False, max_shard_bytes=2_000_000)
    arts["Q4_K_M-nomtp-split"] = sorted(nomtp.glob("*.gguf"))
    return arts


def _run(name: str, args: list, timeout: float = 300) -> str:
    p = subprocess.run([str(tool(name)), *map(str, args)], capture_output=True, text=True, errors="replace",
                       timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[-4000:]}"
    return out


# -- identity with llama.cpp's converter ------------------------------------------------------------------------

def _reference_convert(tiny: Path, out: Path, *args: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(reference_converter_cmd(tiny, out, *args), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"llama.cpp's convert_hf_to_gguf.py failed:\n{(p.stdout + p.stderr)[-4000:]}"


@pytest.mark.parametrize("outtype,mode,split", [("BF16", "full", 0), ("Q8_0", "full", 0), ("BF16", "no-mtp", 0),
                                                ("Q8_0", "full", 3_000_000), ("BF16", "mtp-only", 0),
                                                ("Q8_0", "mtp-only", 0)],
                         ids=["BF16", "Q8_0", "BF16-no-mtp", "Q8_0-split", "BF16-mtp-only", "Q8_0-mtp-only"])
def test_identical_to_llama_cpp_converter(tiny, tmp_path, llama_cpp, gguf_compare, outtype, mode, split):
    args = ["--outtype", outtype.lower()] + {"full": [], "no-mtp": ["--no-mtp"], "mtp-only": ["--mtp"]}[mode]
    args += ["--split-max-size", str(split)] if split else []
    _reference_convert(tiny, tmp_path / "ref" / "m.gguf", *args)
    ours = write_gguf(tiny, tmp_path / "ours" / "m.gguf", outtype, mtp=mode != "no-mtp", split_max_bytes=split,
                      mtp_only=mode == "mtp-only").files
    refs = sorted((tmp_path / "ref").glob("*.gguf"))
    assert [p.name for p in ours] == [p.name for p in refs]
    assert len(ours) == (1 if not split else len(refs)) and (not split or len(ours) > 1)
    for o, r in zip(ours, refs):
        gguf_compare.assert_same(o, r)
    kv = gguf_compare.metadata(ours[0])
    n_trunk, n_mtp = 5, 2
    mtp = mode != "no-mtp"
    assert kv["step35.block_count"] == n_trunk + (n_mtp if mtp else 0)
    assert kv.get("step35.nextn_predict_layers") == (n_mtp if mtp else None)
    names = {t.name for f in ours for t in gguf.GGUFReader(f).tensors}
    assert ({f"blk.{i}.nextn.eh_proj.weight" for i in (5, 6)} <= names) == mtp
    # the draft-only file: the MTP blocks, the shared embedding / final norm / output head, rope factors
    assert ({n for n in names if not n.startswith(("blk.5.", "blk.6."))} ==
            {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}) == (mode == "mtp-only")


# -- metadata on the real Step-3.5-Flash config (no weights needed) -----------------------------------------------

def test_real_model_metadata(real_config, tmp_path):
    cfg = parse_config(real_config, tmp_path / "config.json")
    w = gguf.GGUFWriter(None, "step35")
    add_model_metadata(w, cfg, gguf.LlamaFileType.MOSTLY_BF16, mtp=True)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    heads = [64 if i % 4 == 0 and i < 45 else 96 for i in range(48)]
    assert kv["step35.block_count"] == 48 and kv["step35.nextn_predict_layers"] == 3
    assert kv["step35.attention.head_count"] == heads and kv["step35.attention.head_count_kv"] == [8] * 48
    assert kv["step35.attention.sliding_window_pattern"] == [h == 96 for h in heads]
    assert kv["step35.rope.freq_base"] == 5e6 and kv["step35.rope.freq_base_swa"] == 1e4
    assert (kv["step35.expert_count"], kv["step35.expert_used_count"]) == (288, 8)
    assert kv["step35.expert_feed_forward_length"] == kv["step35.expert_shared_feed_forward_length"] == 1280
    assert kv["step35.leading_dense_block_count"] == 3 and kv["step35.feed_forward_length"] == 11264
    assert kv["step35.expert_weights_scale"] == 3.0 and kv["step35.expert_weights_norm"] is True
    assert kv["step35.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert len(kv["step35.swiglu_clamp_exp"]) == 48 and kv["step35.swiglu_clamp_exp"][43:45] == [7.0, 7.0]
    assert "step35.rope.dimension_count" not in kv
    # llama3 factors over the 64 rotary dims of full layers, padded with 1.0 to head_dim/2
    f = llama3_rope_factors(cfg)
    assert f.shape == (64,) and f.dtype == np.float32
    assert np.all(f[:14] == 1.0) and np.all(f[21:32] == 2.0) and np.all(f[32:] == 1.0)
    np.testing.assert_allclose(f[14:21], [1.138, 1.374, 1.576, 1.734, 1.848, 1.926, 1.977], atol=1e-3)

    w = gguf.GGUFWriter(None, "step35")
    add_model_metadata(w, cfg, gguf.LlamaFileType.MOSTLY_BF16, mtp=False)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    assert kv["step35.block_count"] == 45 and "step35.nextn_predict_layers" not in kv
    assert len(kv["step35.attention.head_count"]) == 45


def test_bad_partial_rotary_is_refused(real_config, tmp_path):
    real_config["partial_rotary_factors"] = [1.0] * 48
    cfg = parse_config(real_config, tmp_path / "config.json")
    with pytest.raises(BadInput, match="partial_rotary_factors"):
        add_model_metadata(gguf.GGUFWriter(None, "step35"), cfg, gguf.LlamaFileType.MOSTLY_BF16, mtp=True)


# -- the artifact folder -----------------------------------------------------------------------------------------

def test_artifact_folder_and_recipe(artifacts, work, tiny):
    q4 = artifacts["Q4_K_M"][0].parent
    assert q4.name == "tiny-step35-GGUF-Q4_K_M" and [p.name for p in artifacts["Q4_K_M"]] == ["tiny-step35-Q4_K_M.gguf"]
    assert not list(q4.parent.glob(".*partial*"))
    prov = json.loads((q4 / "stepq.json").read_text())
    assert prov["scheme"] == "gguf" and prov["qtype"] == "Q4_K_M" and prov["mtp_layers"] == [5, 6]
    assert "--tensor-type" in prov["recipe"]["llama_quantize_args"]
    types = read_tensor_types(artifacts["Q4_K_M"])
    assert {n: d["type"] for n, d in prov["tensors"].items()} == types
    for name, d in prov["tensors"].items():
        expect = {**{r: "Q8_0" for r in ("attn_q", "attn_k", "attn_v", "attn_o", "attn_gate", "mlp_gate", "mlp_up",
                                          "mlp_down", "shared_gate", "shared_up", "shared_down", "embed", "lm_head")},
                  "experts_gate": "Q4_K", "experts_up": "Q4_K", "experts_down": "Q5_K", "router": "F32",
                  "router_bias": "F32", "norm": "F32"}.get(d["role"])
        if d["mtp"] and d["type"] != "F32":
            expect = "Q8_0"  # the whole MTP head, incl. its own output head
        if expect:
            assert d["type"] == expect, (name, d)
    assert types["blk.5.nextn.shared_head_head.weight"] == "Q8_0"
    # an existing variant is never overwritten without force
    with pytest.raises(BadInput, match="already exists"):
        export_gguf(tiny, q4.parent, "Q4_K_M")
    nomtp = json.loads((artifacts["Q4_K_M-nomtp-split"][0].parent / "stepq.json").read_text())
    assert nomtp["mtp"] is False and not any(d["mtp"] for d in nomtp["tensors"].values())
    assert len(artifacts["Q4_K_M-nomtp-split"]) > 1 and len(nomtp["files"]) == len(artifacts["Q4_K_M-nomtp-split"])


def test_force_replaces_whole_folder(tiny, tmp_path):
    out = export_gguf(tiny, tmp_path, "BF16")
    (out / "stale.txt").write_text("from an older run")
    with pytest.raises(BadInput, match="already exists"):
        export_gguf(tiny, tmp_path, "BF16")
    assert export_gguf(tiny, tmp_path, "BF16", force=True) == out
    assert sorted(p.name for p in out.iterdir()) == ["stepq.json", "tiny-step35-BF16.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_unsupported_qtypes(tiny, tmp_path):
    with pytest.raises(BadInput, match="importance matrix"):
        export_gguf(tiny, tmp_path, "IQ2_XXS")
    with pytest.raises(BadInput, match="unknown"):
        export_gguf(tiny, tmp_path, "Q9_K")
    assert not list(tmp_path.iterdir())


# -- llama.cpp runs what stepq writes ----------------------------------------------------------------------------

def test_llama_cpp_tokenizes_like_hf(artifacts, tiny, tmp_path):
    text = EVAL_TEXT.read_text(encoding="utf-8")[:6000] + "\n\n  x  1234567 你好 ありがとう <think>ok</think>"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = _run("llama-tokenize", ["-m", artifacts["BF16"][0], "-f", tmp_path / "t.txt", "--ids", "--log-disable",
                                  "--no-bos"])
    ids = json.loads(re.findall(r"^\[.*\]$", out, re.M)[-1])
    from tokenizers import Tokenizer

    expect = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ids == expect


@pytest.fixture(scope="session")
def evaluation(tiny, work, artifacts, gguf_compare) -> dict:
    """N_CHUNK x N_CTX eval tokens (HF tokenizer), the text llama.cpp gets, and the reference forward's
    log-probs (calib.reference) at the positions llama-perplexity scores: N_CTX/2 .. N_CTX-2 of each chunk."""
    from calib.reference import load_reference
    from tokenizers import Tokenizer

    text = EVAL_TEXT.read_text(encoding="utf-8")[: 40 * N_CTX * N_CHUNK]
    (work / "eval.txt").write_text(text, encoding="utf-8")
    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(ids) >= N_CTX * N_CHUNK
    tokens = np.array(ids[: N_CTX * N_CHUNK], dtype=np.int64).reshape(N_CHUNK, N_CTX)
    kv = {k: v for k, v in gguf_compare.metadata(artifacts["BF16"][0]).items() if k.startswith("tokenizer.ggml.")}
    inputs = tokens.copy()
    if kv.get("tokenizer.ggml.add_bos_token"):
        inputs[:, 0] = kv["tokenizer.ggml.bos_token_id"]  # llama-perplexity puts BOS first in every chunk
    model = load_reference(tiny)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs))[0].double()
    first = N_CTX // 2
    logp = torch.log_softmax(logits[:, first:N_CTX - 1], dim=-1).numpy()
    return {"text": work / "eval.txt", "tokens": tokens, "logp": logp, "targets": tokens[:, first + 1:]}


def _llama_logprobs(model: Path, ev: dict, out: Path) -> np.ndarray:
    """llama.cpp's log-probs at the scored positions, from the file `llama-perplexity --kl-divergence-base`
    writes (its stdout summary is unreliable: the tool's async logger can drop the last lines at exit)."""
    _run("llama-perplexity", ["-m", model, "-f", ev["text"], "-c", N_CTX, "-b", N_CTX, "--chunks", N_CHUNK,
                              "--kl-divergence-base", out, "-t", 2])
    raw = out.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", raw, 8)
    assert (n_ctx, n_chunk) == (N_CTX, N_CHUNK)
    off = 20 + 4 * n_ctx * n_chunk
    tokens = np.frombuffer(raw, np.int32, n_ctx * n_chunk, 20).reshape(n_chunk, n_ctx)
    assert (tokens == ev["tokens"]).all(), "llama.cpp tokenized the eval text differently"
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_scored = n_ctx - 1 - n_ctx // 2
    rec = np.frombuffer(raw, np.uint16, n_chunk * n_scored * nv, off).reshape(n_chunk, n_scored, nv)
    head = rec[..., :4].copy().view(np.float32)  # [scale, min_log_prob]
    q = rec[..., 4:4 + n_vocab].astype(np.float64)
    return q * head[..., :1] + head[..., 1:2]  # entries below max - 16 come back as the floor


def _compare(logq: np.ndarray, ev: dict) -> dict:
    logp, t = ev["logp"], ev["targets"]
    nll = -np.take_along_axis(logq, t[..., None], -1)
    nll_ref = -np.take_along_axis(logp, t[..., None], -1)
    kld = (np.exp(logp) * (logp - logq)).sum(-1)
    return {"ppl": float(np.exp(nll.mean())), "ppl_ref": float(np.exp(nll_ref.mean())), "kld": float(kld.mean()),
            "same_top": float((logq.argmax(-1) == logp.argmax(-1)).mean() * 100), "n": int(t.size)}


@pytest.fixture(scope="session")
def llama_runs(artifacts, evaluation, work) -> dict[str, dict]:
    return {kind: _compare(_llama_logprobs(files[0], evaluation, work / f"{kind}.kld"), evaluation)
            for kind, files in artifacts.items()}


def test_every_gguf_loads_and_runs(llama_runs):
    print(f"\nreference forward PPL {llama_runs['BF16']['ppl_ref']:.4f} over {llama_runs['BF16']['n']} tokens")
    for kind, r in llama_runs.items():
        print(f"{kind:20s} PPL {r['ppl']:.4f}  mean KLD {r['kld']:.5f}  same top {r['same_top']:.1f}%")
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and math.isfinite(r["kld"]), kind


def test_bf16_gguf_matches_reference_forward(llama_runs):
    r = llama_runs["BF16"]
    # measured on the bundled fixture: PPL 53.972 vs 53.981, mean KLD < 5e-6, same top 100%
    assert abs(math.log(r["ppl"] / r["ppl_ref"])) < 0.01, r
    assert r["kld"] < 0.002 and r["same_top"] > 97.0, r


def test_quantization_error(llama_runs):
    k = {kind: r["kld"] for kind, r in llama_runs.items()}
    assert all(k["BF16"] < v for kind, v in k.items() if kind != "BF16"), k
    # measured mean KLD: Q8_0 1.4e-4, Q6_K 1.5e-4, Q4_K_M 1.8e-4, IQ4_XS 2.1e-4; 10x headroom
    assert max(k.values()) < 0.002, k
    # dropping the MTP head leaves the trunk untouched: same logits
    assert llama_runs["Q4_K_M-nomtp-split"]["kld"] == pytest.approx(k["Q4_K_M"], abs=1e-9)


def _tensors(files: list[Path]) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for f in files for t in gguf.GGUFReader(f).tensors}


def test_no_mtp_trunk_identical(artifacts):
    full, trunk = _tensors(artifacts["Q4_K_M"]), _tensors(artifacts["Q4_K_M-nomtp-split"])
    assert set(full) - set(trunk) == {n for n in full if re.match(r"blk\.(5|6)\.", n)}
    assert all(full[n] == trunk[n] for n in trunk)


@functools.cache
def _spec_run(model: Path, prompt: str, n_max: int, draft: Path | None = None) -> tuple[int, int, str]:
    """(accepted, drafted) from llama-speculative-simple with the MTP draft (the model's own MTP head, or the
    draft-only GGUF `draft`). Its summary is logged through an async logger that can lose the last lines at exit;
    the generation is deterministic (greedy), so rerun."""
    args = ["-m", model, "--spec-type", "draft-mtp", "--spec-draft-n-max", n_max, "-p", prompt, "-n", 48,
            "--temp", 0, "-c", 512, "-t", 2, "--seed", 1, *(["--spec-draft-model", draft] if draft else [])]
    for _ in range(6):
        out = _run("llama-speculative-simple", args)
        drafted, accepted = re.search(r"n_drafted\s*=\s*(\d+)", out), re.search(r"n_accept\s*=\s*(\d+)", out)
        if drafted and accepted:
            return int(accepted.group(1)), int(drafted.group(1)), out
    pytest.fail(f"no n_drafted/n_accept summary in 6 runs:\n{out[-3000:]}")


def test_mtp_draft_accepted(artifacts):
    prompt = EVAL_TEXT.read_text(encoding="utf-8")[:400]
    results = {}
    for kind in ("BF16", "Q4_K_M"):
        accepted, drafted, out = _spec_run(artifacts[kind][0], prompt, 2)
        assert "creating MTP draft context" in out, out[-3000:]
        assert drafted > 0 and accepted > 0, (kind, accepted, drafted)
        results[kind] = f"{accepted}/{drafted} ({100 * accepted / drafted:.1f}%)"
    print("\nMTP draft (2 heads) accepted/drafted:", results)


def test_mtp_draft_only_gguf(artifacts, tiny, work):
    """`--mtp-only`: the draft-only GGUF in its own variant folder; llama.cpp runs the --no-mtp trunk with it as
    `--spec-draft-model` through the draft-mtp path, drafting and accepting exactly what the file with both does."""
    out = export_gguf(tiny, work / "out", "Q4_K_M", mtp_only=True)
    assert out.name == "tiny-step35-GGUF-Q4_K_M-MTP"
    files = sorted(out.glob("*.gguf"))
    assert [f.name for f in files] == ["mtp-tiny-step35-Q4_K_M.gguf"]
    prov = json.loads((out / "stepq.json").read_text())
    assert prov["mtp_only"] is True and prov["variant"] == "GGUF-Q4_K_M-MTP" and prov["mtp_layers"] == [5, 6]
    draft, full = _tensors(files), _tensors(artifacts["Q4_K_M"])
    assert set(draft) == {n for n in full if re.match(r"blk\.(5|6)\.", n)} | {
        "token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    assert all(draft[n] == full[n] for n in draft)  # same recipe, same bytes as in the full Q4_K_M file
    assert {d["type"] for d in prov["tensors"].values()} == {"Q8_0", "F32"}

    prompt = EVAL_TEXT.read_text(encoding="utf-8")[:400]
    accepted, drafted, log = _spec_run(artifacts["Q4_K_M-nomtp-split"][0], prompt, 2, files[0])
    assert "loading draft model" in log and str(files[0]) in log, log[-3000:]
    assert drafted > 0 and accepted > 0
    assert (accepted, drafted) == _spec_run(artifacts["Q4_K_M"][0], prompt, 2)[:2]
    print(f"\nMTP draft-only file with the --no-mtp trunk: {accepted}/{drafted} accepted")


def test_mtp_only_cli_and_bad_input(tiny, tmp_path, capsys):
    from stepq.cli import main

    common = ["quantize", str(tiny), "--scheme", "gguf", "--qtype", "Q8_0", "--out", str(tmp_path)]
    assert main([*common, "--mtp-only"]) == 0
    out = tmp_path / "tiny-step35-GGUF-Q8_0-MTP"
    assert sorted(p.name for p in out.iterdir()) == ["mtp-tiny-step35-Q8_0.gguf", "stepq.json"]
    assert capsys.readouterr().out.strip() == str(out)
    assert main([*common, "--mtp-only", "--no-mtp", "--force"]) == 2
    assert capsys.readouterr().err == "stepq: error: --mtp-only writes the MTP head, --no-mtp drops it: pass one " \
                                      "of them\n"
    shutil.rmtree(out)
    nomtp = write_random_checkpoint(tmp_path / "nomtp", fixture_config(num_nextn_predict_layers=0), num_shards=1)
    with pytest.raises(BadInput, match="needs the MTP layers"):
        write_gguf(nomtp, tmp_path / "x.gguf", "BF16", mtp_only=True)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*-GGUF-*"))


# -- rows that do not fill a type's blocks --------------------------------------------------------------------------

# rows of 160 (hidden, routed expert width: multiples of 32, not of 256) and 200 (shared expert: not of 32)
ODD_DIMS = {"hidden_size": 160, "moe_intermediate_size": 160, "share_expert_dim": 200}
# Q3_K_M mix on those rows, role -> (requested, written): llama.cpp's tensor_type_fallback
ODD_Q3_K_M = {"experts_gate": ("Q3_K", "Q4_0"), "experts_up": ("Q3_K", "Q4_0"), "experts_down": ("Q4_K", "Q5_0"),
              "shared_down": ("Q6_K", "F16"), "attn_o": ("Q6_K", "Q6_K"), "mlp_down": ("Q6_K", "Q6_K")}


@pytest.fixture(scope="session")
def odd(work) -> Path:
    """A random Step-3.5 checkpoint with ODD_DIMS and the fixture's tokenizer."""
    d = write_random_checkpoint(work / "odd-step35", fixture_config(**ODD_DIMS), num_shards=1)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(BUNDLED_FIXTURE / f, d / f)
    return d


def _odd_expected(d: dict) -> tuple[str, str]:
    role = d["role"]
    if "norm" in role or role in ("router", "router_bias", "rope_freqs"):
        return "F32", "F32"
    if d["mtp"]:
        return "Q8_0", "Q8_0"  # MTP rows (160, 320, 512) all fill Q8_0's 32-blocks
    return ODD_Q3_K_M.get(role, ("Q6_K", "Q8_0"))  # the rest: rows of 160, Q6_K -> Q8_0


def test_row_size_fallback_recorded(odd, work, llama_cpp):
    """Q3_K_M through llama-quantize: every tensor gets the recipe's type or llama.cpp's fallback for its row
    length (embeddings/output included, which llama-quantize leaves to the caller), recorded in stepq.json;
    llama.cpp runs the result."""
    out = export_gguf(odd, work / "odd-out", "Q3_K_M")
    prov = json.loads((out / "stepq.json").read_text())
    types = read_tensor_types(sorted(out.glob("*.gguf")))
    fallbacks = set()
    for name, d in prov["tensors"].items():
        requested, written = _odd_expected(d)
        assert (d["requested"], d["type"], types[name]) == (requested, written, written), (name, d)
        if requested != written:
            fallbacks.add(name)
            assert d["fallback"] == {"from": requested, "to": written, "row": d["shape"][-1],
                                     "block": 256}, (name, d)
            assert "fallback" in d["reason"] and str(d["shape"][-1]) in d["reason"]
    assert set(prov["fallbacks"]) == fallbacks
    assert {"token_embd.weight", "output.weight", "blk.2.ffn_down_exps.weight", "blk.3.ffn_down_shexp.weight",
            "blk.4.ffn_up_exps.weight"} <= fallbacks
    ppl = perplexity(min(out.glob("*.gguf")), EVAL_TEXT, 128, 2)
    assert math.isfinite(ppl) and ppl > 1


def test_row_size_fallback_direct_type(odd, work, tmp_path, llama_cpp, gguf_compare):
    """Q8_0 written by gguf-py: rows of 200 fall back to F16, as llama.cpp's converter does (identical file),
    recorded in stepq.json."""
    _reference_convert(odd, tmp_path / "ref.gguf", "--outtype", "q8_0")
    out = export_gguf(odd, work / "odd-out", "Q8_0")
    files = sorted(out.glob("*.gguf"))
    ours = write_gguf(odd, tmp_path / "ours.gguf", "Q8_0").files[0]
    gguf_compare.assert_same(ours, tmp_path / "ref.gguf")
    assert _tensors(files) == _tensors([ours])
    prov = json.loads((out / "stepq.json").read_text())
    assert prov["fallbacks"] == [f"blk.{i}.ffn_down_shexp.weight" for i in (2, 3, 4)]
    for name in prov["fallbacks"]:
        assert prov["tensors"][name]["fallback"] == {"from": "Q8_0", "to": "F16", "row": 200, "block": 32}
    assert all(d["type"] in ("Q8_0", "F32") for n, d in prov["tensors"].items() if n not in prov["fallbacks"])
    ppl = perplexity(files[0], EVAL_TEXT, 128, 2)
    assert math.isfinite(ppl) and ppl > 1


def test_recipe_fallback_table_and_imatrix_rule():
    # llama.cpp's tensor_type_fallback: block 256 types -> a 32-block type, F16 when that does not fit either
    assert [fallback_type(t, 160) for t in ("IQ2_XS", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")] == \
        ["IQ4_NL", "IQ4_NL", "Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert [fallback_type(t, 200) for t in ("IQ2_XS", "Q4_K", "Q8_0", "BF16")] == ["F16", "F16", "F16", "BF16"]
    assert fallback_type("Q4_K", 4096) == "Q4_K"
    r = recipe_for("Q3_K_M", (5, 6), n_embd=160)
    assert r.llama_quantize_args()[:4] == ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
    # imatrix-only types: refused without one, in one line naming the type; a draft-only file of them is not
    # (its MTP blocks are Q8_0, and llama.cpp exempts embeddings/output)
    for qtype in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ1_S", "IQ1_M"):
        with pytest.raises(BadInput, match=rf"^{qtype} needs an importance matrix: pass --imatrix \(calibrates "
                                           rf"first\)$"):
            recipe_for(qtype.lower())
        assert recipe_for(qtype, imatrix=True).imatrix is True
        assert recipe_for(qtype, mtp_only=True).imatrix_only_types(mtp_only=True) == []
    assert recipe_for("IQ3_S").imatrix_only_types() == []

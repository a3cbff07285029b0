"""GGUF measurements of the eval stage on the bundled fixture, against llama.cpp built by `make llama-cpp`:

- logits through llama-cpp-python (the cached sdist's binding over the cached libllama) match the reference forward
  (calib.reference) for the BF16 GGUF, and quantization error grows BF16 < Q8_0 < Q4_K_M;
- the GGUF's MTP head drafts tokens that llama.cpp accepts;
- llama-bench figures and the quant/BF16 speed ratios.

Tests needing llama.cpp build it through the Makefile (cached outside the repo); they never skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE
from convert.gguf_tools import LLAMA_CPP_PYTHON_VERSION
from eval.gguf_logits import LlamaCppModel, gguf_mtp_acceptance, import_llama_cpp
from eval.schema import not_measured
from eval.speed import llama_bench, speed_ratios, vllm_available, vllm_speed
from convert.gguf_job import export_gguf

REPO = Path(__file__).resolve().parents[2]
EVAL_TEXT = REPO / "fixtures" / "tiny-step35-data" / "eval.txt"
N_SEQ, SEQ_LEN = 4, 256
QTYPES = ("BF16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def ggufs(llama_cpp, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-eval")
    return {q: next(export_gguf(BUNDLED_FIXTURE, out, q).glob("*.gguf")) for q in QTYPES}


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """N_SEQ x SEQ_LEN held-out token ids, tokenized once by the HF tokenizer and fed to both sides as they are."""
    from tokenizers import Tokenizer

    text = EVAL_TEXT.read_text(encoding="utf-8")[: 40 * N_SEQ * SEQ_LEN]
    ids = Tokenizer.from_file(str(BUNDLED_FIXTURE / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(ids) >= N_SEQ * SEQ_LEN
    return torch.tensor(ids[: N_SEQ * SEQ_LEN]).view(N_SEQ, SEQ_LEN)


@pytest.fixture(scope="module")
def reference_logp(held_out) -> torch.Tensor:
    from calib.reference import load_reference

    with torch.no_grad():
        return torch.log_softmax(load_reference(BUNDLED_FIXTURE)(held_out)[0].double(), -1)


@pytest.fixture(scope="module")
def gguf_vs_reference(ggufs, held_out, reference_logp) -> dict[str, dict]:
    """Per qtype: mean / median KLD(reference || GGUF), top-1 agreement and PPL ratio over every position."""
    out = {}
    for qtype, path in ggufs.items():
        with LlamaCppModel(path) as model:
            logits = model.logits(held_out)
            assert logits.shape == (N_SEQ, SEQ_LEN, model.vocab_size) and logits.dtype == torch.float32
            # rows are independent: a row alone gives the same logits (the KV cache is cleared between rows)
            assert torch.equal(model.logits(held_out[2:3])[0], logits[2])
        logq, logp = torch.log_softmax(logits.double(), -1), reference_logp
        kld = (logp.exp() * (logp - logq)).sum(-1)
        targets = held_out[:, 1:, None]
        nll_q, nll_p = -logq[:, :-1].gather(-1, targets).mean(), -logp[:, :-1].gather(-1, targets).mean()
        out[qtype] = {"kld": kld.mean().item(), "kld_median": kld.median().item(),
                      "top1": (logq.argmax(-1) == logp.argmax(-1)).double().mean().item(),
                      "ppl_ratio": (nll_q - nll_p).exp().item()}
    print(f"\nGGUF vs reference forward, {N_SEQ} x {SEQ_LEN} tokens:")
    for qtype, r in out.items():
        print(f"  {qtype:7s} KLD mean {r['kld']:.3e} median {r['kld_median']:.2e} top-1 {100 * r['top1']:.2f}% "
              f"PPL ratio {r['ppl_ratio']:.5f}")
    return out


def test_binding_is_the_cached_sdist(llama_cpp):
    binding, built = import_llama_cpp(), llama_cpp
    assert binding.__version__ == LLAMA_CPP_PYTHON_VERSION
    assert Path(binding.__file__).is_relative_to(built / "python")
    lib = Path(binding.llama_cpp._lib._name)
    assert lib == built / "src" / "build" / "bin" / "libllama.so"
    assert os.environ["LLAMA_CPP_LIB_PATH"] == str(lib.parent)
    # both halves written by the same `make llama-cpp` from the same sdist version
    for stamp in (built / ".stepq-built", built / "python" / ".stepq-extracted"):
        assert stamp.read_text().startswith(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "), stamp


def test_missing_binding_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(BadInput, match="run `make llama-cpp`"):
        import_llama_cpp()


def test_bf16_gguf_logits_match_reference_forward(gguf_vs_reference):
    # measured: mean 1.1e-4 (a few positions where BF16 activations flip a near-tied expert choice), median 1.2e-6,
    # top-1 99.6%, PPL ratio 0.99934; the bounds sit ~3x above
    r = gguf_vs_reference["BF16"]
    assert r["kld"] < 3e-4 and r["kld_median"] < 5e-6, r
    assert r["top1"] > 0.99, r
    assert abs(r["ppl_ratio"] - 1) < 2e-3, r


def test_quantization_error_grows_with_fewer_bits(gguf_vs_reference):
    # measured mean KLD: BF16 1.1e-4 < Q8_0 3.5e-4 < Q4_K_M 4.0e-4 (medians 1.2e-6 < 2.6e-5 < 4.9e-5)
    r = gguf_vs_reference
    assert r["BF16"]["kld"] < r["Q8_0"]["kld"] < r["Q4_K_M"]["kld"], r
    assert r["BF16"]["kld_median"] < r["Q8_0"]["kld_median"] < r["Q4_K_M"]["kld_median"], r
    assert 1e-4 < r["Q8_0"]["kld"] < 1e-3 and r["Q4_K_M"]["kld"] < 5e-3, r


def test_mtp_head_drafts_accepted_tokens(ggufs, tmp_path):
    text = EVAL_TEXT.read_text(encoding="utf-8")
    prompts = [text[100_000:100_400], text[200_000:200_400]]
    r = gguf_mtp_acceptance(ggufs["BF16"], prompts, n_predict=32)
    print(f"\nMTP (head 1) on BF16 GGUF: {r}")
    assert r["prompts"] == 2 and r["n_draft"] == 1
    assert 0 < r["accepted"] <= r["drafted"] and r["acceptance"] == r["accepted"] / r["drafted"], r
    nomtp = next(export_gguf(BUNDLED_FIXTURE, tmp_path, "Q8_0", mtp=False).glob("*.gguf"))
    with pytest.raises(BadInput, match="no MTP layers"):
        gguf_mtp_acceptance(nomtp, prompts[0], n_predict=8)


def test_llama_bench_and_ratios(ggufs):
    bf16, q4 = str(ggufs["BF16"]), str(ggufs["Q4_K_M"])
    result = llama_bench([bf16, q4], reps=2, n_prompt=64, n_gen=16)
    assert set(result) == {bf16, q4}
    for path, r in result.items():
        for test in ("pp64", "tg16"):
            assert len(r[test]["samples"]) == 2 and r[test]["ts"] > 0 and r[test]["stddev"] >= 0, (path, r)
        assert r["n_threads"] >= 1 and r["cpu_info"] and "build_commit" in r, r
    assert result[q4]["model_size"] < result[bf16]["model_size"]
    ratios = speed_ratios(result[q4], result[bf16])
    assert set(ratios) == {"pp64", "tg16"}
    assert ratios["tg16"] == pytest.approx(result[q4]["tg16"]["ts"] / result[bf16]["tg16"]["ts"])
    print(f"\nllama-bench Q4_K_M/BF16: {ratios}")


def test_vllm_speed_needs_gpu_and_vllm():
    measurable = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    assert vllm_available() == measurable
    if not measurable:  # the GPU path has never run here (see vllm_speed)
        assert vllm_speed() == not_measured("no GPU/vLLM")

"""llama.cpp imatrix from stepq's calibration statistics (`convert.gguf_imatrix.write_imatrix`).

- the file reads back (gguf-py) with exactly the statistics' sums and token counts, per expert for `*_exps`;
- `llama-quantize --imatrix` accepts it for a type that requires an imatrix (IQ2_XS refuses to run without one);
- `stepq quantize --qtype IQ2_XS` refuses in one line without `--imatrix`, and with stepq's statistics writes the
  MoE-aware IQ2_XS mix (types read back = the recipe's) that `llama-perplexity` runs on held-out text;
- against `llama-imatrix` on the same calibration text: ours has every entry llama-imatrix writes (same names and
  layout), and the KL divergence vs the BF16 GGUF of Q4_K_M with ours is finite and not worse than without an
  imatrix beyond noise. The table (no imatrix / llama-imatrix / ours) is printed (`pytest -s`).

The llama.cpp tools are built through `make llama-cpp` (cached outside the repo), as in test_gguf.py; never skipped.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from calib.stats import CalibStats
from convert.checkpoint import open_checkpoint
from convert.fixtures import BUNDLED_FIXTURE
from convert.gguf_export import write_gguf
from convert.gguf_imatrix import imatrix_entries, write_imatrix
from convert.gguf_kld import kld, kld_base, llama_imatrix, perplexity, quantize, threads
from convert.gguf_tools import run, tool
from stepq.calibrate import calibrate
from convert.gguf_job import export_gguf, read_tensor_types

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "fixtures" / "tiny-step35-data"
CALIB_N, CALIB_LEN = 16, 256  # stepq calibration: 16 x 256 tokens of calib.txt; llama-imatrix: -c 256 --chunks 16
KLD_CTX, KLD_CHUNKS = 256, 8  # KLD on 8 x 256 tokens of eval.txt


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    if not any(BUNDLED_FIXTURE.glob("*.safetensors")):
        pytest.fail(f"{BUNDLED_FIXTURE}: the bundled fixture has no weights (make fixture)")
    return tmp_path_factory.mktemp("imatrix")


@pytest.fixture(scope="module")
def stats(work) -> CalibStats:
    path = calibrate(BUNDLED_FIXTURE, str(DATA / "calib.txt"), out_root=work / "out", n=CALIB_N, seq_len=CALIB_LEN,
                     progress=False)
    return CalibStats.load(path)


@pytest.fixture(scope="module")
def ours(stats, work) -> Path:
    return write_imatrix(stats, BUNDLED_FIXTURE, work / "ours.imatrix.gguf")


@pytest.fixture(scope="module")
def bf16(work) -> Path:
    return write_gguf(BUNDLED_FIXTURE, work / "tiny-BF16.gguf", "BF16").files[0]


@pytest.fixture(scope="module")
def eval_text(work) -> Path:
    """The head of eval.txt, enough for KLD_CHUNKS x KLD_CTX tokens."""
    text = (DATA / "eval.txt").read_text()
    p = work / "eval-head.txt"
    p.write_text(text[:8 * KLD_CTX * KLD_CHUNKS])  # the fixture tokenizer: ~6 bytes per token
    return p


def _read(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    r = gguf.GGUFReader(path)
    return r, {t.name: np.array(t.data) for t in r.tensors}


# -- 1. the file holds the statistics ------------------------------------------------------------------------------

def test_imatrix_values_equal_statistics(stats, ours, work):
    r, t = _read(ours)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == [str(DATA / "calib.txt")]
    assert r.fields["imatrix.chunk_count"].contents() == CALIB_N
    assert r.fields["imatrix.chunk_size"].contents() == CALIB_LEN
    assert all(v.dtype == np.float32 for v in t.values())

    cases = {  # gguf name -> (stats module, experts or None)
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj", None),
        "blk.1.attn_gate.weight": ("model.layers.1.self_attn.g_proj", None),
        "blk.2.attn_output.weight": ("model.layers.2.self_attn.o_proj", None),
        "blk.1.ffn_down.weight": ("model.layers.1.mlp.down_proj", None),
        "blk.3.ffn_up_shexp.weight": ("model.layers.3.share_expert.up_proj", None),
        "blk.2.ffn_gate_inp.weight": ("model.layers.2.moe.gate", None),
        "blk.2.ffn_gate_exps.weight": ("model.layers.2.moe.gate_proj", 8),
        "blk.4.ffn_down_exps.weight": ("model.layers.4.moe.down_proj", 8),
        "output.weight": ("lm_head", None),
        "blk.5.nextn.eh_proj.weight": ("model.layers.5.eh_proj", None),
        "blk.6.nextn.shared_head_head.weight": ("model.layers.6.transformer.shared_head.output", None),
    }
    for name, (module, experts) in cases.items():
        sums, counts = t[name + ".in_sum2"], t[name + ".counts"]
        if experts is None:
            assert sums.shape == (stats.channel_sumsq(module).numel(),) and counts.shape == (1,), name
            np.testing.assert_array_equal(sums, stats.channel_sumsq(module).float().numpy(), err_msg=name)
            assert counts[0] == stats.tokens(module), name
        else:
            assert sums.shape[0] == counts.shape[0] == experts, name
            for e in range(experts):
                np.testing.assert_array_equal(sums[e], stats.channel_sumsq(module, e).float().numpy(), err_msg=name)
                assert counts[e, 0] == stats.tokens(module, e), name
            assert counts.sum() == stats.tokens(module)  # expert=None on a stack: the sum over experts
            assert len(set(counts.ravel().tolist())) > 1  # really per expert, not one count repeated

    # every quantizable matrix of the model is covered; the embedding (a lookup) is not
    n_linear = sum(1 for n in t if n.endswith(".in_sum2"))
    assert "token_embd.weight.in_sum2" not in t
    assert n_linear == len(stats.modules())  # every statistics module is a weight of this model

    # a Checkpoint, its config or the folder give the same file; mtp=False drops the MTP blocks
    ckpt = open_checkpoint(BUNDLED_FIXTURE)
    try:
        via_cfg = write_imatrix(stats, ckpt.config, work / "cfg.imatrix.gguf")
        via_ckpt = write_imatrix(stats, ckpt, work / "ckpt.imatrix.gguf")
        _, missing = imatrix_entries(stats, ckpt)
    finally:
        ckpt.close()
    assert via_cfg.read_bytes() == via_ckpt.read_bytes() == ours.read_bytes()
    assert missing == []
    _, nomtp = _read(write_imatrix(stats, BUNDLED_FIXTURE, work / "nomtp.imatrix.gguf", mtp=False))
    assert not any(n.startswith(("blk.5.", "blk.6.")) for n in nomtp)
    assert set(nomtp) == {n for n in t if not n.startswith(("blk.5.", "blk.6."))}


# -- 2. llama.cpp uses it where an imatrix is required --------------------------------------------------------------

def test_llama_quantize_requires_imatrix_for_iq2(llama_cpp, ours, bf16, work):
    # without an imatrix llama-quantize refuses IQ2_XS; with ours it reads every entry
    p = subprocess.run([str(tool("llama-quantize")), bf16, work / "none-IQ2_XS.gguf", "IQ2_XS", str(threads())],
                       capture_output=True, text=True, errors="replace", check=False)
    assert p.returncode != 0 and "requires an imatrix" in p.stdout + p.stderr
    out = run("llama-quantize", ["--imatrix", ours, bf16, work / "ours-IQ2_XS.gguf", "IQ2_XS", threads()])
    log = out.stdout + out.stderr
    assert "loaded 73 importance matrix entries" in log, log[-2000:]
    assert "did not find weights" not in log.replace("did not find weights for token_embd.weight", "")
    r = gguf.GGUFReader(work / "ours-IQ2_XS.gguf")
    assert r.fields["quantize.imatrix.entries_count"].contents() == 73


IQ2_XS_MIX = {"experts_gate": "IQ2_XS", "experts_up": "IQ2_XS", "experts_down": "IQ2_S", "router": "F32",
              "router_bias": "F32", "norm": "F32", "rope_freqs": "F32"}  # everything else Q6_K, MTP head Q8_0


def test_iq2_xs_export_with_stepq_imatrix(llama_cpp, stats, eval_text, work, capsys):
    """`stepq quantize --qtype IQ2_XS`: refused in one line without --imatrix; with stepq's statistics the
    MoE-aware IQ2_XS mix is written, reads back with the recipe's types, and llama.cpp runs it."""
    from stepq.cli import main

    assert main(["quantize", str(BUNDLED_FIXTURE), "--scheme", "gguf", "--qtype", "IQ2_XS",
                 "--out", str(work / "refused")]) == 2
    err = capsys.readouterr().err
    assert err == "stepq: error: IQ2_XS needs an importance matrix: pass --imatrix (calibrates first)\n"
    assert not (work / "refused").exists()

    out = export_gguf(BUNDLED_FIXTURE, work / "out", "IQ2_XS", imatrix=stats)
    files = sorted(out.glob("*.gguf"))
    prov = json.loads((out / "stepq.json").read_text())
    assert prov["recipe"]["imatrix"] == "stepq calibration statistics"
    assert prov["imatrix"]["statistics_sha256"] == stats.sha256
    types = read_tensor_types(files)
    assert set(types) == set(prov["tensors"])
    for name, d in prov["tensors"].items():
        if "norm" in d["role"]:  # norm, mtp_enorm, mtp_hnorm, mtp_head_norm
            expect = "F32"
        elif d["mtp"]:
            expect = "Q8_0"  # the whole MTP head above the routed experts
        else:
            expect = IQ2_XS_MIX.get(d["role"], "Q6_K")
        assert types[name] == d["type"] == d["requested"] == expect, (name, d)
    assert {types["token_embd.weight"], types["output.weight"], types["blk.1.attn_q.weight"],
            types["blk.3.ffn_down_shexp.weight"]} == {"Q6_K"}
    r = gguf.GGUFReader(files[0])
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_IQ2_XS
    assert r.fields["quantize.imatrix.entries_count"].contents() == 73
    # runs in llama.cpp on held-out text: 3 x 128 tokens of eval.txt
    ppl = perplexity(files[0], eval_text, 128, 3)
    assert math.isfinite(ppl) and ppl > 1


# -- 3. against llama-imatrix ---------------------------------------------------------------------------------------

def test_kld_against_llama_imatrix(llama_cpp, ours, bf16, eval_text, work, capsys):
    theirs = llama_imatrix(bf16, DATA / "calib.txt", CALIB_LEN, CALIB_N, work / "llama.imatrix.gguf")
    # same names and layout for everything llama-imatrix records (it never runs the MTP blocks, and `output`
    # only with --process-output: ours has those in addition)
    _, lt = _read(theirs)
    _, ot = _read(ours)
    assert set(lt) <= set(ot)
    assert {n for n in ot if n not in lt} == {n for n in ot if n.startswith(("blk.5.", "blk.6.", "output."))}
    for n in lt:
        assert lt[n].shape == ot[n].shape, n
        if n.endswith(".counts"):  # same number of tokens per matrix (the experts' split depends on the text)
            assert lt[n].sum() == pytest.approx(ot[n].sum(), rel=0.01), n

    base = work / "bf16.kld"
    kld_base(bf16, eval_text, KLD_CTX, KLD_CHUNKS, base)
    rows = {}
    for label, im in (("no imatrix", None), ("llama-imatrix", theirs), ("stepq (ours)", ours)):
        q = quantize(bf16, work / f"Q4_K_M-{label.split()[0]}.gguf", "Q4_K_M", im)
        r = kld(q, base)
        rows[label] = (r["kld_mean"], r["kld_mean_se"])
    with capsys.disabled():
        print(f"\nQ4_K_M mean KLD vs BF16 ({KLD_CHUNKS} x {KLD_CTX} tokens of eval.txt):")
        for label, (k, se) in rows.items():
            print(f"  {label:14s} {k:.6f} ± {se:.6f}")
    ours_k, ours_se = rows["stepq (ours)"]
    none_k, none_se = rows["no imatrix"]
    assert all(math.isfinite(k) and k >= 0 for k, _ in rows.values())
    assert ours_k <= none_k + 3 * math.hypot(ours_se, none_se), rows


def test_quant_gguf_with_imatrix_from_calibration(tmp_path):
    """`stepq quantize --scheme gguf --imatrix`: calibrates (or reuses), quantizes with our importance matrix,
    records the statistics it used; the result differs from the same type quantized without it."""
    from stepq.cli import main

    common = ["--scheme", "gguf", "--qtype", "Q4_K_M"]
    assert main(["quantize", str(BUNDLED_FIXTURE), *common, "--imatrix", "--num-samples", "8", "--seq-len", "128",
                 "--out", str(tmp_path / "imx")]) == 0
    assert main(["quantize", str(BUNDLED_FIXTURE), *common, "--out", str(tmp_path / "plain")]) == 0
    name = f"{BUNDLED_FIXTURE.name}-GGUF-Q4_K_M"
    prov = json.loads((tmp_path / "imx" / name / "stepq.json").read_text())
    stats = CalibStats.load(tmp_path / "imx" / f"{BUNDLED_FIXTURE.name}-calib" / "stats.safetensors")
    assert prov["imatrix"]["statistics_sha256"] == stats.sha256
    assert "imatrix" not in json.loads((tmp_path / "plain" / name / "stepq.json").read_text())
    with_imx = (tmp_path / "imx" / name / f"{BUNDLED_FIXTURE.name}-Q4_K_M.gguf").read_bytes()
    without = (tmp_path / "plain" / name / f"{BUNDLED_FIXTURE.name}-Q4_K_M.gguf").read_bytes()
    assert with_imx != without
    assert not list((tmp_path / "imx" / name).glob(".*"))  # intermediates (BF16, imatrix) removed

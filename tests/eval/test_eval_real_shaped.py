"""`stepq quantize` + `stepq eval` on a checkpoint with Step-3.5-Flash's real dims (hidden 4096, 64 / 96 attention
heads, dense MLP 11264, experts of 1280, MTP layer), random weights, shrunk only in what the test can afford: 8
experts instead of 288, a 2048-token vocabulary instead of 128896, one MoE layer (bench/gen_real_shaped.py, 1.5 GB).
NVFP4 weight-only (data-free: W4A4 would calibrate first) and a 2 x 64-token eval: about 1.5 minutes on 2 cores."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from stepq.cli import main

ROOT = Path(__file__).resolve().parents[2]
EVAL_TEXT = ROOT / "fixtures" / "tiny-step35-data" / "eval.txt"
EXPERTS, VOCAB, SEQUENCES, SEQ_LEN = 8, 2048, 2, 64


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"stepq_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_shaped(tmp_path_factory) -> Path:
    """The generated checkpoint with the bundled fixture's tokenizer beside it (ids < 1536 < VOCAB), as the bench
    gives it one."""
    work = tmp_path_factory.mktemp("real-shaped")
    gen = _bench("gen_real_shaped").generate(work / "real-1moe", moe_layers=1, experts=EXPERTS, vocab=VOCAB)
    return _bench("gguf_convert").with_tokenizer(gen, work)


def test_nvfp4_of_a_real_shaped_checkpoint_evaluates(real_shaped, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(real_shaped), "--scheme", "nvfp4a16", "--out", str(out)]) == 0
    art = out / f"{real_shaped.name}-NVFP4A16"
    assert main(["eval", str(art), "--model", str(real_shaped), "--out", str(out), "--dataset", str(EVAL_TEXT),
                 "--num-samples", str(SEQUENCES), "--seq-len", str(SEQ_LEN), "--tasks", "", "--no-speed",
                 "--no-engine-check"]) == 0
    r = json.loads((art / "eval" / "report.json").read_text())
    acc, kld = r["accuracy"], r["accuracy"]["kld"]
    print(json.dumps(acc), json.dumps(r["weights"]["per_role"]), json.dumps(r["timings"]))
    assert acc["positions"] == r["text"]["tokens"] == SEQUENCES * SEQ_LEN
    assert all(math.isfinite(v) for v in [*kld.values(), acc["top1"], acc["ppl"], acc["ppl_ref"], acc["ppl_ratio"]])
    # random weights give near-flat distributions: 4-bit weights move them a little (measured: KLD 0.15, top-1 0.40)
    assert 0 < kld["median"] <= kld["p99"] <= kld["max"] < 2 and 0 < kld["mean"] < 1
    assert 0 < acc["top1"] <= 1 and 0.5 < acc["ppl_ratio"] < 2
    assert acc["ppl_ratio"] == pytest.approx(acc["ppl"] / acc["ppl_ref"], rel=1e-9)
    assert [m["depth"] for m in acc["mtp"]] == [1] and all(0 <= m["acceptance"] <= 1 for m in acc["mtp"])
    # NVFP4 of Gaussian weights: ~20.4 dB for every quantized role (dense, attention, shared and routed experts)
    assert all(19 < db < 22 for db in r["weights"]["per_role"].values()), r["weights"]["per_role"]
    (logprobs,) = (out / f"{real_shaped.name}-evalref").glob("*/logprobs.npy")
    assert SEQUENCES * SEQ_LEN * VOCAB * 4 < logprobs.stat().st_size < SEQUENCES * SEQ_LEN * VOCAB * 4 + 4096

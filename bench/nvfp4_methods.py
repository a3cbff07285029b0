"""NVFP4 round-to-nearest vs searched group scales on the bundled fixture: KLD and top-1 agreement vs BF16.

Both variants are calibrated W4A4 (`--scheme nvfp4`) from one statistics file; logits come from the artifacts
read back from disk and dequantized (weights only: the reference forward does not fake-quantize activations).
Usage: .venv/bin/python bench/nvfp4_methods.py [--scheme nvfp4] [--windows 16]
Writes bench/results/nvfp4_methods.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calib.reference import ReferenceModel, load_reference  # noqa: E402
from convert.artifact import ArtifactReader  # noqa: E402
from convert.fixtures import BUNDLED_FIXTURE  # noqa: E402
from stepq.cli import main as stepq  # noqa: E402

SEQ = 256


def logits_of(model, ids):
    with torch.no_grad():
        return model.float().eval()(ids)[0]


def compare(ref, got) -> dict:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1).flatten()
    return {"kld_mean": kl.mean().item(), "kld_median": kl.median().item(), "kld_p99": kl.quantile(0.99).item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="nvfp4")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    tok = Tokenizer.from_file(str(BUNDLED_FIXTURE / "tokenizer.json"))
    text = (BUNDLED_FIXTURE.parent / "tiny-step35-data" / "eval.txt").read_text()
    ids = torch.tensor(tok.encode(text).ids[: SEQ * args.windows]).reshape(args.windows, SEQ)
    ref = logits_of(load_reference(BUNDLED_FIXTURE), ids)
    results = {"scheme": args.scheme, "tokens": ids.numel(), "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("rtn", "search"):
            out = Path(tmp) / method
            t0 = time.perf_counter()
            assert stepq(["quantize", str(BUNDLED_FIXTURE), "--scheme", args.scheme, "--out", str(out),
                          "--method", method]) == 0
            seconds = time.perf_counter() - t0
            art = next(p for p in out.iterdir() if p.name.endswith(args.scheme.upper()))
            reader = ArtifactReader(art)
            model = ReferenceModel(json.loads((art / "config.json").read_text()))
            model.load_checkpoint_tensors({n: reader.read(n).float() for n in reader.source_names()})
            results["methods"][method] = {**compare(ref, logits_of(model, ids)), "quantize_s": round(seconds, 1)}
    r, s = results["methods"]["rtn"], results["methods"]["search"]
    results["kld_reduction"] = 1 - s["kld_mean"] / r["kld_mean"]
    for m, v in results["methods"].items():
        print(f"{args.scheme} {m:<7} KLD mean {v['kld_mean']:.6f} median {v['kld_median']:.6f} "
              f"p99 {v['kld_p99']:.5f} top-1 {v['top1']:.4f} ({v['quantize_s']} s incl. calibration reuse)")
    print(f"search lowers mean KLD by {100 * results['kld_reduction']:.1f}% at the same size")
    dest = ROOT / "bench" / "results" / "nvfp4_methods.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

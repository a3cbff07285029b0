"""GGUF quality vs the BF16 GGUF, per type and importance-matrix source, measured by llama.cpp itself.

For BF16, Q8_0, Q4_K_M, IQ4_XS and IQ2_XS (stepq's recipes, `convert.gguf_job.export_gguf`): mean and 99th-percentile
KL divergence and top-1 agreement ("Same top p") against the BF16 GGUF, from `llama-perplexity
--kl-divergence-base` (BF16) then `--kl-divergence` on the held-out fixtures/tiny-step35-data/eval.txt, each
quantized
  - without an importance matrix (where llama-quantize allows it; IQ2_XS requires one),
  - with stepq's imatrix (`--imatrix`: written from `stepq calibrate` statistics on calib.txt),
  - with llama-imatrix's imatrix of the BF16 GGUF on the same calib.txt, same number of tokens
    (stepq samples seeded windows of the text, llama-imatrix takes its first chunks), same recipe otherwise.
BF16 and Q8_0 are written by gguf-py, where an imatrix does not apply (Q8_0 has no weighted rounding); the BF16 row
against itself is the noise floor of the 16-bit log-prob storage.

Writes bench/results/gguf_quality.json and prints the table.
Usage: .venv/bin/python bench/gguf_quality.py [MODEL] [--ctx 512 --chunks 32 --calib-n 64 --calib-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calib.stats import CalibStats
from convert.checkpoint import open_checkpoint
from convert.errors import BadInput
from convert.gguf_export import write_gguf
from convert.gguf_kld import kld, kld_base, llama_imatrix, quantize
from convert.gguf_recipe import recipe_for
from stepq.calibrate import calibrate
from convert.gguf_job import export_gguf

DATA = ROOT / "fixtures" / "tiny-step35-data"
QTYPES = ["BF16", "Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS"]
SOURCES = ["none", "stepq", "llama-imatrix"]
SHOWN = ["kld_mean", "kld_p99", "same_top_pct", "ppl"]


def _gguf(folder: Path) -> Path:
    return min(folder.glob("*.gguf"))


def variants(model: Path, work: Path, stats: CalibStats, theirs: Path, bf16: Path):
    """(qtype, source) -> the GGUF to measure, or the reason there is none."""
    ckpt = open_checkpoint(model)
    mtp_layers, n_embd = tuple(ckpt.config.mtp_layers), ckpt.config.hidden_size
    ckpt.close()
    for qtype in QTYPES:
        for source in SOURCES:
            key = (qtype, source)
            if qtype in ("BF16", "Q8_0"):
                if source != "none":
                    yield key, "n/a: written by gguf-py, an imatrix does not apply"
                elif qtype == "BF16":
                    yield key, bf16
                else:
                    yield key, _gguf(export_gguf(model, work / "none", qtype))
            elif source == "none":
                try:
                    recipe_for(qtype)
                except BadInput as e:  # llama-quantize would refuse it: the refusal is the entry
                    yield key, f"n/a: {e}"
                    continue
                yield key, _gguf(export_gguf(model, work / "none", qtype))
            elif source == "stepq":
                yield key, _gguf(export_gguf(model, work / "stepq", qtype, imatrix=stats))
            else:  # the same llama-quantize command export_gguf runs, with llama-imatrix's file
                recipe = recipe_for(qtype, mtp_layers, imatrix=True, n_embd=n_embd)
                out = work / "llama-imatrix" / f"{qtype}.gguf"
                out.parent.mkdir(parents=True, exist_ok=True)
                yield key, quantize(bf16, out, qtype, theirs, recipe.llama_quantize_args())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "fixtures" / "tiny-step35"))
    ap.add_argument("--eval-text", default=str(DATA / "eval.txt"))
    ap.add_argument("--calib-text", default=str(DATA / "calib.txt"))
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c (the second half of each is scored)")
    ap.add_argument("--chunks", type=int, default=32, help="llama-perplexity --chunks")
    ap.add_argument("--calib-n", type=int, default=64, help="calibration sequences (stepq) = chunks (llama-imatrix)")
    ap.add_argument("--calib-len", type=int, default=256, help="calibration sequence length = llama-imatrix -c")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_quality.json"))
    args = ap.parse_args()
    model = Path(args.model)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gguf-quality-") as tmp:
        work = Path(tmp)
        bf16 = write_gguf(model, work / "BF16.gguf", "BF16").files[0]
        stats = CalibStats.load(calibrate(model, args.calib_text, out_root=work / "calib", n=args.calib_n,
                                          seq_len=args.calib_len, progress=False))
        theirs = llama_imatrix(bf16, Path(args.calib_text), args.calib_len, args.calib_n, work / "llama.imatrix.gguf")
        base = work / "bf16.kld"
        base_ppl = kld_base(bf16, Path(args.eval_text), args.ctx, args.chunks, base)
        rows: dict[str, dict] = {}
        for (qtype, source), target in variants(model, work, stats, theirs, bf16):
            if isinstance(target, str):
                rows[f"{qtype}/{source}"] = {"qtype": qtype, "imatrix": source, "skipped": target}
                continue
            r = kld(target, base)
            rows[f"{qtype}/{source}"] = {"qtype": qtype, "imatrix": source, "bytes": target.stat().st_size, **r}
            print(f"{qtype:7s} {source:14s} mean KLD {r['kld_mean']:.6f}  p99 {r['kld_p99']:.5f}  "
                  f"same top {r['same_top_pct']:.2f}%", flush=True)
    result = {
        "model": str(model), "eval_text": args.eval_text, "calib_text": args.calib_text,
        "kld": {"ctx": args.ctx, "chunks": args.chunks, "scored_tokens": args.chunks * (args.ctx - 1 - args.ctx // 2),
                "base": "BF16 GGUF (stepq, identical to llama.cpp's converter)", "base_ppl": base_ppl},
        "calibration": {"sequences": args.calib_n, "tokens_per_sequence": args.calib_len},
        "seconds": round(time.time() - t0, 1), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nKLD vs BF16 GGUF on {result['kld']['scored_tokens']} scored tokens of {Path(args.eval_text).name} "
          f"(-c {args.ctx}, {args.chunks} chunks; base PPL {base_ppl:.4f}); imatrix from {args.calib_n} x "
          f"{args.calib_len} tokens of {Path(args.calib_text).name}")
    print(f"{'type':8s} {'imatrix':14s} {'MB':>6s} {'mean KLD ± se':>21s} {'p99 KLD':>9s} {'same top %':>10s} "
          f"{'PPL':>8s}")
    for r in rows.values():
        if "skipped" in r:
            print(f"{r['qtype']:8s} {r['imatrix']:14s} {r['skipped']}")
        else:
            print(f"{r['qtype']:8s} {r['imatrix']:14s} {r['bytes'] / 1e6:6.2f} {r['kld_mean']:10.6f} ± "
                  f"{r['kld_mean_se']:8.6f} {r['kld_p99']:9.5f} {r['same_top_pct']:10.2f} {r['ppl']:8.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

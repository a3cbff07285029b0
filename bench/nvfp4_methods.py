"""Quantization methods on the bundled fixture: round-to-nearest, scale search, GPTQ (llm-compressor's), GPTQ on
searched scales, for NVFP4 W4A4, NVFP4A16 and FP8 static, each measured by `stepq eval` against the BF16 source with
the engine's activation quantization (W4A4 measured as W4A4): KLD mean / p99, top-1, PPL ratio, MTP acceptance
ratio, plus the quantize command's wall time and peak memory (its process tree's max RSS).

All variants quantize from one calibration statistics file (`stepq calibrate` runs first, its time is not counted);
the GPTQ methods run their layer-by-layer pass on the same samples.

For W4A4 it also splits the error: on 16 x 256 tokens of the fixture's eval.txt, the KLD of each artifact's weights
alone (BF16 activations), and of the BF16 weights with only the engine's activation quantization (round-to-nearest
artifact's input scales): the floor no weight rounding goes below.
Usage: .venv/bin/python bench/nvfp4_methods.py [--schemes nvfp4,nvfp4a16,fp8-static] [--methods ...] [--out DIR]
Writes bench/results/nvfp4_methods.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPQ = str(ROOT / ".venv" / "bin" / "stepq")
FIXTURE = ROOT / "fixtures" / "tiny-step35"
METHODS = ("rtn", "search", "gptq", "gptq+search")
SEARCHABLE = {"nvfp4", "nvfp4a16", "nvfp4-modelopt"}  # the scale search is an NVFP4 method


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` -> (wall seconds, peak RSS of the process in MiB, from wait4; it counts what the child inherited
    at fork, so this process must stay small)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()}")
    return seconds, usage.ru_maxrss / 1024


def measure(out: Path, scheme: str, method: str) -> dict:
    seconds, rss = timed([STEPQ, "quantize", str(FIXTURE), "--scheme", scheme, "--method", method, "--out", str(out),
                          "--force"])
    art = Path((out / ".last-artifact").read_text().strip())
    subprocess.run([STEPQ, "eval", str(art), "--model", str(FIXTURE), "--out", str(out), "--tasks", "", "--no-speed",
                    "--no-engine-check", "--force"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = json.loads((art / "eval" / "report.json").read_text())["accuracy"]
    return {"kld_mean": acc["kld"]["mean"], "kld_p99": acc["kld"]["p99"], "top1": acc["top1"],
            "ppl_ratio": acc["ppl_ratio"], "mtp_acceptance_ratio": [d["ratio"] for d in acc["mtp"]],
            "quantize_s": round(seconds, 1), "peak_rss_mib": round(rss)}


def split_w4a4(art: Path) -> dict:
    """KLD of the W4A4 artifact as the engine runs it, of its weights alone, and of BF16 weights with its
    activation quantization alone, through eval.forward's layer-streamed forward (in this process)."""
    import torch
    from tokenizers import Tokenizer

    from calib.stream import stream_forward
    from convert.artifact import ArtifactReader
    from convert.checkpoint import open_checkpoint
    from eval.forward import ArtifactWeights, InputQuantizer, artifact_outputs, source_outputs

    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    text = (FIXTURE.parent / "tiny-step35-data" / "eval.txt").read_text()
    ids = torch.tensor(tok.encode(text).ids[:16 * 256]).reshape(16, 256)
    src = open_checkpoint(FIXTURE)
    ref = torch.log_softmax(source_outputs(src, ids, progress=False).logits, -1)

    def kld(logits):
        return (ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1).mean().item()

    reader = ArtifactReader(art)
    both = artifact_outputs(src, art, ids, progress=False)[0].logits
    weights = stream_forward(ArtifactWeights(src, reader), ids, keep_outputs=True, progress=False).logits
    acts = stream_forward(src, ids, InputQuantizer(reader, src.config.raw), keep_outputs=True, progress=False).logits
    return {"w4a4": kld(both), "weights_only": kld(weights), "activations_only": kld(acts)}


def table(results: dict) -> str:
    lines = ["| scheme | method | KLD mean | KLD p99 | top-1 | PPL ratio | MTP acc. ratio (d1, d2) | quantize s "
             "| peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scheme, by_method in results["schemes"].items():
        rtn = by_method.get("rtn", {}).get("kld_mean")
        for method, r in by_method.items():
            rel = f" ({r['kld_mean'] / rtn:.2f}x)" if rtn and method != "rtn" else ""
            mtp = ", ".join(f"{x:.3f}" for x in r["mtp_acceptance_ratio"])
            lines.append(f"| {scheme} | {method} | {r['kld_mean']:.5f}{rel} | {r['kld_p99']:.4f} | {r['top1']:.4f} | "
                         f"{r['ppl_ratio']:.4f} | {mtp} | {r['quantize_s']} | {r['peak_rss_mib']} |")
    split = results["schemes"].get("nvfp4", {})
    if split:
        lines += ["", "| NVFP4 W4A4 method | KLD as run (W4A4) | weights only | BF16 weights, activations only |",
                  "|---|---|---|---|"]
        lines += [f"| {m} | {r['kld_split']['w4a4']:.5f} | {r['kld_split']['weights_only']:.5f} | "
                  f"{r['kld_split']['activations_only']:.5f} |" for m, r in split.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="nvfp4,nvfp4a16,fp8-static")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench-methods"))
    ap.add_argument("--split", help=argparse.SUPPRESS)  # internal: print split_w4a4 of this artifact as JSON
    args = ap.parse_args()
    if args.split:
        print(json.dumps(split_w4a4(Path(args.split))))
        return
    out = Path(args.out)
    subprocess.run([STEPQ, "calibrate", str(FIXTURE), "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    results = {"model": str(FIXTURE.relative_to(ROOT)), "eval": "stepq eval defaults for the fixture (eval.txt), "
               "no lm-eval tasks", "schemes": {}}
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            if "search" in method and scheme not in SEARCHABLE:
                continue
            r = measure(out, scheme, method)
            if scheme == "nvfp4":  # in a child process: this one stays small, so its children's peak RSS is theirs
                art = (out / ".last-artifact").read_text().strip()
                r["kld_split"] = json.loads(subprocess.run([sys.executable, __file__, "--split", art], check=True,
                                                           capture_output=True, text=True).stdout)
            results["schemes"].setdefault(scheme, {})[method] = r
            print(f"{scheme} {method}: {r}", file=sys.stderr, flush=True)
    dest = ROOT / "bench" / "results" / "nvfp4_methods.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()

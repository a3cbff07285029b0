"""Every variant of a model, quantized, evaluated and gated: the eval table -> bench/results/eval_variants.json.

    .venv/bin/python bench/eval_variants.py [MODEL] [--out DIR] [--variants fp8-block,nvfp4,gguf:Q4_K_M,...]

Prints one markdown row per variant (KLD, top-1, PPL ratio, MTP acceptance ratio per depth, task recovery, speed
ratios, gate verdict, `stepq eval` wall time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPQ = [sys.executable, "-m", "stepq.cli"]
DEFAULT_VARIANTS = ["fp8-block", "fp8-block-all", "fp8-dynamic", "fp8-static", "nvfp4a16", "nvfp4",
                    "nvfp4-modelopt", "gguf:BF16", "gguf:Q8_0", "gguf:Q4_K_M", "gguf:IQ4_XS"]


def run(args: list[str]) -> tuple[int, str]:
    p = subprocess.run(STEPQ + args, capture_output=True, text=True, cwd=ROOT)
    if p.returncode not in (0, 1):
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"stepq {' '.join(args)} failed with exit {p.returncode}")
    return p.returncode, p.stdout


def quantize(model: str, out: Path, variant: str) -> Path:
    if variant.startswith("gguf:"):
        args = ["quantize", model, "--scheme", "gguf", "--qtype", variant.split(":")[1], "--out", str(out)]
    else:
        args = ["quantize", model, "--scheme", variant, "--out", str(out)]
    _, stdout = run(args + ["--force"])
    return Path(stdout.strip().splitlines()[-1])


def _f(x, fmt: str) -> str:
    if isinstance(x, dict) and "not_measured" in x:
        return "n/m"
    return "—" if x is None else format(x, fmt)


def row(variant: str, r: dict, gate_ok: bool, seconds: float) -> str:
    a = r["accuracy"]
    mtp = a["mtp"]
    mtp_s = "n/m" if isinstance(mtp, dict) else " / ".join(_f(m["ratio"], ".3f") for m in mtp)
    tasks = r["tasks"]
    task_s = "n/m" if "not_measured" in tasks else ", ".join(
        f"{k.removeprefix('tiny_step35_')} {_f(v['score'], '.3f')} ({_f(v['recovery'], '.2f')})"
        for k, v in sorted(tasks.items()))
    speed = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["speed"].get("ratios", {}).items())) or "n/m"
    return (f"| {variant} | {a['kld']['mean']:.2e} | {a['kld']['p99']:.2e} | {a['top1']:.4f} | "
            f"{a['ppl_ratio']:.4f} | {mtp_s} | {task_s} | {speed} | {'pass' if gate_ok else 'FAIL'} | "
            f"{seconds:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="fixtures/tiny-step35")
    ap.add_argument("--out", default="out/bench-eval")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    results, lines = {}, []
    header = ("| variant | KLD mean | KLD p99 | top-1 | PPL ratio | MTP ratio (per depth) | tasks: score (recovery) "
              "| speed ratio vs BF16 | gate | eval s |\n|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        artifact = quantize(args.model, out, variant)
        t0 = time.time()
        run(["eval", str(artifact), "--model", args.model, "--out", str(out)])
        seconds = time.time() - t0
        code, gate_out = run(["gate", str(artifact)])
        report = json.loads((artifact / "eval" / "report.json").read_text())
        results[variant] = {"report": report, "gate_passed": code == 0, "gate": gate_out, "eval_s": seconds}
        lines.append(row(variant, report, code == 0, seconds))
        print(lines[-1], flush=True)
    dest = ROOT / "bench" / "results" / "eval_variants.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=1))
    print("\n" + header + "\n" + "\n".join(lines))
    print(f"\n-> {dest}")


if __name__ == "__main__":
    main()

"""Data-free conversion of a checkpoint (default: the bundled fixture) into every bundled scheme.

Prints, per variant: artifact size, wall time, peak RSS and peak anonymous memory (RssAnon, sampled from /proc),
and the per-role relative weight error read back from the files on disk. Writes bench/results/convert_fixture.json.
Usage: .venv/bin/python bench/convert_fixture.py [MODEL] [--schemes fp8-block,nvfp4a16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.artifact import ArtifactReader  # noqa: E402
from convert.checkpoint import open_checkpoint  # noqa: E402

SCHEMES = ["fp8-block", "fp8-block-all", "fp8-dynamic", "nvfp4a16"]


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str]) -> dict:
    """Run a command; sample its RssAnon / VmRSS every 10 ms."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while p.poll() is None:
            for k in peak:
                peak[k] = max(peak[k], _status_kib(p.pid, k))
            time.sleep(0.01)

    th = threading.Thread(target=sample)
    th.start()
    out, _ = p.communicate()
    th.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_anon_mib": peak["RssAnon"] / 1024,
            "peak_rss_mib": peak["VmRSS"] / 1024, "path": out.strip().splitlines()[-1]}


def role_errors(src_dir: Path, art_dir: Path) -> dict:
    art = ArtifactReader(art_dir)
    src = open_checkpoint(src_dir)
    errs = defaultdict(list)
    for name, d in art.decisions.items():
        if d["action"] == "quantized":
            w = src.read(name).float()
            errs[d["role"]].append(((art.read(name) - w).norm() / w.norm()).item())
    return {r: {"max": max(v), "mean": sum(v) / len(v), "tensors": len(v)} for r, v in sorted(errs.items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(ROOT / "fixtures" / "tiny-step35"))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args()
    src = Path(args.model)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    results = {"model": str(src), "source_bytes": source_bytes, "variants": {}}
    with tempfile.TemporaryDirectory() as out:
        for scheme in args.schemes.split(","):
            m = run_measured([sys.executable, "-m", "stepq.cli", "quantize", str(src), "--scheme", scheme,
                              "--out", out])
            art = Path(m.pop("path"))
            m["artifact_bytes"] = sum(p.stat().st_size for p in art.glob("*.safetensors"))
            m["role_rel_error"] = role_errors(src, art)
            results["variants"][scheme] = m
    print(f"source {src}: {source_bytes / 1e6:.1f} MB of safetensors")
    print(f"{'scheme':<14} {'size MB':>8} {'ratio':>6} {'time s':>7} {'RssAnon MiB':>12} {'RSS MiB':>8}")
    for s, m in results["variants"].items():
        print(f"{s:<14} {m['artifact_bytes'] / 1e6:>8.1f} {m['artifact_bytes'] / source_bytes:>6.2f} "
              f"{m['seconds']:>7.1f} {m['peak_rss_anon_mib']:>12.0f} {m['peak_rss_mib']:>8.0f}")
    print("per-role relative weight error (max over tensors):")
    for s, m in results["variants"].items():
        print(f"  {s}: " + ", ".join(f"{r} {e['max']:.4f}" for r, e in m["role_rel_error"].items()))
    out = ROOT / "bench" / "results" / "convert_fixture.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

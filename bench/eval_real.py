"""Eval speed and memory on a real-shaped Step-3.5 checkpoint: `stepq eval` of its NVFP4 (W4A4) artifact.

bench/gen_real_shaped.py's checkpoint (1 dense layer, MoE layer(s) of the real shape, 1 MTP layer, the real vocab)
with the fixture's tokenizer beside it; the artifact is `stepq quantize --scheme nvfp4` calibrated on a small slice
of the fixture's calib.txt (the statistics only set input scales here: the weights are random). Then `stepq eval`
runs as a subprocess on N x L tokens of the same text, page cache dropped first, and this prints its wall time,
peak RssAnon / RSS of the process tree and its stage timings (BF16 reference, the artifact's forward, weight error).

What it shows: eval holds one layer's weights (the artifact's experts decoded one at a time) and never a
[tokens, vocabulary] array beyond one block of positions; the BF16 reference outputs go to a memory-mapped file on
disk (its size is printed). Goal on this machine: peak RssAnon <= 6 GiB.

Usage: .venv/bin/python bench/eval_real.py [--size quick|full] [--num-samples 8] [--seq-len 2048]
Writes bench/results/eval_real_<size>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gen_real_shaped  # noqa: E402
from calib_real import CALIB_TEXT, _cpu_name  # noqa: E402
from convert_real import SIZES, drop_page_cache, load, run_measured  # noqa: E402
from gguf_convert import with_tokenizer  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of the generated one")
    ap.add_argument("--num-samples", type=int, default=8, help="eval sequences (the real model's default: 8)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "stepq" / "bench" / "work")
    a = ap.parse_args()
    size = SIZES[a.size]
    model = a.model or gen_real_shaped.generate(gen_real_shaped.default_dir(**size), **size)
    a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=a.work))
    stepq = [sys.executable, "-m", "stepq.cli"]
    r = {"machine": {"cores": len(os.sched_getaffinity(0)), "cpu": _cpu_name(), "load_start": load()},
         "checkpoint": {"path": str(model), "bytes": _dir_bytes(model), **size},
         "eval_tokens": {"n": a.num_samples, "seq_len": a.seq_len}}
    try:
        src = with_tokenizer(model, work)
        shards = sorted(model.glob("*.safetensors"))
        print("stepq quantize --scheme nvfp4 (calibrated on 2 x 2048 tokens) ...", flush=True)
        q = run_measured([*stepq, "quantize", str(src), "--scheme", "nvfp4", "--out", str(work), "--dataset",
                          str(CALIB_TEXT), "--num-samples", "2", "--seq-len", "2048"])
        artifact = Path(q.pop("path"))
        r["quantize"] = q
        drop_page_cache(shards + sorted(artifact.glob("*.safetensors")))
        print(f"stepq eval {artifact.name}: {a.num_samples} x {a.seq_len} tokens ...", flush=True)
        m = run_measured([*stepq, "eval", str(artifact), "--model", str(src), "--out", str(work), "--dataset",
                          str(CALIB_TEXT), "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len),
                          "--tasks", "", "--no-speed", "--no-engine-check"])
        report = json.loads(Path(m.pop("path")).read_text())
        r["eval"] = {**m, "timings": report["timings"], "compute": report.get("compute"),
                     "accuracy": {k: report["accuracy"][k] for k in ("kld", "top1", "ppl_ratio")},
                     "reference_cache_bytes": _dir_bytes(next(work.glob("*-evalref")))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["machine"]["load_end"] = load()
    out = ROOT / "bench" / "results" / f"eval_real_{a.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    e = r["eval"]
    print(f"checkpoint {r['checkpoint']['bytes'] / 1e9:.1f} GB; {r['machine']['cores']} cores ({r['machine']['cpu']}), "
          f"load {r['machine']['load_start']} -> {r['machine']['load_end']}")
    print(f"quantize nvfp4: {r['quantize']['wall_s']:.0f} s, peak RssAnon {r['quantize']['peak_rss_anon_mib']:.0f} MiB")
    print(f"eval {a.num_samples} x {a.seq_len}: {e['wall_s']:.0f} s, peak RssAnon {e['peak_rss_anon_mib']:.0f} MiB, "
          f"RSS {e['peak_rss_mib']:.0f} MiB; reference on disk {e['reference_cache_bytes'] / 1e9:.2f} GB")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in e["timings"].items() if isinstance(v, float)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

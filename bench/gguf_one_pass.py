"""GGUF exports in one pass against reading the source and against llama.cpp's own two-pass flow.

On one checkpoint (default: bench/gen_real_shaped.py's real-shaped one, given the fixture's tokenizer), in one run:
  1. two reads of the source shards with `cat`, each after dropping the guest's page cache for them
     (`posix_fadvise(DONTNEED)`): "cold" is the first read of the run, "fast" the second, right after it. This VM's
     host keeps its own cache, which no guest call can drop: once the files were read recently (the first read
     itself does that), the host serves them at fast-NVMe speed. A read from the physical disk cannot be forced
     here; a "cold" figure after a recent read of the files is really a fast one, and the report says which it was.
  2. per type, `stepq quantize --scheme gguf --qtype T` as a child process (page cache dropped first): wall time,
     peak RssAnon of the process, peak extra disk in the output folder (sampled every 50 ms) against the final
     size. `--imatrix-types` also get `--imatrix --stats` from a real `stepq calibrate` run on the same checkpoint.
  3. for `--reference-types`, llama.cpp's flow on the same checkpoint: `convert_hf_to_gguf.py --outtype bf16`, then
     `llama-quantize` with the same recipe arguments (and the same imatrix), wall time summed, peak RssAnon, peak
     disk (intermediate + output); whether its file equals stepq's, byte for byte.
  4. ggml's quantizer alone: Mparam/s of one core on an expert-shaped matrix per GGML type the mixes use, and the
     time the whole checkpoint needs at that rate on every core (the bound a K/IQ export cannot beat).

Usage: .venv/bin/python bench/gguf_one_pass.py [MODEL] [--types Q8_0,Q4_K_M,IQ4_XS] [--imatrix-types Q4_K_M]
       [--reference-types Q4_K_M]
Writes bench/results/gguf_one_pass.json and prints the table.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convert_real import drop_page_cache, timed_read
from gguf_convert import measured, with_tokenizer

from convert import ggml_quants
from convert.checkpoint import open_checkpoint
from convert.gguf_quantize import plan_quantized
from convert.gguf_recipe import recipe_for
from convert.gguf_tools import reference_converter_cmd, tool

DEFAULT_MODEL = Path.home() / ".cache" / "stepq" / "bench" / "real-1moe"
CALIB_TEXT = ROOT / "fixtures" / "tiny-step35-data" / "calib.txt"


def disk_used(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:  # renamed or removed between listing and stat
                pass
    return total


class DiskPeak:
    """The largest number of bytes allocated under `folder` while the context runs (sampled every 50 ms)."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, disk_used(self.folder))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_used(self.folder))


def gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.gguf"))


def stepq_export(model: Path, qtype: str, shards: list[Path], work: Path, stats: Path | None) -> dict:
    out = work / f"stepq-{qtype}{'-imatrix' if stats else ''}"
    out.mkdir()
    drop_page_cache(shards)
    cmd = [sys.executable, "-m", "stepq.cli", "quantize", str(model), "--scheme", "gguf", "--qtype", qtype,
           "--out", str(out)] + (["--imatrix", "--stats", str(stats)] if stats else [])
    with DiskPeak(out) as disk:
        r = measured(cmd, out.with_suffix(".log"))
    files = gguf_files(out)
    size = sum(f.stat().st_size for f in files)
    r.update(output_bytes=size, peak_disk_bytes=disk.peak, disk_ratio=round(disk.peak / size, 3), files=files)
    return r


def reference_flow(model: Path, qtype: str, shards: list[Path], work: Path, stats: Path | None) -> dict:
    """llama.cpp's converter to BF16, then llama-quantize with stepq's recipe arguments (and imatrix)."""
    out = work / f"ref-{qtype}"
    out.mkdir()
    ckpt = open_checkpoint(model)
    try:
        recipe = recipe_for(qtype, tuple(ckpt.config.mtp_layers), imatrix=stats is not None,
                            n_embd=ckpt.config.hidden_size)
        args = recipe.llama_quantize_args()
        if stats is not None:
            from calib.stats import CalibStats
            from convert.gguf_imatrix import write_imatrix
            write_imatrix(CalibStats.load(stats), ckpt, out / "imatrix.gguf")
            args = ["--imatrix", "imatrix.gguf", *args]
    finally:
        ckpt.close()
    drop_page_cache(shards)
    with DiskPeak(out) as disk:
        bf16 = measured(reference_converter_cmd(model, out / "BF16.gguf", "--outtype", "bf16"), out / "convert.log")
        quant = measured([str(tool("llama-quantize")), *args, "BF16.gguf", f"{qtype}.gguf", qtype,
                          str(len(os.sched_getaffinity(0)))], out / "quantize.log", cwd=out)
    size = (out / f"{qtype}.gguf").stat().st_size
    return {"seconds": round(bf16["seconds"] + quant["seconds"], 2), "convert_s": bf16["seconds"],
            "llama_quantize_s": quant["seconds"],
            "peak_rss_anon_mib": max(bf16["peak_rss_anon_mib"], quant["peak_rss_anon_mib"]),
            "output_bytes": size, "peak_disk_bytes": disk.peak, "disk_ratio": round(disk.peak / size, 3),
            "file": out / f"{qtype}.gguf"}


def kernel_rates(types: set[str], repeat: int = 2) -> dict[str, float]:
    """Mparam/s of one core, ggml_quantize_chunk on a 1280 x 4096 expert-shaped matrix (with an imatrix: IQ2/IQ3
    types need one, the others get the same treatment for comparability)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1280, 4096)) * 0.02).astype(np.float32)
    imx = (rng.random(4096) + 0.1).astype(np.float32)
    rates = {}
    for name in sorted(types):
        t = ggml_quants.ggml_type(name)
        best = min(_timed(ggml_quants.quantize, t, w, imx) for _ in range(repeat))
        rates[name] = round(w.size / best / 1e6, 1)
    return rates


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def quantizer_bound(model: Path, qtype: str, rates: dict[str, float], cores: int) -> float:
    """Seconds ggml's quantizer alone needs for the export on `cores` cores (F32 and Q8_0 tensors excluded)."""
    ckpt = open_checkpoint(model)
    try:
        tensors = plan_quantized(ckpt, recipe_for(qtype, tuple(ckpt.config.mtp_layers), imatrix=True,
                                                  n_embd=ckpt.config.hidden_size), True, False)
    finally:
        ckpt.close()
    seconds = 0.0
    for t in tensors:
        if t.qtype.name in rates:
            seconds += float(np.prod(t.p.shape)) / (rates[t.qtype.name] * 1e6)
    return seconds / cores


def calibrate(model: Path, work: Path) -> Path:
    out = work / "calib"
    subprocess.run([sys.executable, "-m", "stepq.cli", "calibrate", str(model), "--dataset", str(CALIB_TEXT),
                    "--num-samples", "4", "--seq-len", "256", "--out", str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return next(out.rglob("stats.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--types", default="Q8_0,Q4_K_M,IQ4_XS")
    ap.add_argument("--imatrix-types", default="Q4_K_M", help="also exported with an imatrix (calibrates first)")
    ap.add_argument("--reference-types", default="Q4_K_M", help="also through llama.cpp's two-pass flow")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_one_pass.json"))
    a = ap.parse_args()
    def split(s: str) -> list[str]:
        return [x for x in s.split(",") if x]

    cores = len(os.sched_getaffinity(0))
    res: dict = {"cores": cores, "exports": {}, "reference": {}}
    with tempfile.TemporaryDirectory(prefix="gguf-one-pass-", dir=ROOT / "bench" / "results") as tmp:
        work = Path(tmp)
        model = with_tokenizer(Path(a.model), work)
        shards = sorted(model.glob("*.safetensors"))
        res["model"], res["source_bytes"] = str(a.model), sum(s.stat().st_size for s in shards)
        res["read_cold"], res["read_fast"] = timed_read(shards, "cold read"), timed_read(shards, "fast read")
        print(f"reads: cold {res['read_cold']}, fast {res['read_fast']}", flush=True)
        stats = calibrate(model, work) if split(a.imatrix_types) else None
        runs = [(q, None) for q in split(a.types)] + [(q, stats) for q in split(a.imatrix_types)]
        for qtype, st in runs:
            label = qtype + (" imatrix" if st else "")
            r = stepq_export(model, qtype, shards, work, st)
            files = r.pop("files")
            if qtype in split(a.reference_types) and (st is not None) == (qtype in split(a.imatrix_types)):
                ref = reference_flow(model, qtype, shards, work, st)
                ref["identical_to_stepq"] = len(files) == 1 and filecmp.cmp(files[0], ref.pop("file"), shallow=False)
                res["reference"][label] = ref
                shutil.rmtree(work / f"ref-{qtype}")
            res["exports"][label] = r
            print(label, r, res["reference"].get(label), flush=True)
            shutil.rmtree(files[0].parent.parent)
        used = {t for q in split(a.types) + split(a.imatrix_types) if q not in ("Q8_0", "BF16", "F16")
                for t in recipe_for(q, imatrix=True).role_types().values() if t not in ("F32", "Q8_0")}
        res["kernel_mparam_per_s_per_core"] = rates = kernel_rates(used)
        res["quantizer_bound_s"] = {q: round(quantizer_bound(Path(a.model), q, rates, cores), 1)
                                    for q in split(a.types) + split(a.imatrix_types) if q not in ("Q8_0", "BF16")}
    Path(a.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(summary(res))


def summary(r: dict) -> str:
    cold, fast = r["read_cold"]["seconds"], r["read_fast"]["seconds"]
    lines = [(f"{r['model']}: {r['source_bytes'] / 1e9:.1f} GB; read cold {cold:.1f} s, fast {fast:.1f} s; "
              f"{r['cores']} cores"),
             (f"{'export':16s} {'tool':10s} {'s':>7s} {'x fast':>7s} {'x cold':>7s} {'RssAnon MiB':>12s} "
              f"{'disk x out':>10s} {'ggml bound s':>12s}")]
    for label, e in r["exports"].items():
        bound = r["quantizer_bound_s"].get(label.split()[0], "")
        lines.append(f"{label:16s} {'stepq':10s} {e['seconds']:7.1f} {e['seconds'] / fast:7.2f} "
                     f"{e['seconds'] / cold:7.2f} {e['peak_rss_anon_mib']:12.0f} {e['disk_ratio']:10.2f} {bound!s:>12s}")
        if (ref := r["reference"].get(label)) is not None:
            lines.append(f"{'':16s} {'llama.cpp':10s} {ref['seconds']:7.1f} {ref['seconds'] / fast:7.2f} "
                         f"{ref['seconds'] / cold:7.2f} {ref['peak_rss_anon_mib']:12.0f} {ref['disk_ratio']:10.2f}  "
                         f"identical: {ref['identical_to_stepq']}")
    lines.append("ggml quantizer, Mparam/s per core: " + ", ".join(f"{k} {v}" for k, v in
                                                                 r["kernel_mparam_per_s_per_core"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

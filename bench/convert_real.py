"""Conversion speed and memory on a real-shaped Step-3.5 checkpoint, against disk speed and compressed-tensors.

Per run (all in the same process, so the figures share the machine's state; 2 shared cores are noisy: the load
average is recorded with every stage):
  1. two reads of the source, `cat shard > /dev/null` after the guest's page cache of the shards is dropped
     (`posix_fadvise(DONTNEED)`: no root needed, checked with `fincore`):
     - cold read: the first read of the run, the VM host's cache in whatever state earlier work left it (a
       conversion's output writes evict part of it). The host's cache cannot be dropped from inside the VM, so
       this is the coldest read available here, not a guaranteed disk read.
     - fast read: the same, right after one read that warmed the host's cache: the source arrives at ~3 GB/s,
       like a fast NVMe disk.
  2. end to end, per scheme, in the fast-read conditions (host warmed by one read, guest cache dropped):
     `stepq quantize MODEL --scheme S` as a subprocess: wall time, wall / each read, Mparam/s (source parameters /
     wall), peak RssAnon and RSS of the whole process tree (polled from /proc every 20 ms), stepq.json's
     plan/convert timings; the artifact is deleted afterwards. `--one-core S,..` runs those schemes again under
     `taskset -c 0` (the kernels then run one thread) for the 1-core vs 2-core scaling. `nvfp4` (W4A4) gets a
     statistics file synthesized once through `calib.stats.save_stats` (random input absmax per module and per
     expert, 64 tokens each: the conversion reads only those; computing real ones is `stepq calibrate`'s job).
     `--code DIR` runs `stepq` from another checkout (e.g. a worktree of an older commit: the "before" figures).
  3. kernels vs compressed-tensors, on the same matrices from the checkpoint (an expert's gate/up/down and the dense
     gate_proj): our fast path (global scale + group scales + quantize + pack) against CT 0.19.0's own observer
     math (`generate_gparam`, `calculate_qparams`) + compressor (`NVFP4PackedCompressor.compress`, FP8_BLOCK
     `NaiveQuantizationCompressor.compress`), best of N wall times, and whether the bytes are identical.

Usage: .venv/bin/python bench/convert_real.py [--size quick|full] [--moe-layers N] [--schemes nvfp4a16,fp8-block]
       [--one-core nvfp4a16] [--code DIR] [--skip e2e,kernels] [--tag NAME]
quick: 1 MoE layer of 32 experts, vocab 32768 (~3 GB, minutes). full: 1 MoE layer of 288 experts, real vocab (~13 GB).
Writes bench/results/convert_real_<size>.json and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gen_real_shaped  # noqa: E402

from convert.checkpoint import open_checkpoint  # noqa: E402
from quant import fast_common  # noqa: E402

SIZES = {"quick": {"moe_layers": 1, "experts": 32, "vocab": 32768},
         "full": {"moe_layers": 1, "experts": 288, "vocab": 128896}}
SCHEMES = ["nvfp4a16", "fp8-block", "fp8-dynamic", "nvfp4"]
NEEDS_STATS = {"nvfp4"}


# ------------------------------------------------------------------------------------------------ /proc helpers


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (children listed per thread in /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def run_measured(cmd: list[str], cwd: Path = ROOT) -> dict:
    """Run `cmd` (its progress bar on our stderr); sample RssAnon and VmRSS summed over its process tree every 20 ms."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while p.poll() is None:
            pids = _tree(p.pid)
            for k in peak:
                peak[k] = max(peak[k], sum(_status_kib(q, k) for q in pids))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}")
    return {"wall_s": seconds, "peak_rss_anon_mib": peak["RssAnon"] / 1024, "peak_rss_mib": peak["VmRSS"] / 1024,
            "path": out.strip().splitlines()[-1]}


def drop_page_cache(paths: list[Path]) -> None:
    """Evict these files from the page cache (clean pages only: the files were fsynced when written)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux `fincore`), to show the drop worked."""
    if not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, paths)], capture_output=True, text=True,
                       check=False)
    return sum(int(x) for x in r.stdout.split()) if r.returncode == 0 else None


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------------ stages


def warm_host_cache(shards: list[Path]) -> None:
    """One untimed read, so the VM host's cache holds the files (then the guest's copy is dropped by the caller)."""
    for s in shards:
        subprocess.run(f"cat '{s}' > /dev/null", shell=True, check=True)


def timed_read(shards: list[Path], desc: str) -> dict:
    drop_page_cache(shards)
    before = resident_bytes(shards)
    nbytes = sum(s.stat().st_size for s in shards)
    t0 = time.perf_counter()
    with tqdm(total=nbytes, unit="B", unit_scale=True, desc=desc) as bar:
        for s in shards:
            subprocess.run(f"cat '{s}' > /dev/null", shell=True, check=True)
            bar.update(s.stat().st_size)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": nbytes, "mb_per_s": nbytes / seconds / 1e6, "resident_before": before,
            "load": load()}


def synthetic_stats(model: Path, path: Path) -> Path:
    """A statistics file for W4A4 on `model`: every quantizable linear's (and expert's) input absmax drawn in 1-10,
    64 tokens each, the source fingerprint `stepq quantize --stats` checks."""
    from calib.stats import FORMAT_VERSION, model_fingerprint, save_stats
    from quant.roles import EXPERT_ROLES, LINEAR_ROLES

    g = torch.Generator().manual_seed(0)
    ckpt = open_checkpoint(model)
    tensors = {}
    try:
        for t in ckpt.tensors.values():
            if t.info.role not in LINEAR_ROLES:
                continue
            lead = (t.entry.shape[0],) if t.info.role in EXPERT_ROLES else ()
            cols = t.entry.shape[-1]
            chan = 1 + 9 * torch.rand(*lead, cols, generator=g)
            tensors[f"{t.info.module}.input_amax"] = chan.amax(-1)
            tensors[f"{t.info.module}.input_channel_amax"] = chan
            tensors[f"{t.info.module}.input_sumsq"] = chan.square() * 64 / 4
            tensors[f"{t.info.module}.tokens"] = torch.full(lead, 64, dtype=torch.int64)
    finally:
        ckpt.close()
    meta = {"format_version": FORMAT_VERSION, "source": model_fingerprint(model), "experts_without_tokens": {},
            "synthetic": "bench/convert_real.py: random input absmax, not a calibration"}
    return save_stats(path, tensors, meta)


def end_to_end(model: Path, scheme: str, shards: list[Path], params: int, work: Path, code: Path = ROOT,
               stats: Path | None = None, one_core: bool = False) -> dict:
    out_root = work / f"e2e-{scheme}"
    warm_host_cache(shards)
    drop_page_cache(shards)
    res = {"load_before": load(), "cores": 1 if one_core else os.cpu_count()}
    cmd = [sys.executable, "-m", "stepq.cli", "quantize", str(model), "--scheme", scheme, "--out", str(out_root)]
    if stats is not None:
        cmd += ["--stats", str(stats)]
    if one_core:
        cmd = ["taskset", "-c", "0", *cmd]
    m = run_measured(cmd, cwd=code)
    art = Path(m.pop("path"))
    prov = json.loads((art / "stepq.json").read_text())
    res.update(m)
    res.update(load_after=load(), mparam_per_s=params / m["wall_s"] / 1e6,
               artifact_bytes=sum(p.stat().st_size for p in art.glob("*.safetensors")),
               stepq_timings=prov.get("timings"), stepq_peak_rss_mib=prov.get("peak_rss_mib"),
               quantized_tensors=sum(d["action"] == "quantized" for d in prov["tensors"].values()))
    shutil.rmtree(out_root, ignore_errors=True)
    return res


def _best(fn, repeat: int) -> float:
    fn()  # warm-up (numba loads its cache; torch allocators)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ct_nvfp4(w: torch.Tensor):
    """compressed-tensors' own NVFP4A16 path for one bf16 matrix: LC's memoryless min-max observer math feeding CT's
    `generate_gparam` / `calculate_qparams`, then `NVFP4PackedCompressor.compress` (quantize + cast_to_fp4 +
    pack_fp4_to_uint8) -- what llm-compressor runs per Linear."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["NVFP4A16"])
    flat = w.reshape(1, 1, -1)
    gs = generate_gparam(torch.amin(flat, dim=(0, -1)), torch.amax(flat, dim=(0, -1)))
    groups = w.unflatten(-1, (-1, 16)).unsqueeze(0)
    scale, _ = calculate_qparams(torch.amin(groups, dim=(0, -1)), torch.amax(groups, dim=(0, -1)), scheme.weights,
                                 global_scale=gs)
    out = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    return out["weight_packed"], out["weight_scale"], gs


def _ct_fp8_block(w: torch.Tensor, scale: torch.Tensor | None = None):
    """compressed-tensors' own FP8_BLOCK path: per-128x128 min-max -> `calculate_qparams` -> compressor."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant

    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["FP8_BLOCK"])
    if scale is None:
        bh, bw = scheme.weights.block_structure
        padded = maybe_pad_tensor_for_block_quant(w, (bh, bw))
        r, c = padded.shape
        obs = padded.reshape(r // bh, bh, c // bw, bw).transpose(1, 2).flatten(-2).unsqueeze(0)
        scale, _ = calculate_qparams(torch.amin(obs, dim=(0, -1)), torch.amax(obs, dim=(0, -1)), scheme.weights)
    out = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return out["weight"], scale


def _ours_nvfp4(w: torch.Tensor):
    from quant.nvfp4 import quantize_nvfp4, shared_global_scale

    gs = shared_global_scale(w)
    packed, scale = quantize_nvfp4(w, gs)
    return packed, scale, gs


def _ours_fp8_block(w: torch.Tensor):
    from quant.fp8 import quantize_fp8_block

    return quantize_fp8_block(w)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def kernels_vs_ct(model: Path, repeat: int) -> dict:
    """Same matrices, both implementations, best-of-N wall time; bytes compared."""
    ckpt = open_checkpoint(model)
    try:
        moe = min(ckpt.config.moe_layers)
        mats = {f"expert0.{p}": ckpt.read_expert(f"model.layers.{moe}.moe.{p}.weight", 0).clone()
                for p in ("gate_proj", "up_proj", "down_proj")}
        mats["dense.gate_proj"] = ckpt.read("model.layers.0.mlp.gate_proj.weight").clone()
    finally:
        ckpt.close()
    res = {}
    for name, w in mats.items():
        n = w.numel()
        ours_p, ours_s, ours_g = _ours_nvfp4(w)
        ct_p, ct_s, ct_g = _ct_nvfp4(w)
        q, s_inv = _ours_fp8_block(w)
        ct_q32, _ = _ct_fp8_block(w.float(), s_inv)  # CT on float32 with our float32 scale: the same codes
        ct_repeat = max(1, repeat // 2)  # CT takes seconds per matrix
        t = {"nvfp4": (_best(partial(_ours_nvfp4, w), repeat), _best(partial(_ct_nvfp4, w), ct_repeat)),
             "fp8-block": (_best(partial(_ours_fp8_block, w), repeat), _best(partial(_ct_fp8_block, w), ct_repeat))}
        res[name] = {"shape": list(w.shape), "params": n}
        for scheme, (ours, ct) in t.items():
            res[name][scheme] = {"ours_s": ours, "ct_s": ct, "ours_mparam_s": n / ours / 1e6,
                                 "ct_mparam_s": n / ct / 1e6, "speedup": ct / ours}
        res[name]["nvfp4"]["identical"] = _same(ours_p, ct_p) and _same(ours_s, ct_s) and _same(ours_g, ct_g)
        res[name]["fp8-block"]["identical"] = _same(q, ct_q32)
    res["load"] = load()
    return res


# ------------------------------------------------------------------------------------------------ main


def summary(r: dict) -> str:
    cr, fr = r["cold_read"], r["fast_read"]
    lines = [f"checkpoint {r['checkpoint']['path']}: {r['checkpoint']['bytes'] / 1e9:.2f} GB, "
             f"{r['checkpoint']['params'] / 1e9:.2f} B params; {r['machine']['cores']} cores, "
             f"load {r['machine']['load_start']} at start (shared machine: figures are noisy); code {r['code']}",
             f"cold read (cat, guest cache dropped, host cache as left): {cr['seconds']:.1f} s = "
             f"{cr['mb_per_s']:.0f} MB/s",
             f"fast read (cat, guest cache dropped after a read warmed the host's): {fr['seconds']:.1f} s = "
             f"{fr['mb_per_s']:.0f} MB/s",
             "",
             f"{'end to end (stepq quantize)':<30} {'wall s':>7} {'/fast':>6} {'/cold':>6} {'Mparam/s':>9} "
             f"{'convert s':>9} {'RssAnon MiB':>11} {'RSS MiB':>8} {'load':>5}"]
    for s, e in r["end_to_end"].items():
        if "error" in e:
            lines.append(f"{s:<30} failed: {e['error']}")
            continue
        lines.append(f"{s:<30} {e['wall_s']:>7.1f} {e['wall_s'] / fr['seconds']:>6.2f} "
                     f"{e['wall_s'] / cr['seconds']:>6.2f} {e['mparam_per_s']:>9.0f} "
                     f"{e['stepq_timings']['convert_s']:>9.1f} {e['peak_rss_anon_mib']:>11.0f} "
                     f"{e['peak_rss_mib']:>8.0f} {e['load_after']:>5}")
    lines += ["", f"{'kernel vs compressed-tensors':<28} {'ours Mparam/s':>13} {'CT Mparam/s':>11} {'speedup':>8} "
              f"{'identical':>9}"]
    for name, k in r["kernels"].items():
        if not isinstance(k, dict):
            continue
        for scheme in ("nvfp4", "fp8-block"):
            v = k[scheme]
            lines.append(f"{name + ' ' + scheme:<28} {v['ours_mparam_s']:>13.0f} {v['ct_mparam_s']:>11.1f} "
                         f"{v['speedup']:>7.0f}x {str(v['identical']):>9}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--moe-layers", type=int, help="override the size's MoE layer count (2+ for > RAM)")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of the generated one")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--repeat", type=int, default=5, help="kernel timings: best of N")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "stepq" / "bench" / "work",
                    help="scratch folder for artifacts (deleted after each stage); same disk as the source")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: e2e,kernels")
    ap.add_argument("--one-core", default="", help="schemes to run again on one core (taskset -c 0)")
    ap.add_argument("--code", type=Path, default=ROOT, help="the stepq checkout to run (default: this one)")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. before)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    size = dict(SIZES[a.size])
    if a.moe_layers:
        size["moe_layers"] = a.moe_layers
    r = {"size": a.size, "code": _describe(a.code), "machine": {"cores": fast_common.threads(), "cpu": platform.processor() or platform.machine(),
                                     "load_start": load(), "torch": torch.__version__,
                                     "numba": getattr(fast_common.numba, "__version__", None)}}
    t0 = time.perf_counter()
    model = a.model or gen_real_shaped.generate(gen_real_shaped.default_dir(**size), **size)
    r["generate_s"] = time.perf_counter() - t0
    ckpt = open_checkpoint(model)
    shards = [ckpt.shard_path(s) for s in sorted(ckpt.shards)]
    params = sum(_numel(t.entry.shape) for t in ckpt.tensors.values())
    ckpt.close()
    r["checkpoint"] = {"path": str(model), "bytes": sum(s.stat().st_size for s in shards), "params": params,
                       "shards": len(shards), **size}
    a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=a.work))
    try:
        print(f"cold and fast read of {len(shards)} shard(s) ...", flush=True)
        r["cold_read"] = timed_read(shards, "cold read (cat)")
        warm_host_cache(shards)
        r["fast_read"] = timed_read(shards, "fast read (cat)")
        schemes = a.schemes.split(",")
        r["end_to_end"] = {}
        if "e2e" not in skip:
            stats = synthetic_stats(model, work / "stats.safetensors") if NEEDS_STATS & set(schemes) else None
            runs = [(s, False) for s in schemes] + [(s, True) for s in filter(None, a.one_core.split(","))]
            for s, one in runs:
                label = f"{s} @1 core" if one else s
                print(f"end to end: stepq quantize --scheme {label} ...", flush=True)
                try:
                    r["end_to_end"][label] = end_to_end(model, s, shards, params, work, a.code,
                                                        stats if s in NEEDS_STATS else None, one)
                except SystemExit as e:  # one scheme failing (e.g. missing from older code) keeps the others
                    r["end_to_end"][label] = {"error": str(e)}
        r["kernels"] = {}
        if "kernels" not in skip:
            print("kernels vs compressed-tensors ...", flush=True)
            r["kernels"] = kernels_vs_ct(model, a.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["machine"]["load_end"] = load()
    suffix = (f"_{size['moe_layers']}moe" if a.moe_layers else "") + (f"_{a.tag}" if a.tag else "")
    out = ROOT / "bench" / "results" / f"convert_real_{a.size}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(summary(r))
    print(f"wrote {out}")


def _describe(code: Path) -> str:
    """The checkout's commit (and whether its tree has changes), for the results file."""
    r = subprocess.run(["git", "-C", str(code), "describe", "--always", "--dirty"], capture_output=True, text=True,
                       check=False)
    return f"{code} @ {r.stdout.strip() or 'unknown'}"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()

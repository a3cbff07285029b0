"""Calibration speed and memory on a real-shaped Step-3.5 checkpoint, and the full model's calibration time from it.

`stepq calibrate` (layer-streamed: one layer's weights in memory, activations in RAM or spilled to disk) runs as a
subprocess on bench/gen_real_shaped.py's checkpoint (1 dense layer, MoE layer(s) of the real shape, 1 MTP layer),
page cache dropped first, with a small local calibration set (the fixture's calib.txt through the fixture's
tokenizer: the ids are what matters for speed, not the text). Measured per run: wall time, peak RssAnon and RSS of
the process tree, and from the statistics file's own timings the seconds of each layer kind (dense, MoE, MTP).

Two runs with different token counts give, per layer kind, a line `seconds = fixed + tokens / rate`: `fixed` is
reading and building the layer (disk bound), `rate` the forward + statistics throughput (CPU bound). The full model
is 3 dense + 42 MoE trunk layers + 3 MTP layers, so on this machine

    full_time(T tokens) = 3 * dense(T) + 42 * moe(T) + 3 * mtp(T)      (+ embedding and head-input, measured)

Every MoE layer is taken to cost what the measured one does (real layer 3: sliding attention, 96 heads; a quarter of
the real MoE layers are full attention with 64 heads: slightly fewer FLOPs at these sequence lengths).

The same run measures the machine's GEMM rates (bf16 operands as torch runs them natively, and the fp32 GEMM the
engine widens bf16 operands to on CPUs without bf16 units: calib/compute.py), and the cold read of each layer kind's
bytes (page cache dropped, sequential reads), so each layer kind's throughput is shown as a share of the machine's
best GEMM rate for bf16 operands (FLOPs per token from the config) and its fixed cost against its read.

One 80 GB GPU is not measured here (no GPU): its column is a model with stated assumptions (see `gpu_estimate`).

Usage: .venv/bin/python bench/calib_real.py [--size quick|full] [--tokens 8192,36864] [--seq-len 2048]
Writes bench/results/calib_real_<size>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gen_real_shaped  # noqa: E402
from convert_real import SIZES, drop_page_cache, load, run_measured  # noqa: E402
from gguf_convert import with_tokenizer  # noqa: E402

from calib.stats import CalibStats  # noqa: E402
from convert.checkpoint import open_checkpoint  # noqa: E402

CALIB_TEXT = ROOT / "fixtures" / "tiny-step35-data" / "calib.txt"
REAL_LAYERS = {"dense": 3, "moe": 42, "mtp": 3}  # Step-3.5-Flash: layers 0-2 dense, 3-44 MoE, 45-47 MTP
# the larger run's compute should dwarf its reads; 36864 = two micro-batches of the real model's 18432
DEFAULT_TOKENS = {"quick": "4096,16384", "full": "8192,36864"}
CALIB_SETS = {"128 x 2048 (262k tokens)": 128 * 2048, "512 x 2048 (1M tokens)": 512 * 2048}

# One 80 GB GPU, assumed (not measured): H100 SXM-class, BF16 dense peak 989 TFLOP/s. stepq's forward on a GPU is
# the same code as here: per expert one GEMM per projection on its routed tokens (~512 rows per expert per
# micro-batch), launched from Python: 288 x 3 GEMMs of 512 x 4096 x 1280 per micro-batch, ~0.5 GFLOP each, a few
# tens of microseconds on an H100: launch-bound around 20-30% of peak; 25% is taken, 10% as the pessimistic case.
# Weights are read per layer from an NVMe disk at 3 GB/s into host memory and copied to the GPU (PCIe 5 ~25 GB/s)
# on the background thread while the previous layer computes; activations (tokens x 4096 x 2 bytes: 8.6 GB for 1M
# tokens, input and output) stay on the GPU beside one layer (9 GB).
GPU = {"tflops_peak": 989.0, "efficiency": {"25% of peak": 0.25, "10% of peak": 0.10}, "disk_gb_s": 3.0}
GEMM_SHAPES = {"expert 512x4096x1280": (512, 4096, 1280), "square 4096": (4096, 4096, 4096)}


def gemm_rates(seconds: float = 2.0) -> dict:
    """GFLOP/s of torch's GEMM on this machine, all cores, per shape: bf16 operands as torch runs them, fp32, and
    which one the engine uses here (calib.compute: the GEMM dtype for bf16 activations)."""
    import time

    import torch
    import torch.nn.functional as F

    from calib.compute import resolve

    out = {"engine_gemm_dtype": str(resolve("cpu", "bfloat16").gemm_dtype).removeprefix("torch."),
           "threads": torch.get_num_threads()}
    for name, (m, k, n) in GEMM_SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            F.linear(a, w)
            t, reps = time.perf_counter(), 0
            while time.perf_counter() - t < seconds:
                F.linear(a, w)
                reps += 1
            out.setdefault(name, {})[str(dtype).removeprefix("torch.")] = 2 * m * k * n * reps / (
                time.perf_counter() - t) / 1e9
    # the rate bf16 operands can get on this machine: natively, or widened to fp32 (exact) as the engine does
    out["best_gflops"] = max(max(v.values()) for k, v in out.items() if k in GEMM_SHAPES)
    return out


def cold_read_s(model: Path, kinds: dict[int, str]) -> dict[str, float]:
    """Seconds to read one layer of each kind from the disk: page cache dropped, each tensor's bytes in order."""
    import time

    ckpt = open_checkpoint(model)
    try:
        by_layer: dict[int, list] = {}
        for t in ckpt:
            if t.info.layer is not None:
                by_layer.setdefault(t.info.layer, []).append(t)
        out = {}
        for i, kind in kinds.items():
            if kind in out:
                continue
            drop_page_cache(sorted(model.glob("*.safetensors")))
            t0 = time.perf_counter()
            for t in by_layer[i]:
                fd = os.open(model / t.shard, os.O_RDONLY)
                try:
                    for off in range(t.entry.start, t.entry.start + t.entry.nbytes, 64 << 20):
                        os.pread(fd, min(64 << 20, t.entry.start + t.entry.nbytes - off), off)
                finally:
                    os.close(fd)
            out[kind] = time.perf_counter() - t0
        return out
    finally:
        ckpt.close()


def utilisation(model_fit: dict, flops: dict, rates: dict, reads: dict) -> dict:
    """Per layer kind: effective GFLOP/s, its share of the machine's best GEMM rate, fixed cost / cold read."""
    out = {}
    for kind, f in model_fit.items():
        if kind == "other":
            continue
        gflops = f["tokens_per_s"] * flops[kind] / 1e9
        out[kind] = {"gflops": gflops, "share_of_gemm_rate": gflops / rates["best_gflops"],
                     "fixed_over_cold_read": f["fixed_s"] / reads[kind] if reads.get(kind) else None,
                     "cold_read_s": reads.get(kind)}
    return out


def layer_kinds(model: Path) -> dict[int, str]:
    ckpt = open_checkpoint(model)
    try:
        cfg = ckpt.config
        return {i: "mtp" if cfg.is_mtp(i) else "moe" if i in cfg.moe_layers else "dense"
                for i in range(cfg.num_layers)}
    finally:
        ckpt.close()


def layer_bytes(model: Path) -> dict[int, int]:
    ckpt = open_checkpoint(model)
    try:
        per: dict[int, int] = {}
        for t in ckpt.tensors.values():
            if t.info.layer is not None:
                per[t.info.layer] = per.get(t.info.layer, 0) + t.entry.nbytes
        return per
    finally:
        ckpt.close()


def calibrate_run(model: Path, shards: list[Path], n: int, seq_len: int, work: Path) -> dict:
    """One cold-cache `stepq calibrate` of n x seq_len tokens; its figures and per-layer timings."""
    out = work / f"calib-{n}x{seq_len}"
    drop_page_cache(shards)
    m = run_measured([sys.executable, "-m", "stepq.cli", "calibrate", str(model), "--dataset", str(CALIB_TEXT),
                      "--num-samples", str(n), "--seq-len", str(seq_len), "--out", str(out), "--force"])
    meta = CalibStats.load(Path(m.pop("path"))).meta
    shutil.rmtree(out, ignore_errors=True)
    return {"n": n, "seq_len": seq_len, "tokens": n * seq_len, **m, "load_after": load(),
            "compute_dtype": meta["compute_dtype"], "compute": meta.get("compute"),
            "micro_batch_tokens": meta.get("micro_batch_tokens"), "activations_on_disk": meta["activations_on_disk"],
            "timings": meta["timings"]}


def fit(runs: list[dict], kinds: dict[int, str]) -> dict[str, dict]:
    """Per layer kind: seconds = fixed + tokens / rate, through the two runs (MTP layers see L-k tokens per row)."""
    lo, hi = sorted(runs, key=lambda r: r["tokens"])[:: len(runs) - 1]
    out = {}
    for kind in ("dense", "moe", "mtp"):
        layers = [i for i, k in kinds.items() if k == kind]
        if not layers:
            continue
        t_lo = sum(lo["timings"][f"layer_{i}_s"] for i in layers) / len(layers)
        t_hi = sum(hi["timings"][f"layer_{i}_s"] for i in layers) / len(layers)
        slope = (t_hi - t_lo) / (hi["tokens"] - lo["tokens"])
        if slope > 0:
            out[kind] = {"fixed_s": max(t_lo - slope * lo["tokens"], 0.0), "tokens_per_s": 1 / slope, "fit": "line"}
        else:  # noise larger than the compute (a shared machine): the larger run's average, which overstates time
            out[kind] = {"fixed_s": 0.0, "tokens_per_s": hi["tokens"] / t_hi, "fit": "larger run's average"}
        out[kind]["measured_s"] = {lo["tokens"]: t_lo, hi["tokens"]: t_hi}
    rest = [r["timings"].get("embed_s", 0) + r["timings"].get("lm_head_s", 0) + r["timings"].get("data_s", 0)
            for r in (lo, hi)]
    out["other"] = {"per_token_s": max((rest[1] - rest[0]) / (hi["tokens"] - lo["tokens"]), 0.0),
                    "fixed_s": rest[0]}
    return out


def flops_per_token(model: Path, kinds: dict[int, str], seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of each layer kind: 2 x the weights a token multiplies (attention projections, dense
    MLP or shared expert + top-k routed experts + router) + attention scores over the average causal context."""
    ckpt = open_checkpoint(model)
    try:
        cfg, raw = ckpt.config, ckpt.config.raw
        per: dict[str, float] = {}
        for i, kind in kinds.items():
            if kind in per:
                continue
            macs = 0
            for t in ckpt.tensors.values():
                if t.info.layer != i or len(t.entry.shape) < 2 or "embed" in t.info.name or "head" in t.info.name:
                    continue
                if len(t.entry.shape) == 3:  # an expert stack: a token goes through top_k of them
                    macs += raw["moe_top_k"] * t.entry.shape[1] * t.entry.shape[2]
                else:
                    macs += t.entry.shape[0] * t.entry.shape[1]
            sliding = cfg.raw["layer_types"][min(i, len(raw["layer_types"]) - 1)] == "sliding_attention"
            other = raw.get("attention_other_setting", {})
            heads = other.get("num_attention_heads", raw["num_attention_heads"]) if sliding else raw[
                "num_attention_heads"]
            ctx = min(seq_len / 2, raw["sliding_window"]) if sliding else seq_len / 2
            macs += 2 * heads * raw["head_dim"] * ctx  # QK^T and attention x V
            per[kind] = 2.0 * macs
        return per
    finally:
        ckpt.close()


def gpu_estimate(tokens: int, flops: dict[str, float], real_bytes: dict[str, float], efficiency: float) -> float:
    """Seconds on one 80 GB GPU under GPU's assumptions: per layer max(read, compute) (the next layer's read overlaps
    this one's compute) plus the first layer's read."""
    rate = GPU["tflops_peak"] * 1e12 * efficiency
    total, first = 0.0, None
    for kind, count in REAL_LAYERS.items():
        read = real_bytes[kind] / (GPU["disk_gb_s"] * 1e9)
        compute = tokens * flops[kind] / rate
        total += count * max(read, compute)
        first = read if first is None else first
    return total + first


def extrapolate(model_fit: dict, flops: dict, real_bytes: dict) -> list[dict]:
    rows = []
    for name, tokens in CALIB_SETS.items():
        cpu = sum(count * (model_fit[k]["fixed_s"] + tokens / model_fit[k]["tokens_per_s"])
                  for k, count in REAL_LAYERS.items())
        cpu += model_fit["other"]["fixed_s"] + tokens * model_fit["other"]["per_token_s"]
        rows.append({"calibration set": name, "tokens": tokens, "this_machine_s": cpu,
                     "gpu_80gb_estimate_s": {k: gpu_estimate(tokens, flops, real_bytes, eff)
                                             for k, eff in GPU["efficiency"].items()}})
    return rows


def real_layer_bytes(model: Path, kinds: dict[int, str]) -> dict[str, float]:
    """Bytes of one layer of each kind in the real checkpoint: the measured layer's bytes, whose shapes are real
    (gen_real_shaped checks them against the real inventory) for the full size; scaled to 288 experts otherwise."""
    sizes = layer_bytes(model)
    out = {}
    for i, kind in kinds.items():
        out.setdefault(kind, float(sizes[i]))
    return out


def summary(r: dict) -> str:
    lines = [f"checkpoint {r['checkpoint']['path']}: {r['checkpoint']['bytes'] / 1e9:.2f} GB; "
             f"{r['machine']['cores']} cores, load {r['machine']['load_start']} at start", "",
             f"{'run':<14} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'RssAnon MiB':>11} {'RSS MiB':>8} {'dtype':>9} "
             f"{'spilled':>7}"]
    for run in r["runs"]:
        lines.append(f"{run['n']}x{run['seq_len']:<11} {run['tokens']:>7} {run['wall_s']:>7.1f} "
                     f"{run['tokens'] / run['wall_s']:>7.1f} {run['peak_rss_anon_mib']:>11.0f} "
                     f"{run['peak_rss_mib']:>8.0f} {run['compute_dtype']:>9} {str(run['activations_on_disk']):>7}")
    g = r["gemm"]
    lines += ["", "GEMM rates here (GFLOP/s, all cores): " + "; ".join(
        f"{shape}: bf16 {g[shape]['bfloat16']:.0f}, fp32 {g[shape]['float32']:.0f}" for shape in GEMM_SHAPES)
        + f"; the engine's GEMM dtype for bf16 activations: {g['engine_gemm_dtype']}; best {g['best_gflops']:.0f}"]
    lines += ["", f"{'layer kind':<10} {'fixed s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of GEMM':>8} {'read s':>7} "
                  f"{'fixed/read':>10}   (seconds = fixed + tokens / rate)"]
    for kind, f in r["fit"].items():
        if kind != "other":
            u = r["utilisation"][kind]
            ratio = f"{u['fixed_over_cold_read']:.2f}" if u["fixed_over_cold_read"] is not None else "-"
            lines.append(f"{kind:<10} {f['fixed_s']:>8.1f} {f['tokens_per_s']:>9.1f} {u['gflops']:>8.1f} "
                         f"{u['share_of_gemm_rate']:>8.0%} {u['cold_read_s']:>7.1f} {ratio:>10}   ({f['fit']})")
    gpu_kinds = list(GPU["efficiency"])
    lines += ["", f"{'full model (3 dense + 42 MoE + 3 MTP)':<40} {'this machine':>14} "
              + " ".join(f"{'80 GB GPU*, ' + k:>30}" for k in gpu_kinds)]
    for row in r["extrapolation"]:
        lines.append(f"{row['calibration set']:<40} {_hours(row['this_machine_s']):>14} "
                     + " ".join(f"{_hours(row['gpu_80gb_estimate_s'][k]):>30}" for k in gpu_kinds))
    lines.append("* estimated, not measured (no GPU here): " + json.dumps(GPU))
    lines.append(f"FLOPs per token at L={r['seq_len']}: " + ", ".join(
        f"{k} {v / 1e6:.0f} M" for k, v in r["flops_per_token"].items()))
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of the generated one")
    ap.add_argument("--tokens", help="two token counts, N x seq-len each (default: 4096,16384 quick; 8192,36864 full)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "stepq" / "bench" / "work")
    a = ap.parse_args()
    size = SIZES[a.size]
    model = a.model or gen_real_shaped.generate(gen_real_shaped.default_dir(**size), **size)
    a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=a.work))
    try:
        calib_model = with_tokenizer(model, work)
        shards = sorted(model.glob("*.safetensors"))
        kinds = layer_kinds(model)
        r = {"machine": {"cores": len(os.sched_getaffinity(0)), "cpu": _cpu_name(), "load_start": load()},
             "seq_len": a.seq_len,
             "checkpoint": {"path": str(model), "bytes": sum(s.stat().st_size for s in shards), **size},
             "layers": {str(i): k for i, k in kinds.items()}, "runs": []}
        print("GEMM rates and cold reads ...", flush=True)
        r["gemm"] = gemm_rates()
        r["cold_read_s"] = cold_read_s(model, kinds)
        counts = sorted(int(x) for x in (a.tokens or DEFAULT_TOKENS[a.size]).split(","))
        for tokens in counts:
            print(f"stepq calibrate: {tokens // a.seq_len} x {a.seq_len} tokens ...", flush=True)
            r["runs"].append(calibrate_run(calib_model, shards, tokens // a.seq_len, a.seq_len, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["fit"] = fit(r["runs"], kinds)
    flops = flops_per_token(model, kinds, a.seq_len)
    r["flops_per_token"] = flops
    r["utilisation"] = utilisation(r["fit"], flops, r["gemm"], r["cold_read_s"])
    real_bytes = real_layer_bytes(model, kinds)
    if size["experts"] != 288:  # quick checkpoints have fewer experts: the GPU read time uses real-sized layers
        real_bytes["moe"] *= 288 / size["experts"]
    r["extrapolation"] = extrapolate(r["fit"], flops, real_bytes)
    r["gpu_assumptions"] = GPU
    r["machine"]["load_end"] = load()
    out = ROOT / "bench" / "results" / f"calib_real_{a.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(summary(r))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

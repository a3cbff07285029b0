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

One 80 GB GPU is not measured here (no GPU): its column is a model with stated assumptions (see `gpu_estimate`).

Usage: .venv/bin/python bench/calib_real.py [--size quick|full] [--tokens 4096,16384] [--seq-len 512]
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
DEFAULT_TOKENS = {"quick": "1024,4096", "full": "4096,16384"}  # the larger run's compute should dwarf its reads
CALIB_SETS = {"128 x 2048 (262k tokens)": 128 * 2048, "512 x 2048 (1M tokens)": 512 * 2048}

# One 80 GB GPU, assumed (not measured): H100 SXM-class, BF16 dense peak 989 TFLOP/s, of which calibration-sized
# grouped expert GEMMs (a few hundred tokens per expert per micro-batch) reach ~25%, and an eager per-expert loop
# (transformers-style, Python between small GEMMs) ~5%; weights streamed per layer from an NVMe disk at 3 GB/s into
# pinned host memory and over PCIe 5 (~25 GB/s), the next layer's read overlapping the current layer's compute;
# activations (tokens x 4096 x 2 bytes: 8.6 GB for 1M tokens) resident on the GPU beside one layer (9 GB).
GPU = {"tflops_peak": 989.0, "efficiency": {"grouped GEMM": 0.25, "eager expert loop": 0.05}, "disk_gb_s": 3.0}


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
            "compute_dtype": meta["compute_dtype"], "activations_on_disk": meta["activations_on_disk"],
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
    lines += ["", f"{'layer kind':<10} {'fixed s':>8} {'tokens/s':>9}   (seconds = fixed + tokens / rate)"]
    for kind, f in r["fit"].items():
        if kind != "other":
            lines.append(f"{kind:<10} {f['fixed_s']:>8.1f} {f['tokens_per_s']:>9.1f}   ({f['fit']})")
    gpu_kinds = list(GPU["efficiency"])
    lines += ["", f"{'full model (3 dense + 42 MoE + 3 MTP)':<40} {'this machine':>14} "
              + " ".join(f"{'80 GB GPU*, ' + k:>30}" for k in gpu_kinds)]
    for row in r["extrapolation"]:
        lines.append(f"{row['calibration set']:<40} {_hours(row['this_machine_s']):>14} "
                     + " ".join(f"{_hours(row['gpu_80gb_estimate_s'][k]):>30}" for k in gpu_kinds))
    lines.append("* estimated, not measured (no GPU here): " + json.dumps(GPU))
    return "\n".join(lines)


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of the generated one")
    ap.add_argument("--tokens", help="two token counts, N x seq-len each (default: 1024,4096 quick; 4096,16384 full)")
    ap.add_argument("--seq-len", type=int, default=512)
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
        r = {"machine": {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor(),
                         "load_start": load()},
             "checkpoint": {"path": str(model), "bytes": sum(s.stat().st_size for s in shards), **size},
             "layers": {str(i): k for i, k in kinds.items()}, "runs": []}
        counts = sorted(int(x) for x in (a.tokens or DEFAULT_TOKENS[a.size]).split(","))
        for tokens in counts:
            print(f"stepq calibrate: {tokens // a.seq_len} x {a.seq_len} tokens ...", flush=True)
            r["runs"].append(calibrate_run(calib_model, shards, tokens // a.seq_len, a.seq_len, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["fit"] = fit(r["runs"], kinds)
    flops = flops_per_token(model, kinds, 2048)
    r["flops_per_token_at_2048"] = flops
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

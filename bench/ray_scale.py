"""`--executor ray` against the local executor on this machine: conversion of the real-shaped checkpoint and
calibration of the quick one, with one and two Ray workers, and whether the results are the local run's.

A Ray cluster is started here for each worker count (a head without CPUs, then W worker nodes of 1 CPU each: a
"worker" is one node's task slot, so 2 workers use both cores, as the local executor does). Each run is
`stepq quantize|calibrate ... --executor ray --ray-address A` as a subprocess, the page cache of the source dropped
first and the VM host's cache warmed by one read (bench/convert_real.py: the "fast read" conditions). Measured per
run: wall time, Mparam/s, peak RssAnon of the driver's process tree and, separately, the sum over the Ray worker
processes (`ray::*`), sampled every 50 ms. Conversion outputs are compared file by file with the local run's
(bench/fault_soak.artifact_digest: every byte but stepq.json's timings, memory and executor); statistics tensor by
tensor (maxima and counts must be equal; sums of squares are counted where they differ at all).

Usage: .venv/bin/python bench/ray_scale.py [--workers 1,2] [--scheme nvfp4a16] [--skip convert,calibrate]
Writes bench/results/ray_scale.json and prints a table. The N-node model is in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import calib_real  # noqa: E402
import convert_real  # noqa: E402
import fault_soak  # noqa: E402
from gguf_convert import with_tokenizer  # noqa: E402
from safetensors import safe_open  # noqa: E402

CONVERT_MODEL = Path.home() / ".cache" / "stepq" / "bench" / "real-1moe"            # convert_real.py --size full
CALIB_MODEL = Path.home() / ".cache" / "stepq" / "bench" / "real-1moe-32e-v32768"   # --size quick
OBJECT_STORE_BYTES = 2 << 30  # per node


class RayWorkerMemory(threading.Thread):
    """Peak of the summed RssAnon of every Ray worker process (process title `ray::...`) while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in (d for d in os.listdir("/proc") if d.isdigit()):
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        if not f.read(5).startswith(b"ray::"):
                            continue
                except OSError:
                    continue
                total += convert_real._status_kib(int(p), "RssAnon")
            self.peak_kib = max(self.peak_kib, total)
            self.stop.wait(0.05)


def measured(cmd: list[str], shards: list[Path]) -> dict:
    convert_real.drop_page_cache(shards)
    workers = RayWorkerMemory()
    workers.start()
    try:
        m = convert_real.run_measured(cmd)
    finally:
        workers.stop.set()
        workers.join()
    return {**m, "ray_workers_peak_rss_anon_mib": round(workers.peak_kib / 1024, 1), "load_after": convert_real.load()}


def cluster(workers: int):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES,
                                                      "include_dashboard": False})
    for _ in range(workers):
        c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    c.wait_for_nodes()
    return c


def params_of(model: Path) -> int:
    from convert.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    try:
        return sum(convert_real._numel(t.entry.shape) for t in ckpt.tensors.values())
    finally:
        ckpt.close()


def convert_runs(scheme: str, worker_counts: list[int], work: Path) -> dict:
    model = CONVERT_MODEL
    if not model.is_dir():
        raise SystemExit(f"{model}: run bench/convert_real.py --size full first (it generates the checkpoint)")
    shards = sorted(model.glob("*.safetensors"))
    params = params_of(model)
    convert_real.warm_host_cache(shards)
    base = [sys.executable, "-m", "stepq.cli", "quantize", str(model), "--scheme", scheme]
    runs = {}
    local_out = work / "local"
    runs["local"] = measured([*base, "--out", str(local_out)], shards)
    reference = fault_soak.artifact_digest(Path(runs["local"].pop("path")))
    for w in worker_counts:
        c = cluster(w)
        try:
            out = work / f"ray{w}"
            r = measured([*base, "--out", str(out), "--executor", "ray", "--ray-address", c.address], shards)
        finally:
            c.shutdown()
        r["identical_to_local"] = fault_soak.artifact_digest(Path(r.pop("path"))) == reference
        runs[f"ray, {w} worker{'s' * (w > 1)}"] = r
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(local_out, ignore_errors=True)
    for r in runs.values():
        r["mparam_per_s"] = round(params / r["wall_s"] / 1e6, 1)
    return {"model": str(model), "source_bytes": sum(s.stat().st_size for s in shards), "params": params,
            "scheme": scheme, "runs": runs}


def _compare_stats(path: Path, reference: Path) -> dict:
    with safe_open(path, "pt") as a, safe_open(reference, "pt") as b:
        keys = sorted(b.keys())
        exact, sums_apart, sums = True, 0, 0
        for k in keys:
            x, y = a.get_tensor(k), b.get_tensor(k)
            if k.endswith(".input_sumsq"):
                sums += y.numel()
                sums_apart += int((x != y).sum())
            elif not bool((x == y).all()):
                exact = False
    return {"maxima_counts_loads_identical": exact, "sumsq_values": sums, "sumsq_values_apart": sums_apart}


def calibrate_runs(worker_counts: list[int], n: int, seq_len: int, work: Path) -> dict:
    model = CALIB_MODEL
    if not model.is_dir():
        raise SystemExit(f"{model}: run bench/calib_real.py --size quick first (it generates the checkpoint)")
    shards = sorted(model.glob("*.safetensors"))
    convert_real.warm_host_cache(shards)
    work.mkdir(parents=True, exist_ok=True)
    model = with_tokenizer(model, work)  # a view of the checkpoint with the fixture's tokenizer
    base = [sys.executable, "-m", "stepq.cli", "calibrate", str(model), "--dataset", str(calib_real.CALIB_TEXT),
            "--num-samples", str(n), "--seq-len", str(seq_len), "--force"]
    runs = {}
    runs["local"] = measured([*base, "--out", str(work / "local")], shards)
    reference = Path(runs["local"].pop("path"))
    for w in worker_counts:
        c = cluster(w)
        try:
            r = measured([*base, "--out", str(work / f"ray{w}"), "--executor", "ray", "--ray-address", c.address],
                         shards)
        finally:
            c.shutdown()
        path = Path(r.pop("path"))
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["stepq_calibration"])
        r.update(_compare_stats(path, reference), shards=meta["executor"]["shards"])
        runs[f"ray, {w} worker{'s' * (w > 1)}"] = r
    for r in runs.values():
        r["tokens_per_s"] = round(n * seq_len / r["wall_s"], 1)
    return {"model": str(model), "tokens": n * seq_len, "n": n, "seq_len": seq_len, "runs": runs}


def table(title: str, runs: dict, rate: str) -> str:
    lines = [title, f"| run | wall s | {rate} | driver RssAnon MiB | Ray workers RssAnon MiB | same as local |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        same = r.get("identical_to_local", r.get("maxima_counts_loads_identical", "-"))
        if "sumsq_values_apart" in r:
            same = f"{same} (sums apart: {r['sumsq_values_apart']} of {r['sumsq_values']})"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r[rate]} | {r['peak_rss_anon_mib']:.0f} | "
                     f"{r['ray_workers_peak_rss_anon_mib']:.0f} | {same} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--scheme", default="nvfp4a16")
    ap.add_argument("--calib-tokens", default="4x2048", help="N x L calibration tokens (two micro-batches: 2 shards)")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    skip = set(args.skip.split(","))
    n, seq_len = (int(v) for v in args.calib_tokens.split("x"))
    result = {"machine": {"cores": os.cpu_count(), "load_start": convert_real.load()},
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="stepq-ray-bench-", dir=Path.home() / ".cache" / "stepq" / "bench") as w:
        if "convert" not in skip:
            result["convert"] = convert_runs(args.scheme, counts, Path(w) / "convert")
            print(table(f"conversion, {args.scheme}, {result['convert']['source_bytes'] / 1e9:.2f} GB",
                        result["convert"]["runs"], "mparam_per_s"), flush=True)
        if "calibrate" not in skip:
            result["calibrate"] = calibrate_runs(counts, n, seq_len, Path(w) / "calibrate")
            print(table(f"calibration, {n}x{seq_len} tokens", result["calibrate"]["runs"], "tokens_per_s"),
                  flush=True)
    out = ROOT / "bench" / "results" / "ray_scale.json"
    if skip & {"convert", "calibrate"} and out.is_file():  # a partial run keeps the other stage's figures
        result = {**json.loads(out.read_text()), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""GPTQ at real scale on this machine: time, memory and disk per MoE layer of Step-3.5-Flash, and the full model's.

Three stages (`--stage micro,e2e,model`, all by default):

micro  The GPTQ numerics at real shapes, through stepq's own per-piece code (`calib.gptq.GptqPass._quantize`: the
       layout's NVFP4 grids, llm-compressor's `quantize_weight`, the layout's encoding) on the real-shaped
       checkpoint's MoE layer (bench/gen_real_shaped.py, 288 experts; `--model`): one expert's gate+up (2 x
       [1280, 4096] sharing a 4096^2 Hessian) and down ([4096, 1280], 1280^2 Hessian), `--experts` of them, and
       every dense quantized unit of the layer (attention q/k/v(+g), o_proj [4096, 12288], shared expert). Hessians
       are built from random bf16 inputs (the numerics' cost does not depend on their values; `--hessian-tokens`
       rows, damped by GPTQ's 1 %). Also `add_to_hessian` (llm-compressor's `accumulate_hessian`) per 1k tokens at
       each input width, and the process's peak RSS / RssAnon.
e2e    `stepq calibrate` + `stepq quantize --scheme nvfp4a16 --method gptq` as subprocesses (the CLI), on a
       real-shaped checkpoint whose MoE layer has `--e2e-experts` experts (default 32, the "quick" size: the
       288-expert layer's GPTQ numerics alone are ~40 min here, see micro), with the fixture's calib.txt through
       the fixture's tokenizer (`--samples` x `--seq-len`). The routed experts' Hessian budget is scaled by
       experts / 288 (`calib.gptq.HESSIAN_BYTES` patched in the quantize process; the CLI has no flag) so the layer
       takes the real model's number of passes with the 8 GiB default. Measured: wall, peak RssAnon and RSS of the
       process tree (20 ms polls), peak size of the `.gptq` folder (polled), stepq.json's `gptq` section
       (forward passes per layer, the pass's time) and the per-layer split from the run's log lines.
model  Per MoE layer and for the full model (42 MoE layers + 3 dense + 3 MTP) on this machine, from micro + e2e
       + bench/results/calib_real_full.json (the forward's measured rate): every assumption is in the output.

Usage: .venv/bin/python bench/gptq_real.py [--stage micro,e2e,model] [--experts 3] [--samples 16 --seq-len 2048]
Writes bench/results/gptq_real.json (merging stages already there) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gen_real_shaped
from convert_real import _status_kib, _tree, drop_page_cache, load
from gguf_convert import with_tokenizer

RESULT = ROOT / "bench" / "results" / "gptq_real.json"
CALIB_TEXT = ROOT / "fixtures" / "tiny-step35-data" / "calib.txt"
REAL = {"experts": 288, "top_k": 8, "hidden": 4096, "moe_inter": 1280, "moe_layers": 42, "dense_layers": 3,
        "mtp_layers": 3, "hessian_bytes_default": 8 << 30}


# ------------------------------------------------------------------------------------------------ memory
class PeakMem:
    """Peak RssAnon / VmRSS of this process, polled every 20 ms on a thread."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for k in self.peak:
                self.peak[k] = max(self.peak[k], _status_kib(os.getpid(), k))
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    def mib(self) -> dict:
        return {"peak_rss_anon_mib": self.peak["RssAnon"] / 1024, "peak_rss_mib": self.peak["VmRSS"] / 1024,
                "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------ micro
def _fake_hessian(columns: int, tokens: int, seed: int):
    """A calib.gptq._Hessian from `tokens` random bf16 inputs with a few strong channels (as real activations)."""
    import torch

    from calib.gptq import _Hessian

    g = torch.Generator().manual_seed(seed)
    h = _Hessian(columns, "cpu")
    scale = torch.ones(columns)
    scale[torch.randperm(columns, generator=g)[: columns // 64]] = 20.0
    for s in range(0, tokens, 4096):
        n = min(4096, tokens - s)
        h.add((torch.randn(n, columns, generator=g) * scale).to(torch.bfloat16))
    return h


def micro(model: Path, n_experts: int, hessian_tokens: int) -> dict:
    import torch

    import calib.gptq as cg
    from convert.checkpoint import open_checkpoint
    from convert.safetensors_export import SourceReader, load_recipe, plan_units
    from quant.gptq import add_to_hessian, empty_hessian
    from quant.layouts import layout_for

    out = {"threads": torch.get_num_threads(), "hessian_tokens": hessian_tokens}
    # add_to_hessian per 1k tokens at each input width (bf16 inputs, as the engine hands them over)
    acc = {}
    for cols in (1280, 4096, 12288):
        h, c = empty_hessian(cols)
        x = torch.randn(1024, cols).to(torch.bfloat16)
        add_to_hessian(h, c, x)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            add_to_hessian(h, c, x)
            reps += 1
        s = (time.perf_counter() - t0) / reps
        acc[str(cols)] = {"s_per_1k_tokens": s, "gflops": 2 * 1024 * cols * cols / s / 1e9}
        del h
    out["add_to_hessian"] = acc
    print("add_to_hessian per 1k tokens: " + ", ".join(f"{k} cols {v['s_per_1k_tokens'] * 1e3:.0f} ms "
                                                       f"({v['gflops']:.0f} GFLOP/s)" for k, v in acc.items()),
          flush=True)

    ckpt = open_checkpoint(model)
    try:
        layout = layout_for("nvfp4a16", "gptq")
        units = [u for u in plan_units(ckpt, load_recipe("nvfp4a16")) if u.quantize]
        moe_layer = min(ckpt.config.moe_layers)
        layer_units = [u for u in units if u.members[0].info.layer == moe_layer]
        drv = cg.GptqPass(units, layout, SourceReader(ckpt))
        timing = {"grids": 0.0, "gptq": 0.0}
        real_gptq, real_grids = cg.gptq_shared, layout.grids

        def timed(key, fn):
            def f(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    timing[key] += time.perf_counter() - t
            return f

        cg.gptq_shared = timed("gptq", real_gptq)
        layout.grids = timed("grids", real_grids)
        pieces = []
        hessians: dict[tuple, object] = {}
        try:
            with PeakMem() as mem:
                for u in layer_units:
                    cols = u.members[0].entry.shape[-1]
                    experts = range(n_experts) if u.experts else [None]
                    for e in experts:
                        key = (cols, e)
                        if key not in hessians:  # gate/up and down of one expert: distinct widths
                            t = time.perf_counter()
                            hessians[key] = _fake_hessian(cols, max(hessian_tokens, cols + 256), hash(key) & 0xFFFF)
                            hessian_s = time.perf_counter() - t
                        else:
                            hessian_s = 0.0
                        timing.update(grids=0.0, gptq=0.0)
                        t = time.perf_counter()
                        drv._quantize(u, e, hessians[key])
                        total = time.perf_counter() - t
                        rec = drv.records[-1]
                        pieces.append({"unit": rec["module"], "expert": e,
                                       "shapes": [list(m.entry.shape[-2:]) for m in u.members], "columns": cols,
                                       "total_s": total, "gptq_s": timing["gptq"], "grids_s": timing["grids"],
                                       "read_encode_s": total - timing["gptq"] - timing["grids"],
                                       "method": rec["method"], "fake_hessian_s": hessian_s})
                        print(f"  {rec['module'][:60]:<60} e={e!s:>4} {total:7.2f} s (gptq {timing['gptq']:.2f}, "
                              f"grids {timing['grids']:.2f}) {rec['method']}", flush=True)
                    if u.experts:
                        for e in experts:
                            hessians.pop((cols, e), None)
                emitted_bytes = sum(t.nbytes for t in drv.emitted.values())
        finally:
            cg.gptq_shared, layout.grids = real_gptq, real_grids
    finally:
        ckpt.close()
    out["pieces"] = pieces
    out["memory"] = mem.mib()
    out["emitted_bytes_measured"] = emitted_bytes
    # per expert: gate+up and down pieces of the same expert summed, averaged over the experts measured
    exp = [p for p in pieces if p["expert"] is not None]
    per = {}
    for p in exp:
        d = per.setdefault(p["expert"], {"total_s": 0.0, "gptq_s": 0.0, "grids_s": 0.0})
        for k in d:
            d[k] += p[k]
    out["per_expert"] = {k: sum(d[k] for d in per.values()) / len(per) for k in ("total_s", "gptq_s", "grids_s")}
    out["dense_per_layer"] = {k: sum(p[k] for p in pieces if p["expert"] is None)
                              for k in ("total_s", "gptq_s", "grids_s")}
    out["moe_layer_numerics_s"] = out["per_expert"]["total_s"] * REAL["experts"] + out["dense_per_layer"]["total_s"]
    print(f"per expert {out['per_expert']['total_s']:.2f} s (gptq {out['per_expert']['gptq_s']:.2f}); dense units "
          f"of the layer {out['dense_per_layer']['total_s']:.1f} s; one 288-expert MoE layer's numerics "
          f"{out['moe_layer_numerics_s'] / 60:.1f} min; peak RssAnon {out['memory']['peak_rss_anon_mib']:.0f} MiB",
          flush=True)
    return out


# ------------------------------------------------------------------------------------------------ e2e
def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_polled(cmd: list[str], watch: Path | None, log: Path, lock: Path | None = None) -> dict:
    """Run `cmd`; poll RssAnon / VmRSS of its tree (20 ms) and the size of `watch` (0.5 s) -> peaks; its stderr
    lines to `log` with the time each arrived. `lock`: held exclusively (flock) while it runs."""
    if lock is not None:
        import fcntl

        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            return run_polled(cmd, watch, log)
        finally:
            os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"RssAnon": 0, "VmRSS": 0, "disk": 0, "gptq_disk": 0}
    lines: list[tuple[float, str]] = []
    seen: dict[str, float] = {}  # .gptq/stats-NNN.safetensors -> seconds when first seen (a layer finished)

    def sample():
        last_du = 0.0
        while p.poll() is None:
            pids = _tree(p.pid)
            for k in ("RssAnon", "VmRSS"):
                peak[k] = max(peak[k], sum(_status_kib(q, k) for q in pids))
            if watch is not None and time.perf_counter() - last_du > 0.5 and watch.exists():
                peak["disk"] = max(peak["disk"], _du(watch))
                for g in watch.glob(".*.gptq"):
                    peak["gptq_disk"] = max(peak["gptq_disk"], _du(g))
                    for f in g.glob("stats-*.safetensors"):
                        seen.setdefault(f.name, round(time.perf_counter() - t0, 1))
                last_du = time.perf_counter()
            time.sleep(0.02)

    def read_err():
        for line in p.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for th in threads:
        th.start()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = p.stdout.read()
    p.wait()
    for th in threads:
        th.join()
    log.write_text("\n".join(f"{t:9.2f} {s}" for t, s in lines) + "\n")
    if p.returncode:
        sys.stderr.write("\n".join(s for _, s in lines[-30:]) + "\n")
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode} (log {log})")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_anon_mib": peak["RssAnon"] / 1024,
            "peak_rss_mib": peak["VmRSS"] / 1024, "peak_disk_watch_bytes": peak["disk"],
            "peak_gptq_dir_bytes": peak["gptq_disk"], "layer_files_seen_s": seen,
            "children_ru_maxrss_mib": max(ru0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024,
            "stdout": out.strip().splitlines()[-1] if out.strip() else "", "lines": lines}


# `stepq quantize` as the CLI runs it, with the routed experts' Hessian budget set (argv[1]) and timers around
# calib.gptq's pieces (written to argv[2] as JSON at exit): per layer the whole `run_layer`, the GPTQ numerics
# (`_quantize`: grids + quantize_weight + encode, per piece) and the Hessian accumulation in the forward's hooks.
QUANTIZE_WRAPPER = r"""
import atexit, json, sys, time
import calib.gptq as g
g.HESSIAN_BYTES = int(sys.argv[1])
T = {"layers": {}, "quantize_s": {}, "hessian_add_s": {}, "pieces": {}}
cur = [None]
def wrap(obj, name, key):
    fn = getattr(obj, name)
    def f(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            d = T[key]; d[cur[0]] = d.get(cur[0], 0.0) + time.perf_counter() - t
            if key == "quantize_s": T["pieces"][cur[0]] = T["pieces"].get(cur[0], 0) + 1
    setattr(obj, name, f)
run_layer = g.GptqPass.run_layer
def rl(self, module, prefix, layer, run):
    cur[0] = layer; t = time.perf_counter()
    try:
        return run_layer(self, module, prefix, layer, run)
    finally:
        T["layers"][layer] = time.perf_counter() - t
g.GptqPass.run_layer = rl
wrap(g.GptqPass, "_quantize", "quantize_s")
wrap(g._Hessian, "add", "hessian_add_s")
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(T)))
import stepq.cli as c
sys.exit(c.main(sys.argv[3:]))
"""


def e2e(experts: int, samples: int, seq_len: int, work_root: Path, keep: bool, lock: Path | None) -> dict:
    size = {"moe_layers": 1, "experts": experts, "vocab": 32768 if experts != REAL["experts"] else 128896}
    model = gen_real_shaped.generate(gen_real_shaped.default_dir(**size), **size)
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=work_root))
    r = {"checkpoint": {"path": str(model), **size,
                        "bytes": sum(s.stat().st_size for s in model.glob("*.safetensors"))},
         "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "load_start": load()}
    try:
        view = with_tokenizer(model, work)
        shards = sorted(model.glob("*.safetensors"))
        drop_page_cache(shards)
        print(f"stepq calibrate {samples} x {seq_len} ...", flush=True)
        cal = run_polled([sys.executable, "-m", "stepq.cli", "calibrate", str(view), "--dataset", str(CALIB_TEXT),
                          "--num-samples", str(samples), "--seq-len", str(seq_len), "--out", str(work / "calib"),
                          "--force"], None, work / "calibrate.log", lock)
        stats = cal.pop("stdout")
        cal.pop("lines")
        r["calibrate"] = cal
        budget = REAL["hessian_bytes_default"] * experts // REAL["experts"]
        r["hessian_bytes"] = budget
        out = work / "out"
        gptq_dir = out / f".{view.name}-NVFP4A16.gptq"  # variant name checked below
        drop_page_cache(shards)
        print(f"stepq quantize --scheme nvfp4a16 --method gptq (Hessian budget {budget / 2**30:.2f} GiB) ...",
              flush=True)
        # the variant's folder name is only known afterwards: watch the whole out folder (only .gptq grows in the
        # pass; the artifact is written after it) and separately the .gptq folder's own peak from the samples
        timers = work / "timers.json"
        q = run_polled([sys.executable, "-c", QUANTIZE_WRAPPER, str(budget), str(timers), "quantize", str(view), "--scheme",
                        "nvfp4a16", "--method", "gptq", "--stats", stats, "--out", str(out)], out,
                       work / "quantize.log", lock)
        artifact = Path(q.pop("stdout"))
        lines = q.pop("lines")
        r["quantize"] = q
        r["timers"] = json.loads(timers.read_text()) if timers.is_file() else None
        r["quantize"]["log_tail"] = [s for _, s in lines if "GPTQ" in s or "quantized" in s][-20:]
        prov = json.loads((artifact / "stepq.json").read_text())
        r["gptq_section"] = {k: v for k, v in prov["gptq"].items() if k != "not_gptq"}
        r["not_gptq"] = prov["gptq"]["not_gptq"]
        r["timings"] = prov.get("timings") or {k: v for k, v in prov.items() if k.endswith("_s")}
        r["artifact_bytes"] = sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
        r["gptq_dir_name"] = gptq_dir.name
        r["load_end"] = load()
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return r


# ------------------------------------------------------------------------------------------------ model
def model(r: dict) -> dict:
    """Per MoE layer and full model on this machine; every figure's origin named."""
    m = r.get("micro", {})
    calib = json.loads((ROOT / "bench" / "results" / "calib_real_full.json").read_text())
    fit = calib["fit"]
    E, H, I, K = REAL["experts"], REAL["hidden"], REAL["moe_inter"], REAL["top_k"]
    per_expert_h = 4 * (H * H + I * I)
    chunk = REAL["hessian_bytes_default"] // per_expert_h
    chunks = -(-E // chunk)
    passes = chunks + 1
    out = {"assumptions": [], "per_moe_layer": {}, "full_model": {}}
    A = out["assumptions"].append
    A(f"routed-expert Hessians fp32: {per_expert_h / 1e6:.1f} MB per expert (4096^2 + 1280^2), "
      f"{E * per_expert_h / 1e9:.1f} GB per layer; 8 GiB budget -> {chunk} experts per chunk, {chunks} chunks, "
      f"{passes} forward passes per MoE layer (chunks + 1 quantized pass)")
    A("forward pass cost per MoE layer from bench/results/calib_real_full.json (stepq calibrate on the 288-expert "
      f"real-shaped layer, this machine): {fit['moe']['fixed_s']:.1f} s + tokens / {fit['moe']['tokens_per_s']:.1f}"
      " tok/s; the GPTQ pass's forward is the same engine (calib.stream) without the statistics' observers, so this"
      " slightly overstates it")
    acc = m.get("add_to_hessian", {})
    per_tok_hess = None
    if acc:
        # routed: each token is in top_k experts' gate/up (4096) and down (1280) Hessians; dense: q/k/v(+g) 4096,
        # o_proj 12288 (sliding, 96 heads; 8192 on full-attention layers), shared expert 4096 and 1280
        routed = K * (acc["4096"]["s_per_1k_tokens"] + acc["1280"]["s_per_1k_tokens"]) / 1024
        dense = (2 * acc["4096"]["s_per_1k_tokens"] + acc["12288"]["s_per_1k_tokens"] +
                 acc["1280"]["s_per_1k_tokens"]) / 1024
        per_tok_hess = routed + dense
        A(f"Hessian accumulation per token per MoE layer: routed {routed * 1e3:.2f} ms (top-8 x (4096^2 + 1280^2)),"
          f" dense {dense * 1e3:.2f} ms (q/k/v, o_proj 12288^2, shared gate/up, shared down), from add_to_hessian "
          "per 1k tokens measured in micro; a routed token's Hessian is accumulated once (in its chunk's pass)")
    if m:
        numerics = m["moe_layer_numerics_s"]
        A(f"GPTQ numerics per MoE layer = 288 x per expert ({m['per_expert']['total_s']:.2f} s: grids + "
          f"quantize_weight + encode, gate/up and down) + the dense units ({m['dense_per_layer']['total_s']:.1f} s), "
          "measured in micro; independent of the token count")
    else:
        numerics = None
    A("every MoE layer costs what real layer 3 (sliding attention, 96 heads) does; a quarter are full attention "
      "(64 heads, o_proj 8192 wide): slightly cheaper")
    e = r.get("e2e")
    dense_numerics, dense_hess_per_tok = None, None
    if e and e.get("timers"):
        dense_numerics = e["timers"]["quantize_s"]["0"]
        dense_hess_per_tok = e["timers"]["hessian_add_s"]["0"] / e["tokens"]
        moe_hess = e["timers"]["hessian_add_s"]["1"] / e["tokens"]
        A(f"dense layers (3): 2 forward passes (calib_real_full.json's dense fit) + their GPTQ numerics "
          f"({dense_numerics:.0f} s) and Hessian accumulation ({dense_hess_per_tok * 1e3:.2f} ms/token), measured in "
          f"e2e on real layer 0 (q/k/v, o_proj 8192, MLP 11264); MTP layers (3): kept BF16 by the nvfp4a16 recipe "
          f"(`mtp: keep`): 1 forward pass each, no GPTQ (as measured in e2e). Cross-check: e2e's MoE layer "
          f"accumulated {moe_hess * 1e3:.2f} ms/token of Hessians (32 experts; a token reaches 8 whatever the "
          "count), the add_to_hessian model above predicts the 288-expert figure")
    nvfp4_expert = 3 * I * H * (0.5 + 1 / 16)  # packed e2m1 + one FP8 scale per 16
    out["per_moe_layer"]["memory"] = {
        "expert_hessians_chunk_bytes": chunk * per_expert_h,
        "expert_hessians_unchunked_bytes": E * per_expert_h,
        "dense_hessians_bytes": 4 * (2 * H * H + 12288 ** 2 + I * I),
        "emitted_nvfp4_experts_bytes": E * nvfp4_expert,
        "note": "held at once at the peak (last chunk's GPTQ): one chunk's Hessians + the dense Hessians (only in "
                "the first chunk's pass: freed after it) + every emitted tensor of the layer so far (up to the "
                "whole layer's NVFP4, ~2.7 GB, until take_state writes the layer's checkpoint) + the engine's "
                "activations (calib_real: < 3 GiB RssAnon at 36k tokens) + the mapped checkpoint (RSS, evictable)",
    }
    mem = out["per_moe_layer"]["memory"]
    mem["peak_rss_anon_estimate_bytes"] = (mem["expert_hessians_chunk_bytes"] + mem["dense_hessians_bytes"]
                                           + mem["emitted_nvfp4_experts_bytes"] + (3 << 30))
    out["per_moe_layer"]["disk"] = {
        "gptq_store_bytes": E * nvfp4_expert + 4 * 4096 * 12288 * 0.5625 + 3 * I * H * 0.5625,
        "note": "the layer's stats-NNN.safetensors = its quantized tensors (NVFP4 ~0.56 B/param) + the last "
                "layer's activations spilled beside it (tokens x 4096 x 2 B per copy, above 512 MiB)",
    }
    rows = {}
    for tokens in (16 * 2048, 128 * 2048, 512 * 2048):
        fwd = fit["moe"]["fixed_s"] + tokens / fit["moe"]["tokens_per_s"]
        hess = tokens * per_tok_hess if per_tok_hess else None
        layer = passes * fwd + (hess or 0) + (numerics or 0)
        dense_fwd = fit["dense"]["fixed_s"] + tokens / fit["dense"]["tokens_per_s"]
        mtp_fwd = fit["mtp"]["fixed_s"] + tokens / fit["mtp"]["tokens_per_s"]
        dense_layer = 2 * dense_fwd + (dense_numerics or 0) + tokens * (dense_hess_per_tok or 0)
        mtp_layer = mtp_fwd
        full = REAL["moe_layers"] * layer + REAL["dense_layers"] * dense_layer + REAL["mtp_layers"] * mtp_layer
        rows[str(tokens)] = {"forward_per_pass_s": fwd, "forward_passes": passes, "forward_s": passes * fwd,
                             "hessian_accumulation_s": hess, "gptq_numerics_s": numerics, "moe_layer_s": layer,
                             "full_model_s": full,
                             "mean_routed_tokens_per_expert": tokens * K / E,
                             "experts_gptq_possible": tokens * K / E >= H,
                             "gptq_store_peak_disk_bytes": None}
    out["per_moe_layer"]["time_by_tokens"] = rows
    A("an expert is GPTQ-quantized only if it saw >= its input width of routed tokens (4096 for gate/up, 1280 for "
      "down); with uniform routing the mean is tokens x 8 / 288, so below ~147k calibration tokens most experts "
      "fall back to round-to-nearest (but still cost their Hessian accumulation; their numerics are then ~grids "
      "only, so the numerics figure above is the all-GPTQ upper bound)")
    out["full_model"]["disk"] = {"gptq_store_bytes": REAL["moe_layers"] * out["per_moe_layer"]["disk"]["gptq_store_bytes"],
                                 "note": "~ the artifact's quantized size (all layers' checkpoints are kept until "
                                         "the export has read them), + one layer's spilled activations"}
    return out


# ------------------------------------------------------------------------------------------------ print
def summary(r: dict) -> str:
    L = []
    if "micro" in r:
        m = r["micro"]
        L.append(f"micro ({m['threads']} threads): per expert {m['per_expert']['total_s']:.2f} s "
                 f"(quantize_weight {m['per_expert']['gptq_s']:.2f} s, grids {m['per_expert']['grids_s']:.2f} s); "
                 f"dense units of one MoE layer {m['dense_per_layer']['total_s']:.1f} s; 288-expert layer numerics "
                 f"{m['moe_layer_numerics_s'] / 60:.1f} min; peak RssAnon {m['memory']['peak_rss_anon_mib']:.0f} MiB")
        for p in m["pieces"]:
            L.append(f"   {p['unit'][:64]:<64} e={p['expert']!s:>4} {p['shapes']!s:<28} {p['total_s']:7.2f} s "
                     f"(gptq {p['gptq_s']:.2f}, grids {p['grids_s']:.2f})")
    if "e2e" in r:
        e = r["e2e"]
        g = e["gptq_section"]
        L.append(f"e2e: {e['checkpoint']['experts']} experts, {e['samples']} x {e['seq_len']} tokens; calibrate "
                 f"{e['calibrate']['wall_s']:.0f} s; quantize {e['quantize']['wall_s']:.0f} s (GPTQ pass "
                 f"{g.get('pass_s')} s), peak RssAnon {e['quantize']['peak_rss_anon_mib']:.0f} MiB, RSS "
                 f"{e['quantize']['peak_rss_mib']:.0f} MiB, peak out/ disk {e['quantize']['peak_disk_watch_bytes'] / 1e9:.2f}"
                 f" GB; passes {g.get('forward_passes_per_layer')}; not GPTQ {len(e['not_gptq'])}")
    if "model" in r:
        for tokens, row in r["model"]["per_moe_layer"]["time_by_tokens"].items():
            L.append(f"model {tokens} tokens: MoE layer {row['moe_layer_s'] / 60:.1f} min (forward {row['forward_s'] / 60:.1f}, "
                     f"Hessians {(row['hessian_accumulation_s'] or 0) / 60:.1f}, numerics "
                     f"{(row['gptq_numerics_s'] or 0) / 60:.1f}); full model {row['full_model_s'] / 3600:.1f} h")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="micro,e2e,model")
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache" / "stepq" / "bench" / "real-1moe")
    ap.add_argument("--experts", type=int, default=3, help="micro: experts measured (gate/up + down each)")
    ap.add_argument("--hessian-tokens", type=int, default=4352, help="micro: random input rows per Hessian")
    ap.add_argument("--e2e-experts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "stepq" / "bench" / "work")
    ap.add_argument("--keep", action="store_true", help="e2e: keep the work folder (logs, artifact)")
    ap.add_argument("--lock", type=Path, help="e2e: hold this file's flock exclusively around each timed subprocess "
                                              "(a shared machine: /tmp/stepq-quiet.lock)")
    a = ap.parse_args()
    stages = a.stage.split(",")
    r = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    r.setdefault("machine", {})["cores"] = len(os.sched_getaffinity(0))
    if "micro" in stages:
        r["micro"] = micro(a.model, a.experts, a.hessian_tokens)
        r["micro"]["date"] = time.strftime("%Y-%m-%d %H:%M")
    if "e2e" in stages:
        r["e2e"] = e2e(a.e2e_experts, a.samples, a.seq_len, a.work, a.keep, a.lock)
        r["e2e"]["date"] = time.strftime("%Y-%m-%d %H:%M")
    if "model" in stages:
        r["model"] = model(r)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(r, indent=2, default=str) + "\n")
    print(summary(r))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

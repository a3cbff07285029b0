"""Speed of an artifact against its BF16 baseline: llama-bench for GGUF (CPU here), vLLM's serving benchmark when a
GPU and vLLM are there. Figures are tokens/s; a ratio quant/BF16 above 1 means the quant is faster.

Speed is informational (a warn-only gate at most): on a shared CPU the spread between runs is large, which is why
llama-bench runs every file in one process, alternating between them repetition by repetition, so that the files
of a ratio see the same machine load.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from convert.gguf_tools import run
from eval.gguf_logits import cpu_threads
from eval.schema import not_measured

# Per-run facts copied from llama-bench's JSON (same for every test of a file in one run).
LLAMA_BENCH_FIELDS = ("build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_type", "model_size",
                      "model_n_params", "n_threads", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn",
                      "n_gpu_layers")


def llama_bench(gguf_paths: Sequence[str | Path], threads: int | None = None, reps: int = 3, n_prompt: int = 512,
                n_gen: int = 128, interleave: bool = True, timeout: float | None = None) -> dict[str, dict]:
    """`llama-bench -o jsonl` over all files in one run -> {path: {"pp512": {"ts", "stddev", "samples"},
    "tg128": {...}, "build_commit", "cpu_info", "model_size", "n_threads", ...}} (test names follow n_prompt/n_gen).

    interleave=True runs one repetition per file in turn (A B A B ...), each preceded by llama-bench's warmup, so a
    load change on the machine hits every file alike; the model is reloaded per repetition (mmap'd, so cheap once
    it is in the page cache). interleave=False gives each file its `reps` repetitions in a row, loading it once.
    ts is the mean of the repetitions' tokens/s, stddev their sample standard deviation (llama-bench's own).
    """
    paths = [str(p) for p in gguf_paths]
    if not paths or reps < 1:
        raise ValueError("llama_bench needs at least one file and one repetition")
    order = paths * reps if interleave else paths
    args = [*[a for p in order for a in ("-m", p)], "-r", 1 if interleave else reps, "-p", n_prompt, "-n", n_gen,
            "-t", threads or cpu_threads(), "-o", "jsonl"]
    p = run("llama-bench", args, timeout=timeout)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return _by_file(rows, paths)


def _test_name(row: dict) -> str:
    """llama-bench's own names: pp512, tg128, pp512+tg128 (-pg), with @d<depth> when a KV depth was set."""
    name = "+".join(f"{kind}{n}" for kind, n in (("pp", row["n_prompt"]), ("tg", row["n_gen"])) if n)
    return name + (f" @ d{row['n_depth']}" if row.get("n_depth") else "")


def _by_file(rows: list[dict], paths: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {p: {} for p in paths}
    samples: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        path = row["model_filename"]
        if path not in out:
            raise RuntimeError(f"llama-bench reported a file it was not given: {path}")
        out[path].update({k: row[k] for k in LLAMA_BENCH_FIELDS if k in row})
        samples.setdefault((path, _test_name(row)), []).extend(float(s) for s in row["samples_ts"])
    for (path, test), ts in samples.items():
        out[path][test] = {"ts": statistics.fmean(ts), "stddev": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                           "samples": ts}
    missing = [p for p, r in out.items() if not any(isinstance(v, dict) and "ts" in v for v in r.values())]
    if missing:
        raise RuntimeError(f"llama-bench printed no result for {missing}")
    return out


def speed_ratios(result: dict, baseline: dict) -> dict[str, float]:
    """tokens/s of `result` over `baseline` (two entries of `llama_bench`'s output) for every test both have."""
    return {test: r["ts"] / baseline[test]["ts"] for test, r in result.items()
            if isinstance(r, dict) and "ts" in r and isinstance(baseline.get(test), dict) and baseline[test]["ts"] > 0}


def vllm_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def vllm_speed(model: str | Path | None = None, input_len: int = 1024, output_len: int = 128, num_prompts: int = 200,
               max_concurrency: int = 16, port: int = 8765, ready_timeout: float = 1800) -> dict:
    """`vllm bench serve` against `vllm serve MODEL` on the local GPU -> the benchmark's result JSON (output_throughput,
    TTFT/TPOT/ITL percentiles, ...), or `{"not_measured": ...}` without a GPU or without vLLM in this environment.

    The GPU path is minimal and has not run on a GPU yet (not measured anywhere): one server
    on 127.0.0.1, random prompts of input_len tokens, output_len tokens each with EOS ignored, then the server is
    stopped. Check it on the first GPU machine before relying on its figures.
    """
    if not vllm_available():
        return not_measured("no GPU/vLLM")
    if model is None:
        raise ValueError("vllm_speed needs the model to serve")
    vllm = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    server = subprocess.Popen([*vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([*vllm, "bench", "serve", "--backend", "openai", "--host", "127.0.0.1", "--port", str(port),
                            "--model", str(model), "--dataset-name", "random", "--input-len", str(input_len),
                            "--output-len", str(output_len), "--num-prompts", str(num_prompts), "--max-concurrency",
                            str(max_concurrency), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
                            "--metric-percentiles", "50,90,99", "--ready-check-timeout-sec", str(int(ready_timeout)),
                            "--save-result", "--result-dir", tmp, "--result-filename", "bench.json"],
                           check=True, capture_output=True, text=True)
            result = json.loads((Path(tmp) / "bench.json").read_text())
            result["wall_seconds"] = time.time() - t0
            return result
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

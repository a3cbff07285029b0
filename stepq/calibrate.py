"""`stepq calibrate`: layer-streamed calibration of a checkpoint -> one statistics file reused by every format.

Top to bottom: resolve settings -> reuse a matching statistics file unless forced -> sample the calibration tokens ->
stream them through the model with the statistics observer -> write `<out>/<model>-calib/stats.safetensors`
atomically, with provenance and timings in its metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

import stepq
from calib.data import load_calibration, resolve_settings
from calib.stats import FORMAT_VERSION, CalibStats, StatsCollector, model_fingerprint, save_stats
from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.lock import OutputLock

log = logging.getLogger("stepq.calibrate")
STATS_NAME = "stats.safetensors"


def stats_path(model_dir: str | Path, out_root: str | Path = "out") -> Path:
    return Path(out_root) / f"{model_name(model_dir)}-calib" / STATS_NAME


def _dtype(ckpt, dtype: str) -> torch.dtype:
    """'auto': float32 (exact statistics) unless the largest layer in float32 would not fit in half the free RAM."""
    if dtype != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise BadInput(f"--dtype {dtype}: use auto, float32 or bfloat16")
    per_layer: dict = {}
    for t in ckpt.tensors.values():
        if t.info.layer is not None:
            per_layer[t.info.layer] = per_layer.get(t.info.layer, 0) + t.entry.nbytes
    fp32_bytes = 2 * max(per_layer.values(), default=0)  # BF16 on disk -> F32 in memory
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return torch.float32
    return torch.float32 if fp32_bytes < avail // 2 else torch.bfloat16


def calibrate(model_dir: str | Path, dataset: str | None = None, out_root: str | Path = "out", n: int | None = None,
              seq_len: int | None = None, seed: int = 0, all_experts: bool = False, force: bool = False, *,
              dtype: str = "auto", spill_bytes: int | None = None, micro_batch_tokens: int | None = None,
              progress: bool = True) -> Path:
    """Write (or reuse) `<out_root>/<model>-calib/stats.safetensors`; returns its path. `spill_bytes` and
    `micro_batch_tokens` default to `calib.stream`'s SPILL_BYTES and MICRO_BATCH_TOKENS.

    An existing file is reused when its source, dataset contents and settings match (`CalibStats.matches`) and
    `force` is off; otherwise it is recomputed and replaced atomically. One run per output folder (`convert.lock`);
    on an error a folder this run created is removed again, and so are activations spilled by a killed run."""
    model_dir = Path(model_dir)
    out = stats_path(model_dir, out_root)
    with OutputLock(out.parent):
        created = not out.parent.exists()
        # left by a run that was killed (the lock says it is gone): spilled activations, a half-written file
        for stale in [*out.parent.glob("stepq-act-*"), *out.parent.glob(f".{out.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        try:
            return _calibrate(model_dir, out, dataset, n, seq_len, seed, all_experts, force, dtype, spill_bytes,
                              micro_batch_tokens, progress)
        except BaseException:
            if created:
                shutil.rmtree(out.parent, ignore_errors=True)
            raise


def _calibrate(model_dir: Path, out: Path, dataset, n, seq_len, seed, all_experts, force, dtype, spill_bytes,
               micro_batch_tokens, progress) -> Path:
    # Imported here: transformers' model code takes seconds to import, and `stepq quantize` imports this module
    # even when it reuses a statistics file or needs none.
    from calib.stream import MICRO_BATCH_TOKENS, SPILL_BYTES, stream_forward

    t0 = time.time()
    if out.is_file() and not force:
        try:
            if CalibStats.load(out).matches(model_dir, dataset, n, seq_len, seed, all_experts):
                log.info("reusing %s (same source, dataset and settings)", out)
                return out
        except BadInput:
            pass  # unreadable or older format: recompute
    dataset, n, seq_len = resolve_settings(model_dir, dataset, n, seq_len)
    ckpt = open_checkpoint(model_dir)
    try:
        compute_dtype = _dtype(ckpt, dtype)
        data = load_calibration(model_dir, dataset, n, seq_len, seed)
        t_data = time.time()
        collector = StatsCollector(ckpt.config, all_experts=all_experts)
        # Spilled activations go beside the output, not to /tmp (often RAM-backed tmpfs).
        out.parent.mkdir(parents=True, exist_ok=True)
        res = stream_forward(ckpt, data.ids, collector, dtype=compute_dtype,
                             spill_bytes=SPILL_BYTES if spill_bytes is None else spill_bytes,
                             micro_batch_tokens=micro_batch_tokens or MICRO_BATCH_TOKENS, tmp_dir=str(out.parent),
                             progress=progress and sys.stderr.isatty())  # bars on terminals, not in logs
        tensors, summary = collector.result()
    finally:
        ckpt.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "source": model_fingerprint(model_dir),
        "dataset": data.dataset,
        "n": n, "seq_len": seq_len, "seed": seed, "all_experts": all_experts,
        "tokens": n * seq_len, "tokens_sampled_from": data.tokens_drawn_from,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        **summary,
        "stepq_version": stepq.__version__,
        "versions": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers")},
        "activations_on_disk": res.spilled,
        "timings": {"data_s": round(t_data - t0, 3), **{k: round(v, 3) for k, v in res.timings.items()},
                    "total_s": round(time.time() - t0, 3)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return save_stats(out, tensors, meta)

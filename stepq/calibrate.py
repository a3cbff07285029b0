"""`stepq calibrate`: layer-streamed calibration of a checkpoint -> one statistics file reused by every format.

Top to bottom: resolve settings -> reuse a matching statistics file unless forced -> sample the calibration tokens ->
take up the checkpoints of an interrupted run with the same key (calib.resume) -> stream the tokens through the
remaining layers with the statistics observer, checkpointing each layer -> write
`<out>/<model>-calib/stats.safetensors` atomically, with provenance and timings in its metadata -> drop the
checkpoints.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import stepq
from calib.data import load_calibration, resolve_settings
from calib.stats import FORMAT_VERSION, CalibStats, StatsCollector, model_fingerprint, save_stats
from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.errors import BadInput, WriteFailed
from convert.lock import OutputLock
from convert.provenance import peak_rss_mib, versions

if TYPE_CHECKING:
    from calib.resume import LayerCheckpoints

log = logging.getLogger("stepq.calibrate")
STATS_NAME = "stats.safetensors"


def stats_path(model_dir: str | Path, out_root: str | Path = "out") -> Path:
    return Path(out_root) / f"{model_name(model_dir)}-calib" / STATS_NAME


def calibrate(model_dir: str | Path, dataset: str | None = None, out_root: str | Path = "out", n: int | None = None,
              seq_len: int | None = None, seed: int = 0, all_experts: bool = False, force: bool = False, *,
              device: str | None = None, dtype: str | None = None, spill_bytes: int | None = None,
              micro_batch_tokens: int | None = None, progress: bool = True, cluster=None) -> Path:
    """Write (or reuse) `<out_root>/<model>-calib/stats.safetensors`; returns its path. `device` (auto, cpu, cuda[:N])
    and `dtype` (bfloat16, float32) say where and in what precision the forward runs (calib.compute; defaults auto
    and bfloat16); `spill_bytes` and `micro_batch_tokens` default to `calib.stream`'s SPILL_BYTES and a micro-batch
    sized for the expert GEMMs.

    An existing file is reused when its source, dataset contents and settings match (`CalibStats.matches`) and
    `force` is off; otherwise it is recomputed and replaced atomically. Each finished layer is checkpointed
    (calib.resume): re-running after an interruption continues after the last finished layer, with the same result;
    `force` starts over. One run per output folder (`convert.lock`). On an error, finished layers are kept for the
    resume (except on bad input); with none, a folder this run created is removed again.

    `cluster`: a connected ray module (convert.ray_executor.connect): each layer then runs as data-parallel shards
    of the sequences on the cluster's workers (calib.distributed); the checkpoints and the output stay here."""
    from calib.compute import resolve

    model_dir = Path(model_dir)
    out = stats_path(model_dir, out_root)
    dtype = dtype or "bfloat16"
    compute = resolve(device or "auto", dtype)  # a device or dtype that cannot run here: before anything is written
    with OutputLock(out.parent):
        created = not out.parent.exists()
        # left by a killed run (the lock says it is gone): a half-written file; activations spilled by older stepq
        for stale in [*out.parent.glob("stepq-act-*"), *out.parent.glob(f".{out.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        partial = out.parent / f".{out.name}.partial"
        if not force and _reusable(out, model_dir, dataset, n, seq_len, seed, all_experts, dtype):
            log.info("reusing %s (same source, dataset and settings)", out)
            shutil.rmtree(partial, ignore_errors=True)  # of a run killed just after writing `out`, or of other settings
            return out
        # Imported here: transformers' model code takes seconds to import, and `stepq quantize` calls this function
        # even when it reuses a statistics file.
        from calib.resume import LayerCheckpoints

        checkpoints = LayerCheckpoints(partial)
        try:
            return _calibrate(model_dir, out, checkpoints, dataset, n, seq_len, seed, all_experts, force, compute,
                              spill_bytes, micro_batch_tokens, progress, cluster, device or "auto")
        except BaseException as e:
            raise _failed(e, out, checkpoints, created)


def _reusable(out: Path, model_dir: Path, dataset, n, seq_len, seed, all_experts, dtype) -> bool:
    try:
        return out.is_file() and CalibStats.load(out).matches(model_dir, dataset, n, seq_len, seed, all_experts,
                                                              dtype)
    except BadInput:
        return False  # unreadable or older format: recompute


def _failed(e: BaseException, out: Path, checkpoints: LayerCheckpoints, created: bool) -> BaseException:
    """Clean up after `e` and return what to raise: write failures as one line that says what was kept."""
    bad_input = isinstance(e, BadInput) and not isinstance(e, WriteFailed)
    kept = checkpoints.kept and not bad_input
    if not kept:
        if checkpoints.opened:
            checkpoints.remove()
        if created:
            shutil.rmtree(out.parent, ignore_errors=True)
    note = (f"finished layers kept in {checkpoints.dir}: re-run the same command to resume, --force to start over"
            if kept else "nothing kept")
    if isinstance(e, OSError):  # writing a checkpoint: part of writing the statistics file
        where = f": {e.filename}" if e.filename else ""
        return WriteFailed(f"{out}: cannot write the statistics file ({e.strerror or e}{where}); {note}")
    if isinstance(e, WriteFailed):
        return WriteFailed(f"{e}; {note}")
    if kept:
        log.warning("%s: interrupted; %s", out, note)
    return e


def _calibrate(model_dir: Path, out: Path, checkpoints: LayerCheckpoints, dataset, n, seq_len, seed, all_experts,
               force, compute, spill_bytes, micro_batch_tokens, progress, cluster, device: str) -> Path:
    from calib.resume import run_key
    from calib.stream import SPILL_BYTES, micro_batch_tokens_for, stream_forward  # see calibrate()

    t0 = time.time()
    dataset, n, seq_len = resolve_settings(model_dir, dataset, n, seq_len)
    spill_bytes = SPILL_BYTES if spill_bytes is None else spill_bytes
    ckpt = open_checkpoint(model_dir)
    try:
        micro_batch_tokens = micro_batch_tokens or micro_batch_tokens_for(ckpt.config, seq_len)
        source = model_fingerprint(model_dir)
        data = load_calibration(model_dir, dataset, n, seq_len, seed, images=True)
        t_data = time.time()
        collector = StatsCollector(ckpt.config, all_experts=all_experts)
        shards, executor = None, {"executor": "local"}
        if cluster is not None:
            from calib.distributed import RayShards

            shards = RayShards(cluster, ckpt, device, compute.label["dtype"], all_experts,
                               max(1, micro_batch_tokens // seq_len))
            executor = shards.describe(data.ids.shape[0])
        checkpoints.open(run_key(source, data, all_experts, compute, spill_bytes, micro_batch_tokens,
                                 executor if shards else None), collector, force)
        # Spilled activations go to the checkpoint folder beside the output, not to /tmp (often RAM-backed tmpfs).
        res = stream_forward(ckpt, data.ids, collector, compute=compute, spill_bytes=spill_bytes,
                             micro_batch_tokens=micro_batch_tokens, tmp_dir=str(checkpoints.dir),
                             progress=progress and sys.stderr.isatty(),  # bars on terminals, not in logs
                             checkpoints=checkpoints, images=data.images, shards=shards)
        tensors, summary = collector.result()
    finally:
        ckpt.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "dataset": data.dataset,
        "n": n, "seq_len": seq_len, "seed": seed, "all_experts": all_experts,
        "tokens": n * seq_len, "tokens_sampled_from": data.tokens_drawn_from,
        "compute_dtype": compute.label["dtype"], "compute": compute.label, "micro_batch_tokens": res.micro_batch_tokens,
        **summary,
        "stepq_version": stepq.__version__,
        "versions": versions("torch", "transformers"),
        "activations_on_disk": res.spilled,
        "executor": executor,
        **({"images": {"count": len(data.images.images), "vision_runs": res.vision_runs,
                       "image_tokens": int((data.ids == data.images.image_token_id).sum())}} if data.images else {}),
        "timings": {"data_s": round(t_data - t0, 3), **{k: round(v, 3) for k, v in res.timings.items()},
                    "total_s": round(time.time() - t0, 3)},
        "peak_rss_mib": peak_rss_mib(),
    }
    save_stats(out, tensors, meta)
    checkpoints.remove()  # the statistics are in place
    return out

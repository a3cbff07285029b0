"""`stepq eval ARTIFACT --model SOURCE`: accuracy and speed of one variant against its BF16 source.

Top to bottom: read the artifact's provenance -> check its files (GGUF: against the hashes its export recorded) ->
lock the eval -> measure (`eval.measure`: reference outputs, the variant's outputs, KLD / top-1 / PPL / MTP
acceptance, weight error, tasks, speed, engine checks; finished parts kept for a resume) -> refuse when the artifact
changed meanwhile -> report.json, report.md and plots written beside, then swapped in as ARTIFACT/eval/.

The partial folder `.<artifact>-eval.partial/` sits beside the artifact, not inside: the gate judges every file in
the artifact folder. One eval per artifact at a time (`convert.lock`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from convert.artifact import read_json_object
from convert.checkpoint import open_checkpoint
from convert.durable import fsync_path, swap_in
from convert.errors import BadInput, WriteFailed
from convert.ledger import TEMP_MARK
from convert.lock import OutputLock
from eval.measure import artifact_files, artifact_stats, check_gguf_files, measure
from eval.report import write_report
from eval.schema import REPORT_DIR


def evaluate(artifact: str | Path, model: str | Path, out_root: str | Path = "out", *, dataset: str | None = None,
             n: int | None = None, seq_len: int | None = None, seed: int = 0, tasks: list[str] | None = None,
             task_limit: int | None = None, speed: bool = True, engine_check: bool = True,
             progress: bool = True, force: bool = False, device: str | None = None,
             dtype: str | None = None) -> Path:
    """Evaluate `artifact` against the BF16 checkpoint in `model`; returns ARTIFACT/eval/report.json. Resumes what
    an interrupted eval of the same artifact finished, unless `force`. `device` / `dtype`: where and in what
    precision stepq's forward runs (calib.compute; auto and bfloat16 by default)."""
    from calib.compute import resolve

    compute = resolve(device or "auto", dtype or "bfloat16")  # before anything is read or written
    artifact, model_dir, out_root = Path(artifact), Path(model), Path(out_root)
    provenance = read_json_object(artifact / "stepq.json")
    is_gguf = any(artifact.glob("*.gguf"))
    timings: dict[str, float] = {}
    t0 = time.time()
    stats_before, files_before = artifact_stats(artifact), artifact_files(artifact)
    if is_gguf:
        check_gguf_files(artifact, provenance, files_before)
    target = artifact.parent / f"{artifact.name}-eval"  # its lock `.<name>-eval.lock`
    partial = target.parent / f".{target.name}.partial"
    source = open_checkpoint(model_dir)
    try:
        with OutputLock(target):
            if force:
                shutil.rmtree(partial, ignore_errors=True)
            try:
                report = measure(artifact, model_dir, out_root, source, provenance, is_gguf, files_before, partial,
                                 timings, dataset=dataset, n=n, seq_len=seq_len, seed=seed, tasks=tasks,
                                 task_limit=task_limit, speed=speed, engine_check=engine_check, progress=progress,
                                 compute=compute)
                if artifact_stats(artifact) != stats_before:
                    raise BadInput(f"{artifact}: files changed while it was being evaluated; run eval again")
            except BadInput as e:
                if not isinstance(e, WriteFailed):  # bad input keeps nothing; a full disk keeps finished stages
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            timings["total_s"] = time.time() - t0
            publish_report(report, artifact, partial)
            shutil.rmtree(partial)
    finally:
        source.close()
    return artifact / REPORT_DIR / "report.json"


def publish_report(report: dict, artifact: Path, partial: Path) -> None:
    """Write the report folder in `partial` (same filesystem, outside the artifact), fsynced, and swap it in as
    ARTIFACT/eval: a crash in between leaves the old report or the new one, never a half-written one."""
    tmp = partial / f"{REPORT_DIR}{TEMP_MARK}{os.getpid()}"
    tmp.mkdir()
    write_report(report, tmp)
    for p in tmp.iterdir():
        fsync_path(p)
    swap_in(tmp, artifact / REPORT_DIR)

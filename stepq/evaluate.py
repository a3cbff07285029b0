"""`stepq eval ARTIFACT --model SOURCE`: accuracy and speed of one variant against its BF16 source.

Top to bottom: held-out tokens -> BF16 reference outputs (cached per source + tokens) -> the variant's outputs from
its files on disk (safetensors: stepq's streamed forward with the engine's input quantization; GGUF: llama.cpp)
-> KLD / top-1 / PPL / MTP acceptance -> weight error -> lm-eval tasks -> speed -> report.json, report.md and
plots in ARTIFACT/eval/ (written to a temp folder, then renamed).

Resume: the expensive parts (the artifact's outputs, weight error, engine check, llama.cpp runs, tasks) are kept as
they finish in `.<artifact>-eval.partial/` beside the artifact, keyed by the artifact's files, the source, the tokens,
the settings they depend on and the code's versions (`convert.stages`); a killed eval re-run skips them. Beside,
not inside: the gate judges every file in the artifact folder. One eval per artifact at a time (`convert.lock`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calib.data import FIXTURE_DATA, defaults_for, load_calibration, load_tokenizer
from convert.checkpoint import Checkpoint, open_checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.gguf_export import read_gguf
from convert.hashing import file_sha256
from convert.lock import OutputLock
from convert.stages import TEMP_MARK, StageProgress, digest
from convert.writer import WriteFailed, fsync_path, replace_durably
from eval import forward
from eval.metrics import mtp_acceptance, token_stats
from eval.report import write_report
from eval.schema import REPORT_DIR, SCHEMA, not_measured
from eval.weights import weight_error

FIXTURE_TEXT = FIXTURE_DATA.with_name("eval.txt")
FIXTURE_EVAL = (str(FIXTURE_TEXT), 16, 256)              # 4K held-out tokens: seconds per variant
# The real model: a held-out chat split (calibration uses train_sft). Full-vocabulary logits are kept in memory
# (8 x 2048 tokens x 128896 x 4 B = 8.4 GB); larger eval sets need top-k reference storage.
MODEL_EVAL = ("HuggingFaceH4/ultrachat_200k:test_sft", 8, 2048)
IN_MEMORY_MAX_PARAMS = 2_000_000_000  # lm-eval through stepq's own forward only for small models
log = logging.getLogger("stepq.evaluate")


def _is_fixture(model_dir: Path) -> bool:
    return defaults_for(model_dir).dataset == str(FIXTURE_DATA)


def eval_text(model_dir: Path, dataset: str | None, n: int | None, seq_len: int | None, seed: int):
    d = FIXTURE_EVAL if _is_fixture(model_dir) else MODEL_EVAL
    return load_calibration(model_dir, dataset or d[0], n or d[1], seq_len or d[2], seed)


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _artifact_paths(artifact: Path) -> list[Path]:
    return [p for p in sorted(artifact.rglob("*")) if p.is_file() and p.relative_to(artifact).parts[0] != REPORT_DIR]


def _files(artifact: Path) -> dict[str, str]:
    return {str(p.relative_to(artifact)): file_sha256(p) for p in _artifact_paths(artifact)}


def _stats(artifact: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) per file: enough to notice a change during the eval without hashing everything twice."""
    return {str(p.relative_to(artifact)): (p.stat().st_size, p.stat().st_mtime_ns) for p in _artifact_paths(artifact)}


def _source_key(source: Checkpoint, ids: torch.Tensor) -> str:
    from calib.stats import model_fingerprint

    blob = json.dumps({"model": model_fingerprint(source.dir), "ids": _ids_sha(ids)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _reference_key(source: Checkpoint, ids: torch.Tensor) -> str:
    """The source and tokens, and the code computing the reference (the forward is transformers' Step-3.5 layers)."""
    forward_code = {k: v for k, v in _versions().items() if k in ("stepq", "torch", "transformers")}
    return digest({"source": _source_key(source, ids), "forward": forward_code})[:16]


def reference_outputs(source: Checkpoint, ids: torch.Tensor, cache_dir: Path, progress: bool) -> forward.Outputs:
    """BF16 logits and MTP logits of the source on `ids`, cached under `cache_dir/<source+tokens key>.safetensors`
    (written atomically: another eval of the same source may be reading or writing it)."""
    path = cache_dir / f"{_reference_key(source, ids)}.safetensors"
    if path.is_file():
        try:
            return _as_outputs(load_file(path))
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("%s: cached reference outputs unreadable (%s); computing them again", path, e)
    out = forward.source_outputs(source, ids, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{path.name}{TEMP_MARK}{os.getpid()}"
    try:
        save_file(_as_tensors(out), tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _as_tensors(out: forward.Outputs) -> dict[str, torch.Tensor]:
    return {"logits": out.logits.contiguous(), **{f"mtp.{k}": m.contiguous()
                                                  for k, m in enumerate(out.mtp_logits, start=1)}}


def _as_outputs(t: dict[str, torch.Tensor]) -> forward.Outputs:
    k = sum(1 for n in t if n.startswith("mtp."))
    return forward.Outputs(t["logits"], [t[f"mtp.{i}"] for i in range(1, k + 1)])


class _Stages:
    """The eval's expensive parts, each kept in the partial folder once finished: `<stage>.safetensors` (tensors)
    and `<stage>.json` (the rest), under a key of `base` (artifact files, source, tokens, versions) and the stage's
    own settings. Finished or reused, a stage's result is read back from its files, so both give the same report."""

    def __init__(self, folder: Path, base: dict):
        self.progress, self.base = StageProgress(folder), base

    def run(self, stage: str, settings: dict, compute) -> tuple[dict[str, torch.Tensor], object]:
        """`compute()` -> (tensors, JSON-able data), or what an earlier run stored under the same key."""
        def write(d: Path) -> None:
            tensors, data = compute()
            if tensors:
                save_file({k: v.contiguous() for k, v in tensors.items()}, d / f"{stage}.safetensors")
            (d / f"{stage}.json").write_text(json.dumps(data))

        key = digest({"stage": stage, **self.base, "settings": settings})
        files = {f.name: f for f in self.progress.obtain(stage, key, write)}
        tensors = load_file(files[f"{stage}.safetensors"]) if f"{stage}.safetensors" in files else {}
        return tensors, json.loads(files[f"{stage}.json"].read_text())


def _eval_target(artifact: Path) -> Path:
    """`<artifact>-eval` beside the artifact: its lock `.<name>-eval.lock` and partial folder `.<name>-eval.partial`."""
    return artifact.parent / f"{artifact.name}-eval"


def check_gguf_files(artifact: Path, provenance: dict, files: dict[str, str]) -> None:
    """Every .gguf of a GGUF artifact is a whole GGUF (naming the first tensor cut off) with the sha256 its export
    recorded in stepq.json: a damaged or swapped file fails here, before any measurement."""
    for f in sorted(artifact.glob("*.gguf")):
        read_gguf(f)
    for name, rec in (provenance.get("files") or {}).items():
        if name.endswith(".gguf") and files.get(name) != rec.get("sha256"):
            what = "missing" if name not in files else "sha256 differs from stepq.json"
            raise BadInput(f"{artifact / name}: {what} (damaged or changed after the export); export it again")


def _mtp_rows(q_acc: list[float], ref_acc: list[float]) -> list[dict]:
    return [{"depth": k, "acceptance": a, "acceptance_ref": r, "ratio": a / r if r else None}
            for k, (a, r) in enumerate(zip(q_acc, ref_acc), start=1)]


def _hardware() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "gpu": gpu}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("stepq", "torch", "transformers", "compressed-tensors", "gguf", "lm-eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _expert_load(model_dir: Path, out_root: Path) -> dict:
    """Routed-token share per expert from this source's calibration statistics (`stepq calibrate`), else not
    measured."""
    from calib.stats import CalibStats

    path = Path(out_root) / f"{model_name(model_dir)}-calib" / "stats.safetensors"
    if not path.is_file():
        return not_measured("no calibration statistics for this source (run `stepq calibrate`)")
    stats = CalibStats.load(path)
    out = {}
    for layer in range(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]):
        try:
            load = stats.expert_load(layer).double()
        except (KeyError, BadInput):
            continue  # a dense layer
        out[str(layer)] = (load / load.sum().clamp(min=1)).tolist()
    return out or not_measured("no MoE layers in the statistics")


def evaluate(artifact: str | Path, model: str | Path, out_root: str | Path = "out", *, dataset: str | None = None,
             n: int | None = None, seq_len: int | None = None, seed: int = 0, tasks: list[str] | None = None,
             task_limit: int | None = None, speed: bool = True, engine_check: bool = True,
             progress: bool = True, force: bool = False) -> Path:
    """Evaluate `artifact` against the BF16 checkpoint in `model`; returns ARTIFACT/eval/report.json. Resumes what
    an interrupted eval of the same artifact finished, unless `force`."""
    artifact, model_dir, out_root = Path(artifact), Path(model), Path(out_root)
    try:
        provenance = json.loads((artifact / "stepq.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{artifact / 'stepq.json'}: not a stepq artifact ({e.__class__.__name__})")
    is_gguf = any(artifact.glob("*.gguf"))
    timings: dict[str, float] = {}
    t0 = time.time()
    stats_before, files_before = _stats(artifact), _files(artifact)
    if is_gguf:
        check_gguf_files(artifact, provenance, files_before)
    target = _eval_target(artifact)
    partial = target.parent / f".{target.name}.partial"
    source = open_checkpoint(model_dir)
    try:
        with OutputLock(target):
            if force:
                shutil.rmtree(partial, ignore_errors=True)
            try:
                report = _measure(artifact, model_dir, out_root, source, provenance, is_gguf, files_before, partial,
                                  timings, dataset=dataset, n=n, seq_len=seq_len, seed=seed, tasks=tasks,
                                  task_limit=task_limit, speed=speed, engine_check=engine_check, progress=progress)
                if _stats(artifact) != stats_before:
                    raise BadInput(f"{artifact}: files changed while it was being evaluated; run eval again")
            except BadInput as e:
                if not isinstance(e, WriteFailed):  # bad input keeps nothing; a full disk keeps finished stages
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            timings["total_s"] = time.time() - t0
            _publish_report(report, artifact, partial)
            shutil.rmtree(partial)
    finally:
        source.close()
    return artifact / REPORT_DIR / "report.json"


def _measure(artifact: Path, model_dir: Path, out_root: Path, source: Checkpoint, provenance: dict, is_gguf: bool,
             files_before: dict[str, str], partial: Path, timings: dict, *, dataset, n, seq_len, seed, tasks,
             task_limit, speed, engine_check, progress) -> dict:
    """The report: every measurement, the expensive ones through the stages kept in `partial`."""
    t = time.time()
    text = eval_text(model_dir, dataset, n, seq_len, seed)
    stages = _Stages(partial, {"artifact": files_before, "source": _source_key(source, text.ids),
                               "versions": _versions()})
    timings["open_s"] = time.time() - t

    t = time.time()
    ref = reference_outputs(source, text.ids, out_root / f"{model_name(model_dir)}-evalref", progress)
    ref_acc = mtp_acceptance(ref.logits, ref.mtp_logits)
    timings["reference_s"] = time.time() - t

    t = time.time()
    if is_gguf:
        from eval import gguf_variant

        def llama_cpp():
            logits, mtp, speed_part = gguf_variant.measure(artifact, model_dir, out_root, text.ids, speed=speed)
            return {"logits": logits}, {"mtp": mtp, "speed": speed_part}
        tensors, measured = stages.run("llama_cpp", {"speed": speed, "hardware": _hardware()}, llama_cpp)
        q_logits, mtp, speed_part = tensors["logits"], measured["mtp"], measured["speed"]
        timings["llama_cpp_s"] = time.time() - t
        weights = not_measured("GGUF: weight error is measured as KLD through llama.cpp")
        engines = {"vllm_load": not_measured("GGUF artifacts are for llama.cpp")}
    else:
        tensors, _ = stages.run("forward", {}, lambda: (
            _as_tensors(forward.artifact_outputs(source, artifact, text.ids, progress)[0]), None))
        q = _as_outputs(tensors)
        q_logits = q.logits
        mtp = _mtp_rows(mtp_acceptance(q.logits, q.mtp_logits), ref_acc) if ref_acc else not_measured(
            "the source has no MTP layers")
        timings["forward_s"] = time.time() - t
        t = time.time()
        _, weights = stages.run("weights", {}, lambda: ({}, weight_error(source, artifact, progress)))
        timings["weights_s"] = time.time() - t
        t = time.time()
        _, checked = stages.run("engine_check", {"engine_check": engine_check, "hardware": _hardware()}, lambda: ({}, {
            "speed": _safetensors_speed(),
            "engines": {"vllm_load": _vllm_load(artifact) if engine_check else not_measured(
                "skipped (--no-engine-check)")}}))
        speed_part, engines = checked["speed"], checked["engines"]
        timings["engine_check_s"] = time.time() - t
    accuracy = token_stats(ref.logits, q_logits, text.ids)
    accuracy["mtp"] = mtp

    t = time.time()
    _, task_part = stages.run("tasks", {"tasks": tasks, "limit": task_limit}, lambda: (
        {}, _tasks(source, artifact, model_dir, tasks, task_limit, is_gguf)))
    timings["tasks_s"] = time.time() - t
    if stages.progress.reused:
        log.info("eval resumed: %s reused from the interrupted run", ", ".join(stages.progress.reused))

    return {
        "schema": SCHEMA,
        "artifact": {"path": str(artifact.resolve()), "name": artifact.name,
                     "variant": provenance.get("variant") or artifact.name.split("-", 2)[-1],
                     "format": "gguf" if is_gguf else "safetensors",
                     "scheme": "gguf" if is_gguf else provenance.get("scheme"),
                     "qtype": provenance.get("qtype") if is_gguf else None},
        "files": files_before,
        "source": {"model": provenance.get("source", {}).get("model") or str(model_dir), "path": str(model_dir),
                   "fingerprint": _source_key(source, text.ids)},
        "text": {"source": text.dataset.get("id"), "sha256": _ids_sha(text.ids), "sequences": text.n,
                 "seq_len": text.seq_len, "tokens": text.n * text.seq_len},
        "accuracy": accuracy,
        "weights": weights,
        "expert_load": _expert_load(model_dir, out_root),
        "tasks": task_part,
        "speed": speed_part,
        "engines": engines,
        "hardware": _hardware(),
        "versions": _versions(),
        "timings": timings,
    }


def _publish_report(report: dict, artifact: Path, partial: Path) -> None:
    """Write the report folder in `partial` (same filesystem, outside the artifact), fsynced, and rename it to
    ARTIFACT/eval; an older report is moved out first. A crash in between leaves no eval/ (re-run eval), never a
    half-written one."""
    tmp, old = partial / f"{REPORT_DIR}{TEMP_MARK}{os.getpid()}", partial / f"old-{REPORT_DIR}{TEMP_MARK}{os.getpid()}"
    tmp.mkdir()
    write_report(report, tmp)
    for p in tmp.iterdir():
        fsync_path(p)
    fsync_path(tmp)
    final = artifact / REPORT_DIR
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(artifact)


def _safetensors_speed() -> dict:
    from eval.speed import vllm_speed

    return {"llama_bench": not_measured("safetensors variants run in vLLM / SGLang, not llama.cpp"),
            "vllm": vllm_speed(), "ratios": {}}


def _vllm_load(artifact: Path) -> dict:
    from eval.vllm_conformance import VllmEnvError, ensure_vllm_env, verify_vllm

    try:
        ensure_vllm_env()
    except VllmEnvError as e:
        return not_measured(str(e).splitlines()[0])
    report = verify_vllm(artifact)
    return {"ok": bool(report.get("ok")), "engine": "vllm 0.33.0 loader on CPU (trunk + step3p5_mtp drafter)",
            "details": {k: v for k, v in report.items() if k != "ok"}}


def _tasks(source: Checkpoint, artifact: Path, model_dir: Path, tasks: list[str] | None, limit: int | None,
           is_gguf: bool) -> dict:
    from eval.tasks import FIXTURE_TASK_DIR, FIXTURE_TASKS, compare_tasks, run_tasks

    fixture = _is_fixture(model_dir)
    names = tasks if tasks is not None else (FIXTURE_TASKS if fixture else [])
    if not names:
        return not_measured("no tasks selected for this model (--tasks)")
    params = sum(math.prod(t.entry.shape) for t in source.tensors.values())
    if params > IN_MEMORY_MAX_PARAMS:
        return not_measured("lm-eval on the full model needs vLLM and a GPU (lm-eval's vllm backend)")
    tok = load_tokenizer(model_dir)
    scores = {}
    for which, art in (("ref", None), ("q", artifact)):
        if which == "q" and is_gguf:
            from eval.gguf_logits import LlamaCppModel
            from eval.gguf_variant import main_file

            m = LlamaCppModel(main_file(artifact))
        else:
            m = forward.in_memory_model(source, art)
        try:
            scores[which] = run_tasks(m, tok, names, FIXTURE_TASK_DIR if fixture else None, limit)
        finally:
            m.close()
    out = compare_tasks(scores["q"], scores["ref"])
    for entry in out.values():  # JSON has no NaN: an undefined recovery (zero reference score) is null
        if entry["recovery"] != entry["recovery"]:
            entry["recovery"] = None
    return out

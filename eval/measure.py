"""The eval stage's measurements of one variant against its BF16 source (`stepq eval` runs `measure` between
opening the inputs and publishing the report).

Held-out tokens -> BF16 reference outputs (per-position log-probs on disk, cached per source + tokens + compute:
`eval.reference`) -> the variant's logits from its files on disk (safetensors: stepq's streamed forward with the
engine's input quantization; GGUF: llama.cpp), compared with the reference a block at a time and kept as
per-position figures only (`eval.metrics.PositionSink`) -> KLD / top-1 / PPL / MTP acceptance -> weight error ->
lm-eval tasks -> speed and engine checks -> the report dict.

With an image set (`--dataset` naming images, calib.data; a Step-3.7 source), the text figures still come from the
default held-out text, and the image set gets its own reference and variant forwards (the vision tower's features
at the image-token positions, calib.stream): `accuracy.image` is the image-conditioned KLD / top-1 / PPL over its
text positions (those predicting a text token; a placeholder token is the processor's, not the model's, choice).

Resume: the expensive parts (the artifact's per-position figures, weight error, engine check, llama.cpp runs, tasks)
are kept as they finish in the eval's partial folder, keyed by the artifact's files, the source, the tokens, the
settings they depend on and the code's versions (`convert.ledger`); a killed eval re-run skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calib.data import FIXTURE_DATA, CalibData, defaults_for, is_image_set, load_calibration, load_tokenizer
from convert.checkpoint import Checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.gguf_export import read_gguf
from convert.hashing import file_sha256
from convert.ledger import Stages
from convert.provenance import digest, versions
from eval import forward
from eval.metrics import Positions, PositionSink, acceptance, token_figures
from eval.reference import reference_outputs
from eval.schema import REPORT_DIR, SCHEMA, not_measured
from eval.weights import weight_error

FIXTURE_TEXT = FIXTURE_DATA.with_name("eval.txt")
FIXTURE_EVAL = (str(FIXTURE_TEXT), 16, 256)              # 4K held-out tokens: seconds per variant
# The real model: a held-out chat split (calibration uses train_sft). The reference's full-vocabulary log-probs take
# 8 x 2048 tokens x 128896 x 4 B = 8.4 GB on disk (memory-mapped); RAM holds a few numbers per position.
MODEL_EVAL = ("HuggingFaceH4/ultrachat_200k:test_sft", 8, 2048)
REFERENCE_FORMAT = "logprobs.npy + positions/1"  # what the reference cache and the stages keep: part of their keys
IN_MEMORY_MAX_PARAMS = 2_000_000_000  # lm-eval through stepq's own forward only for small models
log = logging.getLogger("stepq.evaluate")
EVAL_TOOLS = ("stepq", "torch", "transformers", "compressed-tensors", "gguf", "lm-eval")


def _is_fixture(model_dir: Path) -> bool:
    return defaults_for(model_dir).dataset == str(FIXTURE_DATA)


def eval_text(model_dir: Path, dataset: str | None, n: int | None, seq_len: int | None, seed: int):
    d = FIXTURE_EVAL if _is_fixture(model_dir) else MODEL_EVAL
    if dataset and is_image_set(dataset):  # the text figures from the default text; the image set's are separate
        dataset, n, seq_len = None, None, None
    return load_calibration(model_dir, dataset or d[0], n or d[1], seq_len or d[2], seed)


def eval_images(model_dir: Path, dataset: str | None, n: int | None, seq_len: int | None,
                seed: int) -> CalibData | None:
    """The image set's windows and features (N, L: as given, else calibration's defaults), or None without one."""
    if not (dataset and is_image_set(dataset)):
        return None
    return load_calibration(model_dir, dataset, n, seq_len, seed, images=True)


def dataset_label(model_dir: Path, dataset: str | None) -> str:
    """The eval text as the user named it (or the default's name): reports and cards never carry a local path."""
    if dataset and not is_image_set(dataset):
        return str(dataset)
    return f"{FIXTURE_TEXT.parent.name}/{FIXTURE_TEXT.name} (bundled)" if _is_fixture(model_dir) else MODEL_EVAL[0]


def _ids_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _artifact_paths(artifact: Path) -> list[Path]:
    return [p for p in sorted(artifact.rglob("*")) if p.is_file() and p.relative_to(artifact).parts[0] != REPORT_DIR]


def artifact_files(artifact: Path) -> dict[str, str]:
    return {str(p.relative_to(artifact)): file_sha256(p) for p in _artifact_paths(artifact)}


def artifact_stats(artifact: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) per file: enough to notice a change during the eval without hashing everything twice."""
    return {str(p.relative_to(artifact)): (p.stat().st_size, p.stat().st_mtime_ns) for p in _artifact_paths(artifact)}


def _source_key(source: Checkpoint, ids: torch.Tensor) -> str:
    from calib.stats import model_fingerprint

    return digest({"model": model_fingerprint(source.dir), "ids": _ids_sha(ids)})[:16]


def _reference_key(source: Checkpoint, ids: torch.Tensor, compute, images: dict | None = None) -> str:
    """The source and tokens, and the code computing the reference (the forward is transformers' Step-3.5 layers)
    and where: the device kind and dtypes round differently. `images`: an image set's fingerprint (its files)."""
    return digest({"source": _source_key(source, ids), "forward": versions("stepq", "torch", "transformers"),
                   "compute": {**compute.label, "device": compute.device.type}, "stored": REFERENCE_FORMAT,
                   **({"images": images["sha256"]} if images else {})})[:16]


class _Stages:
    """The eval's expensive parts, each kept in the partial folder once finished: `<stage>.safetensors` (tensors)
    and `<stage>.json` (the rest), under a key of `base` (artifact files, source, tokens, versions) and the stage's
    own settings. Finished or reused, a stage's result is read back from its files, so both give the same report."""

    def __init__(self, folder: Path, base: dict):
        self.progress, self.base = Stages(folder), base

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


def _expert_load(model_dir: Path, out_root: Path, trunk_layers: int) -> dict:
    """Routed-token share per expert from this source's calibration statistics (`stepq calibrate`), else not
    measured."""
    from calib.stats import CalibStats

    path = Path(out_root) / f"{model_name(model_dir)}-calib" / "stats.safetensors"
    if not path.is_file():
        return not_measured("no calibration statistics for this source (run `stepq calibrate`)")
    stats = CalibStats.load(path)
    out = {}
    for layer in range(trunk_layers):  # config.json's own count sits in text_config on Step-3.7
        try:
            load = stats.expert_load(layer).double()
        except (KeyError, BadInput):
            continue  # a dense layer
        out[str(layer)] = (load / load.sum().clamp(min=1)).tolist()
    return out or not_measured("no MoE layers in the statistics")


def measure(artifact: Path, model_dir: Path, out_root: Path, source: Checkpoint, provenance: dict, is_gguf: bool,
             files_before: dict[str, str], partial: Path, timings: dict, *, dataset, n, seq_len, seed, tasks,
             task_limit, speed, engine_check, progress, compute) -> dict:
    """The report: every measurement, the expensive ones through the stages kept in `partial`; `dataset` as the
    user gave it (None: the default eval text)."""
    t = time.time()
    text = eval_text(model_dir, dataset, n, seq_len, seed)
    images = eval_images(model_dir, dataset, n, seq_len, seed)
    stages = _Stages(partial, {"artifact": files_before, "source": _source_key(source, text.ids),
                               "versions": versions(*EVAL_TOOLS),
                               "compute": {**compute.label, "device": compute.device.type}})
    timings["open_s"] = time.time() - t

    t = time.time()
    ref = reference_outputs(source, text.ids, out_root / f"{model_name(model_dir)}-evalref",
                            _reference_key(source, text.ids, compute), progress, compute)
    timings["reference_s"] = time.time() - t

    t = time.time()
    stored = {"stored": REFERENCE_FORMAT}
    if is_gguf:
        from eval import gguf_variant

        def llama_cpp():
            sink = PositionSink(ref.logprobs, text.ids, depths=0)  # llama.cpp hands over trunk logits only
            mtp, speed_part = gguf_variant.measure(artifact, model_dir, out_root, text.ids, sink, speed=speed)
            return sink.positions().as_tensors(), {"mtp": mtp, "speed": speed_part}
        tensors, measured = stages.run("llama_cpp", {"speed": speed, "hardware": _hardware(), **stored}, llama_cpp)
        q = Positions.from_tensors(tensors)
        mtp, speed_part = measured["mtp"], measured["speed"]
        timings["llama_cpp_s"] = time.time() - t
        weights = not_measured("GGUF: weight error is measured as KLD through llama.cpp")
        engines = {"vllm_load": not_measured("GGUF artifacts are for llama.cpp")}
    else:
        def streamed():
            sink = PositionSink(ref.logprobs, text.ids, depths=len(ref.drafts))
            forward.artifact_forward(source, artifact, text.ids, sink, progress, compute)
            return sink.positions().as_tensors(), None
        tensors, _ = stages.run("forward", stored, streamed)
        q = Positions.from_tensors(tensors)
        ref_acc = acceptance(ref.greedy, ref.drafts)
        mtp = _mtp_rows(acceptance(q.greedy, q.drafts), ref_acc) if ref_acc else not_measured(
            "the source has no MTP layers")
        timings["forward_s"] = time.time() - t
        t = time.time()
        _, weights = stages.run("weights", {}, lambda: ({}, weight_error(source, artifact, progress)))
        timings["weights_s"] = time.time() - t
        t = time.time()
        _, checked = stages.run("engine_check", {"engine_check": engine_check, "speed": speed, "hardware": _hardware()},
                                lambda: ({}, {
            "speed": safetensors_speed(artifact, speed),
            "engines": {"vllm_load": _vllm_load(artifact) if engine_check else not_measured(
                "skipped (--no-engine-check)")}}))
        speed_part, engines = checked["speed"], checked["engines"]
        timings["engine_check_s"] = time.time() - t
    accuracy = token_figures(q, ref.nll)
    accuracy["mtp"] = mtp
    if images is not None or getattr(source.config, "vision", None) is not None:
        t = time.time()
        accuracy["image"] = _image_accuracy(artifact, model_dir, out_root, source, images, is_gguf, stages, progress,
                                            compute)
        timings["images_s"] = time.time() - t

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
        "text": {"source": dataset_label(model_dir, dataset), "sha256": _ids_sha(text.ids), "sequences": text.n,
                 "seq_len": text.seq_len, "tokens": text.n * text.seq_len},
        "accuracy": accuracy,
        "weights": weights,
        "expert_load": _expert_load(model_dir, out_root, source.config.num_trunk_layers),
        "tasks": task_part,
        "speed": speed_part,
        "engines": engines,
        "hardware": _hardware(),
        "versions": versions(*EVAL_TOOLS),
        "compute": compute.label,
        "timings": timings,
    }


def _image_accuracy(artifact: Path, model_dir: Path, out_root: Path, source: Checkpoint, images: CalibData | None,
                    is_gguf: bool, stages: _Stages, progress: bool, compute) -> dict:
    """Image-conditioned figures: the BF16 reference and the variant on the image set, compared at its text
    positions."""
    if images is None:
        return not_measured("no image set (--dataset naming images)")
    if is_gguf:
        return not_measured("GGUF: llama.cpp is measured on token ids; image inputs need its mmproj (llama-mtmd)")
    ids, rows = images.ids, images.images
    ref = reference_outputs(source, ids, out_root / f"{model_name(model_dir)}-evalref",
                            _reference_key(source, ids, compute, images.dataset), progress, compute, rows)

    def streamed():
        sink = PositionSink(ref.logprobs, ids, depths=len(ref.drafts))
        forward.artifact_forward(source, artifact, ids, sink, progress, compute, rows)
        return sink.positions().as_tensors(), None
    tensors, _ = stages.run("forward_images", {"stored": REFERENCE_FORMAT, "images": images.dataset["sha256"],
                                               "ids": _ids_sha(ids)}, streamed)
    q = Positions.from_tensors(tensors)
    text = text_positions(ids, placeholder_token_ids(model_dir))
    figures = token_figures(Positions(q.kl[:, :-1][text], q.top1[:, :-1][text], q.nll[text], q.greedy, []),
                            ref.nll[text])
    return {**figures, "set": {"source": images.dataset["id"], "sha256": _ids_sha(ids),
                               "samples": len({r.where for r in rows.images}),
                               "images": len(rows.images), "sequences": images.n, "seq_len": images.seq_len,
                               "image_tokens": int((ids == rows.image_token_id).sum())}}


def placeholder_token_ids(model_dir: Path) -> list[int]:
    from calib.images import PLACEHOLDER_TOKENS

    tok = load_tokenizer(model_dir)
    return [tok.convert_tokens_to_ids(t) for t in PLACEHOLDER_TOKENS]


def text_positions(ids: torch.Tensor, placeholders: list[int]) -> torch.Tensor:
    """[N, T-1] bool: positions whose next token is text (the last position has no next token)."""
    return ~torch.isin(ids[:, 1:], torch.tensor(placeholders))


def safetensors_speed(artifact: Path, speed: bool = True) -> dict:
    """vLLM serving figures of a safetensors artifact where a GPU and vLLM are present; llama-bench does not apply."""
    from eval.speed import vllm_speed

    vllm = vllm_speed(artifact) if speed else not_measured("skipped (--no-speed)")
    return {"llama_bench": not_measured("safetensors variants run in vLLM / SGLang, not llama.cpp"),
            "vllm": vllm, "ratios": {}}


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

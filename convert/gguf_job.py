"""The GGUF export job (`stepq quantize --scheme gguf`): GGUF variants for llama.cpp, `OUT/<model>-GGUF-<QTYPE>/` holding the `.gguf` file(s) and `stepq.json`.

Top to bottom: open + validate the checkpoint -> pick the recipe -> lock the output -> plan the file(s) (header,
tensor table, offsets) -> one streaming pass writing each tensor into its place (`convert.gguf_quantize`):
BF16/F16/Q8_0 as llama.cpp's converter writes them (gguf-py's bytes), K/IQ-quants quantized in-process by ggml's
own quantizer, the bytes `llama-quantize` (+ `llama-gguf-split`) would write from a BF16 GGUF -> provenance (every
tensor's type as read back from the written files) -> atomic rename of the folder. Each finished tensor is recorded
in the temporary folder `.<name>.partial` (`convert.writer`), so the same command resumes where a kill stopped it.

Step-3.7 (a vision tower in the checkpoint): the variant folder also holds `mmproj-<model>-F16.gguf`, the vision
tower and projector as llama.cpp's converter writes them with `--mmproj` (`convert.gguf_mmproj`), planned with the
text file(s) and written in the same pass; `llama-mtmd-cli -m <model>-<QTYPE>.gguf --mmproj mmproj-...` runs the
pair. F16 whatever QTYPE: llama.cpp's releases pair every text quant with one F16 mmproj, and K/IQ types are not
what its vision graph is validated with. The draft-only MTP folder has none (it pairs with a trunk folder).

Draft-only MTP GGUF (`mtp_only`, llama.cpp's `convert_hf_to_gguf.py --mtp`): `OUT/<model>-GGUF-<QTYPE>-MTP/`
holding `mtp-<model>-<QTYPE>.gguf` + `stepq.json`. A folder of its own because an artifact folder is one
variant with one provenance file, and a draft pairs with a trunk of any type (a Q4_K_M trunk with a Q8_0
draft); the file keeps llama.cpp's `mtp-` prefix, which is how `llama-server -hf ... --mtp` finds a draft beside
a trunk in a Hub repo, so both files can be published into one repo without renaming.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from tqdm import tqdm

from convert.checkpoint import Checkpoint, open_checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.executor import Executor, LocalExecutor, describe
from convert.ggml_quants import ggml_type
from convert.gguf_export import GGUFExport, describe_gguf
from convert.gguf_mmproj import DEFAULT_TYPE as MMPROJ_TYPE
from convert.gguf_mmproj import mmproj_metadata, mmproj_stem, plan_mmproj
from convert.gguf_names import QT, PlannedTensor
from convert.gguf_quantize import (
    Importance,
    QuantTensor,
    check_importance,
    default_workers,
    direct_metadata,
    plan_converter_files,
    plan_direct,
    plan_quantized,
    plan_quantized_files,
    quantized_metadata,
    tensor_key,
    tensor_tasks,
)
from convert.gguf_recipe import DIRECT_TYPES, GGUFRecipe, block_size, fallback_type, recipe_for, supported_qtypes
from convert.gguf_tools import LLAMA_CPP_PYTHON_VERSION, tool
from convert.hashing import file_sha256
from convert.lock import OutputLock
from convert.provenance import digest, peak_rss_mib, source_files, versions
from convert.safetensors_export import SOURCE_SHA256, shard_memo_key, source_hashes
from convert.writer import ArtifactWriter

if TYPE_CHECKING:
    from calib.stats import CalibStats

DEFAULT_SPLIT_BYTES = 45 * 1000**3  # under the Hub's 50 GB per-file limit
LLAMA_CPP_COMMIT = "0c1e57098"  # what llama-cpp-python 0.3.36 vendors
log = logging.getLogger("stepq.gguf")


def variant_dir(model_dir: str | Path, out_root: str | Path, qtype: str, mtp_only: bool = False) -> Path:
    return Path(out_root) / f"{model_name(model_dir)}-GGUF-{qtype.upper()}{'-MTP' if mtp_only else ''}"


def export_gguf(model_dir: str | Path, out_root: str | Path, qtype: str = "Q4_K_M", mtp: bool = True,
                force: bool = False, *, max_shard_bytes: int | None = None, source_id: str | None = None,
                revision: str | None = None, imatrix=None, mtp_only: bool = False,
                executor: Executor | None = None) -> Path:
    """Write the GGUF variant `qtype` of the checkpoint in `model_dir`; returns `out_root/<model>-GGUF-<QTYPE>`.

    `mtp=False` drops the MTP layers (llama.cpp's `--no-mtp`); `mtp_only=True` writes the draft-only MTP GGUF
    into `out_root/<model>-GGUF-<QTYPE>-MTP` instead (llama.cpp's `--mtp`). Files above `max_shard_bytes`
    (default 45 GB) are split into `-0000i-of-0000N.gguf` shards. K/IQ types need the llama.cpp build
    (`make llama-cpp`), whose ggml quantizes them in-process. `imatrix`: loaded calibration statistics
    (`calib.stats.CalibStats`); K/IQ types are then quantized with the importance matrix llama.cpp would derive
    from them (`convert.gguf_imatrix`), the same calibration pass as FP8/NVFP4; the imatrix-only types (IQ2_XS,
    ...) require it. `executor` runs the K/IQ pieces (default: a `LocalExecutor` with one worker per core).

    Re-running after an interruption resumes: each finished tensor is kept in the temporary folder with a key of
    its inputs and a digest of its bytes, and reused when both still match; `force` starts over. One run per
    output folder (`convert.lock`).
    """
    t0 = time.time()
    qtype = qtype.upper()
    if mtp_only and not mtp:
        raise BadInput("--mtp-only writes the MTP head, --no-mtp drops it: pass one of them")
    if qtype not in DIRECT_TYPES:  # unknown / imatrix-only types fail before anything is opened
        recipe_for(qtype, imatrix=imatrix is not None, mtp_only=mtp_only)
    ckpt = open_checkpoint(model_dir)
    try:
        recipe = None
        if qtype not in DIRECT_TYPES:
            recipe = recipe_for(qtype, tuple(ckpt.config.mtp_layers) if mtp else (), imatrix=imatrix is not None,
                                n_embd=ckpt.config.hidden_size, mtp_only=mtp_only)
            tool("llama-quantize")  # the llama.cpp build whose ggml quantizes: fail now, not mid-way
        out_dir = variant_dir(model_dir, out_root, qtype, mtp_only)
        job = _Job(ckpt, qtype, recipe, imatrix if recipe is not None else None, mtp, mtp_only,
                   f"{'mtp-' if mtp_only else ''}{model_name(model_dir)}-{qtype}",
                   max_shard_bytes or DEFAULT_SPLIT_BYTES,
                   mmproj_stem(model_dir, MMPROJ_TYPE) if ckpt.config.vision is not None and not mtp_only else None)
        source = source_id or str(model_dir)
        _export(job, out_dir, force, source, revision, t0, executor)
    finally:
        ckpt.close()
    return out_dir


def _export(job: _Job, out_dir: Path, force: bool, source: str, revision: str | None, t0: float,
            executor: Executor | None) -> None:
    """One pass through the artifact writer into the planned file(s), resumable per tensor."""
    timings = {}
    with ExitStack() as stack:
        stack.enter_context(OutputLock(out_dir))
        writer = stack.enter_context(ArtifactWriter(out_dir, force=force, resumable=True))
        if executor is None:
            executor = stack.enter_context(LocalExecutor(workers=default_workers()))
        tensors, mm_tensors, importance = _plan(job, writer)
        # the source shards' sha256 (stepq.json) on a thread, reading alongside the pass instead of after it
        hashes = source_hashes(writer, job.ckpt)
        stack.callback(hashes.close)
        files = _write(job, writer, tensors + mm_tensors, importance, executor)
        timings["convert_s"] = time.time() - t0
        exp = describe_gguf(job.ckpt, "BF16" if job.recipe else job.qtype, job.mtp, job.mtp_only)
        records = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}

        def sha256_of(p: Path) -> str:
            return writer.memo(SOURCE_SHA256, shard_memo_key(job.ckpt, p.name), lambda: hashes.result(p))

        prov = _provenance(job.ckpt, exp, job.recipe, job.qtype, files, records, sha256_of, source, revision,
                           timings)
        if mm_tensors:
            prov["mmproj"] = _mmproj_provenance(job, mm_tensors, files)
            prov["source"]["files"].update(source_files(job.ckpt.dir, list(PREPROCESSOR_FILES), file_sha256))
        prov["executor"] = describe(executor)
        if job.imatrix is not None:
            prov["imatrix"] = {"from": "stepq calibration statistics", "statistics_sha256": job.imatrix.sha256}
        writer.write_json("stepq.json", prov)


@dataclass
class _Job:
    """One export: the source and every setting that decides the bytes written."""

    ckpt: Checkpoint
    qtype: str
    recipe: GGUFRecipe | None
    imatrix: CalibStats | None  # calib.stats.CalibStats, loaded by the caller (convert does not import calib)
    mtp: bool
    mtp_only: bool
    stem: str  # output file name without .gguf
    split: int  # max bytes per file
    mmproj_stem: str | None = None  # the vision tower's mmproj file (Step-3.7), without .gguf


def _plan(job: _Job, writer: ArtifactWriter) -> tuple[list[QuantTensor], list[QuantTensor], Importance | None]:
    """Every tensor's type and place -- as llama.cpp's converter writes a direct type, as llama-quantize (+
    llama-gguf-split) lays out a K/IQ type, the mmproj as the converter writes it --; the files are created (or an
    interrupted run's reopened). Types the built ggml lacks and a missing imatrix a type needs are refused here,
    before anything is written. -> (text tensors, mmproj tensors, importance)."""
    mm_tensors, mm_files = [], []
    if job.mmproj_stem is not None:
        mm_tensors = [QuantTensor(p, p.qtype) for p in plan_mmproj(job.ckpt, MMPROJ_TYPE)]
        mm_kv = mmproj_metadata(job.ckpt, [t.p for t in mm_tensors], MMPROJ_TYPE)
        mm_files = plan_converter_files(job.mmproj_stem, mm_kv, mm_tensors, 0)  # the converter's default: one file
    if job.recipe is None:
        tensors = plan_direct(job.ckpt, job.qtype, job.mtp, job.mtp_only)
        kv, _tok = direct_metadata(job.ckpt, job.qtype, job.mtp, job.mtp_only)
        writer.plan_files(plan_converter_files(job.stem, kv, tensors, job.split) + mm_files, kind="gguf")
        return tensors, mm_tensors, None
    tensors = plan_quantized(job.ckpt, job.recipe, job.mtp, job.mtp_only)
    for name in sorted({x.qtype.name for x in tensors}):
        ggml_type(name)
    importance = None if job.imatrix is None else Importance.from_stats(job.imatrix, job.ckpt, job.mtp)
    check_importance(tensors, importance)
    kv, _tok = quantized_metadata(job.ckpt, job.recipe, job.mtp, job.mtp_only, importance)
    writer.plan_files(plan_quantized_files(job.stem, kv, tensors, job.split) + mm_files, kind="gguf")
    return tensors, mm_tensors, importance


def _write(job: _Job, writer: ArtifactWriter, tensors: list[QuantTensor], importance: Importance | None,
           executor: Executor) -> list[Path]:
    """Convert each tensor piece by piece (an expert, or a block of rows) straight into its place; tensors an
    interrupted run finished under the same key are verified and kept."""
    settings = digest({"qtype": job.qtype, "recipe": job.recipe.to_dict() if job.recipe else None,
                       "llama_cpp": LLAMA_CPP_COMMIT, "config_sha256": file_sha256(job.ckpt.dir / "config.json"),
                       **versions("stepq", "gguf")})
    keys = {x.p.name: tensor_key(job.ckpt, x, settings, importance) for x in tensors}
    with tqdm(total=sum(x.nbytes for x in tensors), unit="B", unit_scale=True, desc=f"quantize {job.qtype}",
              disable=None) as bar:
        todo = []
        for x in tensors:
            if writer.reuse(x.p.name, keys[x.p.name], [x.p.name]):
                bar.update(x.nbytes)
            else:
                todo.append(x)
        tasks = (task for x in todo for task in tensor_tasks(job.ckpt, x, importance))
        for task, data in executor.map(tasks):
            x, piece, last = task.key
            flat = torch.from_numpy(data.reshape(-1).view(np.uint8)) if isinstance(data, np.ndarray) else data
            writer.write(x.p.name, flat, row=piece.byte_offset)
            bar.update(flat.numel())
            if last:
                writer.commit(x.p.name, keys[x.p.name], [x.p.name])
    if writer.reused_units:
        log.info("resumed: %d of %d units reused from the interrupted run (tensors)", writer.reused_units,
                 len(tensors))
    return [writer.tmp / name for name in writer.shard_names]


PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # image mean/std of the mmproj


def _mmproj_provenance(job: _Job, mm_tensors: list[QuantTensor], files: list[Path]) -> dict:
    """The mmproj file, its type and each tensor's source, type (read back from the file) and why."""
    name = f"{job.mmproj_stem}.gguf"
    actual = read_tensor_types([f for f in files if f.name == name])
    tensors = {}
    for t in mm_tensors:
        if actual[t.p.name] != t.qtype.name:
            raise RuntimeError(f"tensor {t.p.name}: planned {t.qtype.name}, the written mmproj has {actual[t.p.name]}")
        reason = ("F32: 1-D, bias, norm or position embedding (llama.cpp's converter)" if t.qtype == QT.F32 else
                  f"{MMPROJ_TYPE}: the mmproj's type" if t.qtype.name == MMPROJ_TYPE else
                  "F16: rows do not fill the type's blocks (llama.cpp's converter falls back)")
        tensors[t.p.name] = {"source": t.p.source, "role": t.p.role, "shape": list(t.p.shape), "type": t.qtype.name,
                             "reason": reason}
    return {"file": name, "type": MMPROJ_TYPE, "projector_type": "step3vl",
            "tool": "gguf-py (identical to llama.cpp's convert_hf_to_gguf.py --mmproj)",
            "run_with": f"llama-mtmd-cli -m <text gguf> --mmproj {name} --image <file>", "tensors": tensors}


def read_tensor_types(files: list[Path]) -> dict[str, str]:
    """GGUF tensor name -> GGML type name, read back from the written file(s)."""
    out = {}
    for f in files:
        for t in gguf.GGUFReader(f).tensors:
            out[t.name] = t.tensor_type.name
    return out


def _reason(p: PlannedTensor, actual: str, requested: str, recipe: GGUFRecipe | None) -> str:
    if actual == "F32" and requested in ("F32",):
        if p.source is None:
            return "generated (llama3 rope factors), F32"
        if "norm" in p.role:
            return "norm stored as 1 + w (zero-centred RMSNorm), F32"
        return "router / selection bias / 1-D: llama.cpp keeps these F32"
    if actual != requested:
        return (f"{requested} requested; rows of {p.shape[-1]} values do not fill {requested} blocks of "
                f"{block_size(requested)}: llama.cpp's fallback {actual}")
    if recipe is None:
        return "export type"
    if p.mtp:
        return "MTP head at higher precision than routed experts"
    if p.role.startswith("experts_"):
        return "routed experts: lowest precision of the mix" + (" (+1 step for down)" if p.role == "experts_down" else "")
    if p.role in ("embed", "lm_head"):
        return "embeddings / output at the always-active precision"
    return "always-active tensor (attention, shared expert, dense MLP) at higher precision"


def _tensor_decision(p: PlannedTensor, actual: str, recipe: GGUFRecipe | None, qtype: str) -> dict:
    """What the recipe asked for this tensor, what was written, and why. A written type other than the request
    or its llama.cpp row-size fallback means the recipe missed a tensor: fail rather than record it."""
    if p.qtype.name == "F32":
        requested = "F32"
    else:
        requested = qtype if recipe is None else recipe.intended_type(p.role, p.mtp)
    expected = fallback_type(requested, p.shape[-1])
    if actual != expected:
        raise RuntimeError(f"tensor {p.name}: the recipe asks {requested} (-> {expected} for rows of "
                           f"{p.shape[-1]}), the written file has {actual}")
    d = {"source": p.source, "role": p.role, "layer": p.layer, "mtp": p.mtp, "shape": list(p.shape),
         "type": actual, "requested": requested, "reason": _reason(p, actual, requested, recipe)}
    if actual != requested:
        d["fallback"] = {"from": requested, "to": actual, "row": p.shape[-1], "block": block_size(requested)}
    return d


def _provenance(ckpt: Checkpoint, exp: GGUFExport, recipe: GGUFRecipe | None, qtype: str, files: list[Path],
                file_records: dict[str, dict], shard_sha256, source: str, revision: str | None,
                timings: dict) -> dict:
    """`shard_sha256(path)`: the sha256 of a source shard (hashed alongside the export)."""
    src_files = source_files(ckpt.dir, [*sorted(ckpt.shards), "config.json", "tokenizer.json", "tokenizer_config.json"],
                             lambda p: shard_sha256(p) if p.name in ckpt.shards else file_sha256(p))
    actual = read_tensor_types(files)
    tensors = {p.name: _tensor_decision(p, actual[p.name], recipe, qtype) for p in exp.tensors}
    return {
        "format_version": 1,
        "source": {"model": source, "revision": revision, "path": str(ckpt.dir.resolve()), "files": src_files},
        "scheme": "gguf", "variant": f"GGUF-{qtype}{'-MTP' if exp.mtp_only else ''}", "qtype": qtype,
        "mtp": exp.mtp, "mtp_only": exp.mtp_only, "mtp_layers": list(ckpt.config.mtp_layers) if exp.mtp else [],
        "fallbacks": sorted(n for n, d in tensors.items() if "fallback" in d),
        "recipe": recipe.to_dict() if recipe else {"qtype": qtype, "tool": "gguf-py (identical to llama.cpp's "
                                                                          "convert_hf_to_gguf.py)"},
        "supported_qtypes": supported_qtypes(),
        "files": file_records,
        "tokenizer": exp.tokenizer,
        "tensors": tensors,
        "versions": {**versions("stepq", "gguf", "torch"), "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
                     "llama_cpp": LLAMA_CPP_COMMIT},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": peak_rss_mib(),
    }


"""The GGUF export job (`stepq quantize --scheme gguf`): GGUF variants for llama.cpp, `OUT/<model>-GGUF-<QTYPE>/` holding the `.gguf` file(s) and `stepq.json`.

Top to bottom: open + validate the checkpoint -> pick the recipe -> lock the output -> BF16/F16/Q8_0: stream the
checkpoint into the GGUF directly (gguf-py, identical to llama.cpp's converter); K/IQ-quants: stream a BF16 GGUF,
run `llama-quantize` with the recipe's per-tensor types, split with `llama-gguf-split` -> provenance (every tensor's
type as read back from the written files) -> atomic rename of the folder. Each of those stages is recorded in the
temporary folder `.<name>.partial` when finished (`convert.ledger`), so the same command resumes after a kill.

Draft-only MTP GGUF (`mtp_only`, llama.cpp's `convert_hf_to_gguf.py --mtp`): `OUT/<model>-GGUF-<QTYPE>-MTP/`
holding `mtp-<model>-<QTYPE>.gguf` + `stepq.json`. A folder of its own because an artifact folder is one
variant with one provenance file, and a draft pairs with a trunk of any type (a Q4_K_M trunk with a Q8_0
draft); the file keeps llama.cpp's `mtp-` prefix, which is how `llama-server -hf ... --mtp` finds a draft beside
a trunk in a Hub repo, so both files can be published into one repo without renaming.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from convert.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from convert.config import SIDE_FILES, model_name
from convert.durable import AtomicDir
from convert.errors import BadInput
from convert.gguf_export import GGUFExport, describe_gguf, write_gguf
from convert.gguf_imatrix import write_imatrix
from convert.gguf_names import PlannedTensor
from convert.gguf_recipe import DIRECT_TYPES, GGUFRecipe, block_size, fallback_type, recipe_for, supported_qtypes
from convert.gguf_tools import LLAMA_CPP_PYTHON_VERSION, gguf_split, llama_quantize, tool
from convert.hashing import BackgroundHashes, file_sha256
from convert.ledger import Stages
from convert.lock import OutputLock
from convert.provenance import digest, peak_rss_mib, source_files, versions

if TYPE_CHECKING:
    from calib.stats import CalibStats

DEFAULT_SPLIT_BYTES = 45 * 1000**3  # under the Hub's 50 GB per-file limit
LLAMA_CPP_COMMIT = "0c1e57098"  # what llama-cpp-python 0.3.36 vendors
INTERMEDIATE = ".intermediate-BF16.gguf"
# llama-quantize records the --imatrix path in the GGUF (quantize.imatrix.file): given relative to the temporary
# folder, it is llama-imatrix's default name rather than a temporary path, the same in every run
IMATRIX = "imatrix.gguf"
READ_FILES = ("config.json", INDEX_NAME, "README.md", *SIDE_FILES)  # what the GGUF writer reads besides weights
log = logging.getLogger("stepq.gguf")


def variant_dir(model_dir: str | Path, out_root: str | Path, qtype: str, mtp_only: bool = False) -> Path:
    return Path(out_root) / f"{model_name(model_dir)}-GGUF-{qtype.upper()}{'-MTP' if mtp_only else ''}"


def export_gguf(model_dir: str | Path, out_root: str | Path, qtype: str = "Q4_K_M", mtp: bool = True,
                force: bool = False, *, max_shard_bytes: int | None = None, source_id: str | None = None,
                revision: str | None = None, imatrix=None, mtp_only: bool = False) -> Path:
    """Write the GGUF variant `qtype` of the checkpoint in `model_dir`; returns `out_root/<model>-GGUF-<QTYPE>`.

    `mtp=False` drops the MTP layers (llama.cpp's `--no-mtp`); `mtp_only=True` writes the draft-only MTP GGUF
    into `out_root/<model>-GGUF-<QTYPE>-MTP` instead (llama.cpp's `--mtp`). Files above `max_shard_bytes`
    (default 45 GB) are split into `-0000i-of-0000N.gguf` shards. K/IQ types need the llama.cpp tools
    (`make llama-cpp`). `imatrix`: loaded calibration statistics (`calib.stats.CalibStats`); K/IQ types are then
    quantized with the llama.cpp importance matrix written from them (`convert.gguf_imatrix`), the same
    calibration pass as FP8/NVFP4; the imatrix-only types (IQ2_XS, ...) require it.

    Re-running after an interruption resumes: each finished stage (the GGUF written by gguf-py -- the whole
    variant, or the BF16 intermediate of a K/IQ type --, the imatrix, llama-quantize's output, the split) is kept
    in the temporary folder with a key of its inputs and the hash of its files, and reused when both still match;
    `force` starts over. One run per output folder (`convert.lock`).
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
            tool("llama-quantize"), tool("llama-gguf-split")  # fail now, not after the BF16 pass
        out_dir = variant_dir(model_dir, out_root, qtype, mtp_only)
        job = _Job(ckpt, qtype, recipe, imatrix if recipe is not None else None, mtp, mtp_only,
                   f"{'mtp-' if mtp_only else ''}{model_name(model_dir)}-{qtype}",
                   max_shard_bytes or DEFAULT_SPLIT_BYTES)
        timings = {}
        atomic = AtomicDir(out_dir, force, resumable=True)
        with OutputLock(out_dir), atomic as tmp:
            # the source shards' sha256 (stepq.json) on a thread, reading alongside the export instead of after it
            hashes = BackgroundHashes([ckpt.dir / s for s in sorted(ckpt.shards)])
            progress = Stages(tmp)
            if progress.has_work:
                log.info("%s: resuming (finished stages recorded by an earlier run)", tmp)
            try:
                files = _direct_stages(job, progress) if recipe is None else _quantize_stages(job, progress, timings)
            except BaseException:
                hashes.close()
                raise
            finally:
                atomic.keep_on_error = progress.has_work  # finished stages survive a failure, for the resume
            if progress.reused:
                log.info("resumed: %d of %d units reused from the interrupted run (%s)", len(progress.reused),
                         len(progress.reused) + len(progress.made), ", ".join(progress.reused))
            timings.setdefault("convert_s", time.time() - t0)
            exp = describe_gguf(ckpt, qtype if recipe is None else "BF16", mtp, mtp_only)
            prov = _provenance(ckpt, exp, recipe, qtype, files, progress.recorded(files), hashes,
                               source_id or str(model_dir), revision, timings)
            if job.imatrix is not None:
                prov["imatrix"] = {"from": "stepq calibration statistics", "statistics_sha256": job.imatrix.sha256}
            (tmp / "stepq.json").write_text(json.dumps(prov, indent=2) + "\n")
            published = {f.name for f in files} | {"stepq.json"}
            atomic.scratch += [p.name for p in tmp.iterdir() if p.name not in published]  # progress, stale files
    finally:
        ckpt.close()
    return out_dir


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

    def source_key(self) -> dict:
        """The source without reading its weights -- each shard's identity (size, mtime, header hash; or its Hub
        blob hash), the small files the writer reads, the folder name (general.name) -- the writing code's versions
        and the MTP settings: what every stage depends on."""
        files = {n: file_sha256(self.ckpt.dir / n) for n in READ_FILES if (self.ckpt.dir / n).is_file()}
        return {"shards": {s: self.ckpt.shard_identity(s) for s in sorted(self.ckpt.shards)}, "files": files,
                "name": self.ckpt.dir.name, **versions("stepq", "gguf"),
                "mtp": self.mtp, "mtp_only": self.mtp_only}


def _direct_stages(job: _Job, progress: Stages) -> list[Path]:
    """gguf-py writes the variant itself (BF16, F16, Q8_0, ...): one stage."""
    key = digest({"stage": "gguf", "source": job.source_key(), "qtype": job.qtype, "stem": job.stem,
                  "split": job.split})
    return progress.obtain("gguf", key, lambda d: write_gguf(job.ckpt, d / f"{job.stem}.gguf", job.qtype, job.mtp,
                                                             split_max_bytes=job.split, mtp_only=job.mtp_only))


def _quantize_stages(job: _Job, progress: Stages, timings: dict) -> list[Path]:
    """K/IQ types: BF16 intermediate (+ imatrix) -> llama-quantize -> split when too large. Each stage's key holds
    its upstream stages' keys, so a change anywhere redoes exactly what depends on it; the files a later stage
    consumed are removed once it is recorded (disk: the intermediate is as large as the source)."""
    source = job.source_key()
    k_inter = digest({"stage": "intermediate", "source": source})
    k_imatrix = None if job.imatrix is None else digest({"stage": "imatrix", "source": source,
                                                          "statistics": job.imatrix.sha256})
    args = job.recipe.llama_quantize_args()
    k_quant = digest({"stage": "quantized", "intermediate": k_inter, "imatrix": k_imatrix, "qtype": job.qtype,
                      "args": args, "llama_cpp": LLAMA_CPP_COMMIT, "stem": job.stem})
    k_split = digest({"stage": "split", "quantized": k_quant, "split": job.split})
    if (shards := progress.reuse("split", k_split)) is not None:
        return shards
    quantized = progress.reuse("quantized", k_quant)
    if quantized is None:
        t = time.time()
        (inter,) = progress.obtain("intermediate", k_inter, lambda d: write_gguf(
            job.ckpt, d / INTERMEDIATE, "BF16", job.mtp, mtp_only=job.mtp_only))
        if job.imatrix is not None:
            (imx,) = progress.obtain("imatrix", k_imatrix, lambda d: write_imatrix(
                job.imatrix, job.ckpt, d / IMATRIX, mtp=job.mtp))
            args = ["--imatrix", imx.name, *args]
        timings["convert_s"] = time.time() - t
        t = time.time()
        quantized = progress.make("quantized", k_quant, lambda d: llama_quantize(
            inter, d / f"{job.stem}.gguf", job.qtype, args, cwd=progress.folder))
        timings["llama_quantize_s"] = time.time() - t
        progress.forget("intermediate", "imatrix")
    if quantized[0].stat().st_size <= job.split:
        return quantized
    shards = progress.make("split", k_split, lambda d: gguf_split(quantized[0], d / job.stem, job.split))
    progress.forget("quantized")
    return shards


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
                file_records: dict[str, dict], hashes: BackgroundHashes, source: str, revision: str | None,
                timings: dict) -> dict:
    src_files = source_files(ckpt.dir, [*sorted(ckpt.shards), "config.json", "tokenizer.json", "tokenizer_config.json"],
                             lambda p: hashes.result(p) if p.name in ckpt.shards else file_sha256(p))
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


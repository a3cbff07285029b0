"""GGUF variants for llama.cpp: `OUT/<model>-GGUF-<QTYPE>/` holding the `.gguf` file(s) and `stepq.json`.

Top to bottom: open + validate the checkpoint -> pick the recipe -> BF16/F16/Q8_0: stream the checkpoint into the
GGUF directly (gguf-py, identical to llama.cpp's converter); K/IQ-quants: stream a BF16 GGUF, run `llama-quantize`
with the recipe's per-tensor types, split with `llama-gguf-split` -> provenance (every tensor's type as read back
from the written files) -> atomic rename of the folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import resource
import time
from pathlib import Path

import gguf

from convert.checkpoint import Checkpoint, open_checkpoint
from calib.stats import CalibStats
from convert.gguf_export import GGUFExport, write_gguf
from convert.gguf_imatrix import write_imatrix
from convert.gguf_names import PlannedTensor
from convert.gguf_recipe import DIRECT_TYPES, GGUFRecipe, recipe_for, supported_qtypes
from convert.gguf_tools import LLAMA_CPP_PYTHON_VERSION, gguf_split, llama_quantize, tool
from convert.hashing import file_sha256
from convert.writer import AtomicDir

DEFAULT_SPLIT_BYTES = 45 * 1000**3  # under the Hub's 50 GB per-file limit
LLAMA_CPP_COMMIT = "0c1e57098"  # what llama-cpp-python 0.3.36 vendors


def variant_dir(model_dir: str | Path, out_root: str | Path, qtype: str) -> Path:
    return Path(out_root) / f"{Path(model_dir).resolve().name}-GGUF-{qtype.upper()}"


def export_gguf(model_dir: str | Path, out_root: str | Path, qtype: str = "Q4_K_M", mtp: bool = True,
                force: bool = False, *, max_shard_bytes: int | None = None, source_id: str | None = None,
                revision: str | None = None, imatrix=None) -> Path:
    """Write the GGUF variant `qtype` of the checkpoint in `model_dir`; returns `out_root/<model>-GGUF-<QTYPE>`.

    `mtp=False` drops the MTP layers (llama.cpp's `--no-mtp`). Files above `max_shard_bytes` (default 45 GB) are
    split into `-0000i-of-0000N.gguf` shards. K/IQ types need the llama.cpp tools (`make llama-cpp`).
    `imatrix`: calibration statistics (`CalibStats` or its file); K/IQ types are then quantized with the llama.cpp
    importance matrix written from them (`convert.gguf_imatrix`), the same calibration pass as FP8/NVFP4.
    """
    t0 = time.time()
    qtype = qtype.upper()
    if qtype not in DIRECT_TYPES:
        recipe_for(qtype)  # unknown / imatrix-only types fail before anything is opened
    ckpt = open_checkpoint(model_dir)
    try:
        recipe = None
        if qtype not in DIRECT_TYPES:
            recipe = recipe_for(qtype, tuple(ckpt.config.mtp_layers) if mtp else ())
            tool("llama-quantize"), tool("llama-gguf-split")  # fail now, not after the BF16 pass
        out_dir = variant_dir(model_dir, out_root, qtype)
        stem = f"{Path(model_dir).resolve().name}-{qtype}"
        split = max_shard_bytes or DEFAULT_SPLIT_BYTES
        timings = {}
        with AtomicDir(out_dir, force) as tmp:
            if recipe is None:
                exp = write_gguf(ckpt, tmp / f"{stem}.gguf", qtype, mtp, split_max_bytes=split)
                files = exp.files
                timings["convert_s"] = time.time() - t0
            else:
                inter = tmp / ".intermediate-BF16.gguf"
                exp = write_gguf(ckpt, inter, "BF16", mtp)
                timings["convert_s"] = time.time() - t0
                quantized = tmp / ".quantized.gguf"
                args = recipe.llama_quantize_args()
                if imatrix is not None and not isinstance(imatrix, CalibStats):
                    imatrix = CalibStats.load(imatrix)
                imx = write_imatrix(imatrix, ckpt, tmp / ".imatrix.gguf", mtp=mtp) if imatrix is not None else None
                if imx is not None:
                    args = ["--imatrix", str(imx), *args]
                t1 = time.time()
                llama_quantize(inter, quantized, qtype, args)
                inter.unlink()
                if imx is not None:
                    imx.unlink()
                files = gguf_split(quantized, tmp / stem, split)
                timings["llama_quantize_s"] = time.time() - t1
            prov = _provenance(ckpt, exp, recipe, qtype, files, source_id or str(model_dir), revision, timings)
            if imatrix is not None and recipe is not None:
                prov["imatrix"] = {"from": "stepq calibration statistics", "statistics_sha256": imatrix.sha256}
            (tmp / "stepq.json").write_text(json.dumps(prov, indent=2) + "\n")
    finally:
        ckpt.close()
    return out_dir


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
        return f"{requested} requested; row length {p.shape[-1]} fits no {requested} block, fallback to {actual}"
    if recipe is None:
        return "export type"
    if p.mtp:
        return "MTP head at higher precision than routed experts"
    if p.role.startswith("experts_"):
        return "routed experts: lowest precision of the mix" + (" (+1 step for down)" if p.role == "experts_down" else "")
    if p.role in ("embed", "lm_head"):
        return "embeddings / output at the always-active precision"
    return "always-active tensor (attention, shared expert, dense MLP) at higher precision"


def _provenance(ckpt: Checkpoint, exp: GGUFExport, recipe: GGUFRecipe | None, qtype: str, files: list[Path],
                source: str, revision: str | None, timings: dict) -> dict:
    src_files = {}
    for name in [*sorted(ckpt.shards), "config.json", "tokenizer.json", "tokenizer_config.json"]:
        p = ckpt.dir / name
        if p.is_file():
            src_files[name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    actual = read_tensor_types(files)
    tensors = {}
    for p in exp.tensors:
        requested = p.qtype.name if recipe is None or p.qtype.name == "F32" else recipe.intended_type(p.role, p.mtp)
        tensors[p.name] = {
            "source": p.source, "role": p.role, "layer": p.layer, "mtp": p.mtp, "shape": list(p.shape),
            "type": actual[p.name], "requested": requested, "reason": _reason(p, actual[p.name], requested, recipe),
        }
    return {
        "format_version": 1,
        "source": {"model": source, "revision": revision, "path": str(ckpt.dir.resolve()), "files": src_files},
        "scheme": "gguf", "variant": f"GGUF-{qtype}", "qtype": qtype, "mtp": exp.mtp,
        "mtp_layers": list(ckpt.config.mtp_layers) if exp.mtp else [],
        "recipe": recipe.to_dict() if recipe else {"qtype": qtype, "tool": "gguf-py (identical to llama.cpp's "
                                                                          "convert_hf_to_gguf.py)"},
        "supported_qtypes": supported_qtypes(),
        "files": {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files},
        "tokenizer": exp.tokenizer,
        "tensors": tensors,
        "versions": {"stepq": _version("stepq"), "gguf": _version("gguf"), "torch": _version("torch"),
                     "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION, "llama_cpp": LLAMA_CPP_COMMIT},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None

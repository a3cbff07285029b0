"""stepq calibration statistics -> llama.cpp importance matrix (`--imatrix` of `llama-quantize`), so K/IQ quants
use the same calibration pass as FP8/NVFP4.

Format: the GGUF imatrix that llama.cpp `0c1e57098` writes by default (`tools/imatrix/imatrix.cpp`
`IMatrixCollector::save_imatrix`) and reads first (`common/imatrix-loader.cpp` `common_imatrix_load`, falling back
to the legacy `.dat` only when the file is not GGUF):

- KV `general.type = "imatrix"`, `imatrix.datasets` (string array), `imatrix.chunk_count` (u32),
  `imatrix.chunk_size` (u32) -- `llama-quantize` refuses a GGUF imatrix without all three
  (`tools/quantize/quantize.cpp` `load_imatrix`: "missing imatrix metadata");
- per weight `<gguf name>.in_sum2`: F32, ggml shape `[n_in, n_mat]` (numpy `(n_mat, n_in)`), the raw sum over tokens
  of the squared input of each input channel; `n_mat` = number of experts for `*_exps` stacks, 1 otherwise;
- per weight `<gguf name>.counts`: F32, ggml shape `[1, n_mat]`, the number of tokens summed (per expert: the tokens
  routed to it). For n_mat = 1 both are stored 1-D (`[n_in]`, `[1]`): ggml's GGUF writer drops trailing 1 dims,
  so this is byte-for-byte llama-imatrix's layout. `llama-quantize` divides sums by counts per expert and uses all-ones for an expert with count 0.

stepq's statistics are exactly these quantities (`input_sumsq`, `tokens`; per expert for the expert stacks), so the
conversion is a renaming: checkpoint module -> GGUF tensor name via `convert.gguf_names.gguf_name`.

Covered: every matrix llama.cpp multiplies with an input the calibration saw -- attention q/k/v/gate/output, dense
and shared FFN, the expert stacks, the router (`ffn_gate_inp`, kept F32 by llama-quantize; llama-imatrix records it
too), `output` (lm_head; llama-imatrix only with `--process-output`) and the MTP `nextn.eh_proj` /
`nextn.shared_head_head` when the statistics have them. `token_embd` is a lookup, not a matmul: never in an imatrix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from convert.arch.step35 import TensorInfo, expected_tensors
from convert.checkpoint import Checkpoint, open_checkpoint
from convert.config import Step35Config
from convert.durable import replace_durably
from convert.errors import BadInput
from convert.gguf_names import gguf_name
from quant.mtp import in_gguf
from quant.roles import EXPERT_ROLES, LINEAR_ROLES, Role

if TYPE_CHECKING:
    from calib.stats import CalibStats

KV_DATASETS = "imatrix.datasets"  # common/imatrix-loader.h LLM_KV_IMATRIX_*
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
MATMUL_ROLES = LINEAR_ROLES | {Role.LM_HEAD}  # token_embd is a row lookup: no imatrix


def _weights(model: Checkpoint | Step35Config | str | Path) -> list[tuple[TensorInfo, tuple[int, ...]]]:
    """(info, numpy shape) of every checkpoint tensor; real shapes from a checkpoint, config-implied ones otherwise."""
    if isinstance(model, Checkpoint):
        return [(t.info, tuple(t.entry.shape)) for t in model.tensors.values()]
    if isinstance(model, Step35Config):
        return [(s.info, tuple(s.shape)) for s in expected_tensors(model)]
    ckpt = open_checkpoint(model)
    try:
        return _weights(ckpt)
    finally:
        ckpt.close()


def imatrix_entries(stats: CalibStats, model: Checkpoint | Step35Config | str | Path, mtp: bool = True
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """-> ({gguf weight name: (sums, counts)}, checkpoint modules without stats). Numpy shapes as llama-imatrix
    writes them: expert stacks sums (n_expert, n_in) and counts (n_expert, 1); other weights (n_in,) and (1,).

    Raises BadInput when the statistics do not fit the model (width or expert count) or are not finite."""
    have = set(stats.modules())
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    missing: list[str] = []
    for info, shape in _weights(model):
        if info.role not in MATMUL_ROLES or not in_gguf(info.role, info.layer, info.mtp, with_mtp=mtp):
            continue
        module = info.module
        if module not in have:
            missing.append(module)
            continue
        raw = stats.tensors[f"{module}.input_sumsq"].float().numpy()
        tok = np.asarray(stats.tensors[f"{module}.tokens"].numpy(), dtype=np.float64)
        expert = info.role in EXPERT_ROLES
        # ggml [n_in, n_mat] / [1, n_mat]; gguf stores ggml_n_dims, so llama-imatrix's single matrices are 1-D
        sums = raw.reshape(-1, raw.shape[-1]) if expert else raw.reshape(-1)
        counts = tok.reshape(-1, 1) if expert else tok.reshape(1)
        want = (shape[0], shape[-1]) if expert else (shape[-1],)
        if sums.shape != want or counts.shape[0] != (want[0] if expert else 1):
            raise BadInput(f"{stats.path}: statistics of {module} have shape {tuple(sums.shape)} (counts "
                           f"{counts.shape[0]}), the weight {shape} needs {want}: statistics of another model?")
        if not (np.isfinite(sums).all() and (sums >= 0).all()):
            raise BadInput(f"{stats.path}: non-finite or negative sums of squares for {module}")
        if counts.max(initial=0) >= 2**24:
            raise BadInput(f"{stats.path}: {module} counts {int(counts.max())} tokens; llama.cpp stores counts as "
                           f"F32, exact only below 2^24")
        entries[gguf_name(info)] = (np.ascontiguousarray(sums, dtype=np.float32),
                                    np.ascontiguousarray(counts, dtype=np.float32))
    if not entries:
        raise BadInput(f"{stats.path}: no statistics for any weight of this model")
    return entries, sorted(missing)


def write_imatrix(stats: CalibStats, ckpt_config_or_checkpoint: Checkpoint | Step35Config | str | Path,
                  out_path: str | Path, mtp: bool = True) -> Path:
    """Write the llama.cpp GGUF imatrix of `stats` (loaded `calib.stats.CalibStats`) for the model (a Checkpoint,
    its Step35Config or the model folder) to `out_path` (atomically); returns `out_path`. `mtp=False` leaves out
    the MTP layers, like a `--no-mtp` GGUF. Weights without statistics are left out (llama-quantize quantizes them without imatrix, and
    refuses only for the very-low-bit types that require one)."""
    entries, _missing = imatrix_entries(stats, ckpt_config_or_checkpoint, mtp)
    meta = stats.meta
    dataset = (meta.get("dataset") or {}).get("id") or str(stats.path)
    n, seq_len = int(meta.get("n") or 0), int(meta.get("seq_len") or 0)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(None, arch="")  # an empty arch writes no general.architecture, as llama-imatrix does
    try:
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(KV_DATASETS, [dataset])
        w.add_uint32(KV_CHUNK_COUNT, n)
        w.add_uint32(KV_CHUNK_SIZE, seq_len)
        for name in sorted(entries):  # llama-imatrix's order
            sums, counts = entries[name]
            w.add_tensor(name + SUM_SUFFIX, sums, raw_dtype=gguf.GGMLQuantizationType.F32)
            w.add_tensor(name + COUNT_SUFFIX, counts, raw_dtype=gguf.GGMLQuantizationType.F32)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()  # flushes; the second close in `finally` is a no-op
        replace_durably(tmp, out_path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out_path

"""GGUF in one streaming pass: the file(s) planned up front (header, tensor table, offsets), then each tensor
converted piece by piece and written straight into its place. K/IQ types are quantized in-process by ggml's own
quantizer (`convert.ggml_quants`): the bytes `llama-quantize` writes from a BF16 GGUF (and `llama-gguf-split` when
split), without that intermediate file or a second pass over the model.

What `llama-quantize` (llama.cpp 0c1e57098, `src/llama-quant.cpp`) does, and therefore this module:
- tensors in its loader's order (`weight_name_comparer`: by block number, non-block tensors first, then by name);
- metadata: the input's keys in order, then `general.quantization_version` and `general.file_type` removed and
  appended (`gguf_set_val_*` re-appends a key), split keys removed, then the `--imatrix` keys llama-quantize's CLI
  adds (`quantize.imatrix.file`, `.dataset`, `.entries_count`, `.chunks_count`; strings cut to 127 bytes);
- each tensor the recipe quantizes: its BF16 values (F32 sources rounded to BF16 first, as the intermediate held
  them) widened to F32, quantized row by row with the imatrix of its expert (sums / token count per expert, all
  ones for an expert without tokens), every row block validated; F32 tensors (norms, router) copied;
- data aligned to 32 bytes, zero padding after every tensor.
`llama-gguf-split --split-max-size` is reproduced for files over the split size: tensors in order, a new file when
the padded data would exceed the size, all metadata in the first file, `split.no`, `split.tensors.count`,
`split.count` in each. tests/test_gguf_one_pass.py compares every README type with the two tools' output.

The direct types (BF16, F16, Q8_0) use the same pass with llama.cpp's converter's plan instead: its tensor order,
its metadata, gguf-py's split rule and bytes (Q8_0 by the fused kernel `quant.fast_q8_0`, gguf-py's bytes).

Memory: one expert (or a block of rows) per worker. Resume: each tensor is a unit of the artifact writer's ledger
(`convert.writer`), so a killed export keeps every tensor it finished.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
import xxhash
from gguf.gguf_writer import GGUFValue

from convert import ggml_quants
from convert.checkpoint import Checkpoint
from convert.errors import BadInput
from convert.executor import Task
from convert.gguf_export import ROW_BLOCK_ELEMENTS, StreamedTensor, llama3_rope_factors, metadata_writer, plan_tensors
from convert.gguf_imatrix import imatrix_entries
from convert.gguf_names import QT, PlannedTensor
from convert.gguf_recipe import GGUFRecipe, fallback_type
from convert.provenance import digest
from convert.writer import OutSpec, PlannedFile

if TYPE_CHECKING:
    from calib.stats import CalibStats

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; neither writer sets general.alignment
KV_STRING_MAX = 127  # llama_model_kv_override.val_str: llama-quantize's CLI keeps the first 127 bytes
# llama-quantize records `--imatrix` as given; the reference flow passes llama-imatrix's default name
IMATRIX_FILE = "imatrix.gguf"
K = gguf.Keys


@dataclass(frozen=True)
class QuantTensor:
    """A GGUF tensor of an export: `p` as planned from the checkpoint (for a K/IQ type, as the BF16 intermediate
    would hold it, `p.qtype`), `qtype` as written."""

    p: PlannedTensor
    qtype: QT

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.p.shape, self.qtype)

    @property
    def row_bytes(self) -> int:
        return tensor_nbytes(self.p.shape[-1:], self.qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


_BLOCK = re.compile(r"blk\.(\d+)\.")


def loader_order(name: str) -> tuple[int, str]:
    """llama.cpp's `weight_name_comparer`: block number (-1 outside blocks), then the name (bytewise)."""
    m = _BLOCK.match(name)
    return (int(m.group(1)) if m else -1, name)


def plan_direct(ckpt: Checkpoint, outtype: str, mtp: bool, mtp_only: bool) -> list[QuantTensor]:
    """A type gguf-py writes (BF16, F16, Q8_0): llama.cpp's converter's tensors, order and types."""
    return [QuantTensor(p, p.qtype) for p in plan_tensors(ckpt, outtype, mtp, mtp_only)]


def plan_quantized(ckpt: Checkpoint, recipe: GGUFRecipe, mtp: bool, mtp_only: bool) -> list[QuantTensor]:
    """Every tensor in llama-quantize's order with the type the recipe gives it (after llama.cpp's row-size
    fallback); what the BF16 intermediate keeps in F32 stays F32."""
    out = []
    for p in plan_tensors(ckpt, "BF16", mtp, mtp_only):
        if p.qtype == QT.F32:
            out.append(QuantTensor(p, QT.F32))
        else:
            out.append(QuantTensor(p, QT[fallback_type(recipe.intended_type(p.role, p.mtp), p.shape[-1])]))
    return sorted(out, key=lambda t: loader_order(t.p.name))


# -- importance matrix ----------------------------------------------------------------------------------------

@dataclass
class Importance:
    """The imatrix entries of an export (per GGUF tensor: sums of squared inputs (n_mat, n_in) and token counts
    (n_mat, 1), views of the statistics), turned into llama-quantize's per-column weights one tensor at a time: all
    of them at once would double the statistics' memory (~0.5 GB for the real model)."""

    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    dataset: str | None
    chunks: int

    @classmethod
    def from_stats(cls, stats: CalibStats, ckpt: Checkpoint, mtp: bool) -> Importance:
        entries, _missing = imatrix_entries(stats, ckpt, mtp)
        dataset = (stats.meta.get("dataset") or {}).get("id") or str(stats.path)
        return cls(entries, dataset, int(stats.meta.get("n") or 0))

    def weights(self, name: str, matrix: int = 0) -> np.ndarray | None:
        """The column weights (n_in,) float32 of one matrix (an expert of a stack) as `load_imatrix` makes them:
        sums / count (float32 division), all ones for an expert no token reached; None without an entry."""
        if name not in self.entries:
            return None
        sums, counts = self.entries[name]
        sums, count = sums.reshape(-1, sums.shape[-1])[matrix], counts.reshape(-1)[matrix]
        return (sums / count).astype(np.float32) if count > 0 else np.ones_like(sums, dtype=np.float32)

    def digest(self, name: str) -> str | None:
        """What a tensor's bytes depend on in the imatrix: its own entry (another module's change keeps it)."""
        if name not in self.entries:
            return None
        sums, counts = self.entries[name]
        return xxhash.xxh3_128_hexdigest(sums.tobytes() + counts.tobytes())

    def metadata(self) -> list[tuple[str, GGUFValue]]:
        """The keys llama-quantize's CLI adds for `--imatrix`, in its order."""
        kv = [("quantize.imatrix.file", _kv_string(IMATRIX_FILE))]
        if self.dataset:
            kv.append(("quantize.imatrix.dataset", _kv_string(self.dataset)))
        kv.append(("quantize.imatrix.entries_count", GGUFValue(len(self.entries), gguf.GGUFValueType.UINT32)))
        if self.chunks > 0:
            kv.append(("quantize.imatrix.chunks_count", GGUFValue(self.chunks, gguf.GGUFValueType.UINT32)))
        return kv


def _kv_string(s: str) -> GGUFValue:
    return GGUFValue(s.encode()[:KV_STRING_MAX], gguf.GGUFValueType.STRING)


def check_importance(tensors: list[QuantTensor], importance: Importance | None) -> None:
    """Refuse before writing anything what llama-quantize refuses mid-way: a very-low-bit type without imatrix
    weights for that tensor (token_embd and output are exempt there), and weights of the wrong width."""
    for t in tensors:
        sums = importance.entries.get(t.p.name, (None,))[0] if importance is not None else None
        if sums is not None and sums.size != t.p.shape[-1] * (t.p.shape[0] if len(t.p.shape) == 3 else 1):
            raise BadInput(f"tensor {t.p.name}: imatrix has {sums.size} values, the weight {list(t.p.shape)} needs "
                           f"{t.p.shape[-1]} per matrix")
        exempt = t.p.name in ("token_embd.weight", "output.weight")
        if sums is None and not exempt and t.qtype.name in IMATRIX_REQUIRED:
            raise BadInput(f"tensor {t.p.name} ({t.p.source}): {t.qtype.name} needs an importance matrix, and the "
                           f"calibration statistics have none for it")


IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})  # tensor_requires_imatrix


# -- metadata and layout ----------------------------------------------------------------------------------------

def quantized_metadata(ckpt: Checkpoint, recipe: GGUFRecipe, mtp: bool, mtp_only: bool,
                       importance: Importance | None) -> tuple[list[tuple[str, GGUFValue]], dict]:
    """The output's keys: the BF16 intermediate's (what llama.cpp's converter writes), as llama-quantize rewrites
    them; and the tokenizer summary."""
    plan = plan_tensors(ckpt, "BF16", mtp, mtp_only)
    w, tok = metadata_writer(ckpt, plan, QT.BF16, mtp)
    kv = dict(w.kv_data[0])
    ftype = gguf.LlamaFileType[f"MOSTLY_{recipe.qtype}"]
    for key, value in ((K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION), (K.General.FILE_TYPE, int(ftype))):
        kv.pop(key, None)
        kv[key] = GGUFValue(value, gguf.GGUFValueType.UINT32)
    for key in (K.Split.LLM_KV_SPLIT_NO, K.Split.LLM_KV_SPLIT_COUNT, K.Split.LLM_KV_SPLIT_TENSORS_COUNT):
        kv.pop(key, None)
    for key, value in importance.metadata() if importance is not None else ():
        kv.pop(key, None)
        kv[key] = value
    return list(kv.items()), tok


def direct_metadata(ckpt: Checkpoint, outtype: str, mtp: bool, mtp_only: bool
                    ) -> tuple[list[tuple[str, GGUFValue]], dict]:
    """The keys llama.cpp's converter writes for a BF16/F16/Q8_0 export, in its order; and the tokenizer summary."""
    plan = plan_tensors(ckpt, outtype, mtp, mtp_only)
    w, tok = metadata_writer(ckpt, plan, QT[outtype], mtp)
    return list(w.kv_data[0].items()), tok


def gguf_header(kv: list[tuple[str, GGUFValue]], tensors: list[QuantTensor]) -> bytes:
    """Header, metadata and tensor table of a GGUF v3 file, padded to the data alignment (gguf-py's packing)."""
    w = gguf.GGUFWriter(None, arch="")
    out = bytearray()
    out += w._pack("<I", gguf.GGUF_MAGIC, skip_pack_prefix=True) + w._pack("I", gguf.GGUF_VERSION)
    out += w._pack("Q", len(tensors)) + w._pack("Q", len(kv))
    for key, v in kv:
        out += w._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
        out += w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type)
    offset = 0
    for t in tensors:
        out += w._pack_val(t.p.name, gguf.GGUFValueType.STRING, add_vtype=False)
        out += w._pack("I", len(t.p.shape))
        for d in reversed(t.p.shape):  # ggml order: innermost first
            out += w._pack("Q", d)
        out += w._pack("I", int(t.qtype)) + w._pack("Q", offset)
        offset += _pad(t.nbytes)
    out += bytes(_pad(len(out)) - len(out))
    return bytes(out)


def split_groups(tensors: list[QuantTensor], max_bytes: int, padded: bool) -> list[list[QuantTensor]]:
    """Tensors in order into files of at most `max_bytes` of data: a new file when the next tensor would go over.
    `padded`: llama-gguf-split counts aligned sizes and refuses a tensor larger than a file; gguf-py counts
    unpadded sizes and puts such a tensor in a file of its own."""
    groups: list[list[QuantTensor]] = [[]]
    used = 0
    for t in tensors:
        size = _pad(t.nbytes) if padded else t.nbytes
        if used + size > max_bytes and (groups[-1] or padded):
            if not groups[-1]:
                raise BadInput(f"tensor {t.p.name}: {size} bytes, more than the split size {max_bytes}")
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += size
    return groups


def plan_quantized_files(stem: str, kv: list[tuple[str, GGUFValue]], tensors: list[QuantTensor], split_bytes: int
                         ) -> list[PlannedFile]:
    """The output file(s): `<stem>.gguf`, or llama-gguf-split's shards when the file would exceed `split_bytes`
    (`split.count` re-set last, so it comes after `split.tensors.count`)."""
    whole = _layout(f"{stem}.gguf", kv, tensors)
    if whole.size <= split_bytes:
        return [whole]
    groups = split_groups(tensors, max(1, split_bytes // 1000**2) * 1000**2, padded=True)  # whole MB: its unit
    return _split_files(stem, kv, groups, (K.Split.LLM_KV_SPLIT_NO, K.Split.LLM_KV_SPLIT_TENSORS_COUNT,
                                           K.Split.LLM_KV_SPLIT_COUNT))


def plan_converter_files(stem: str, kv: list[tuple[str, GGUFValue]], tensors: list[QuantTensor], split_bytes: int
                         ) -> list[PlannedFile]:
    """The file(s) llama.cpp's converter (gguf-py's writer, `--split-max-size`) writes for a data size over
    `split_bytes` (0: never split)."""
    groups = split_groups(tensors, split_bytes, padded=False) if split_bytes else [tensors]
    if len(groups) == 1:
        return [_layout(f"{stem}.gguf", kv, tensors)]
    return _split_files(stem, kv, groups, (K.Split.LLM_KV_SPLIT_NO, K.Split.LLM_KV_SPLIT_COUNT,
                                           K.Split.LLM_KV_SPLIT_TENSORS_COUNT))


def _split_files(stem: str, kv: list[tuple[str, GGUFValue]], groups: list[list[QuantTensor]], key_order: tuple
                 ) -> list[PlannedFile]:
    """`<stem>-0000i-of-0000N.gguf`: all metadata in the first file, the three split keys in each, in the order
    the tool writes them."""
    values = {K.Split.LLM_KV_SPLIT_COUNT: GGUFValue(len(groups), gguf.GGUFValueType.UINT16),
              K.Split.LLM_KV_SPLIT_TENSORS_COUNT: GGUFValue(sum(map(len, groups)), gguf.GGUFValueType.INT32)}
    files = []
    for i, group in enumerate(groups):
        split_kv = [(k, GGUFValue(i, gguf.GGUFValueType.UINT16) if k == K.Split.LLM_KV_SPLIT_NO else values[k])
                    for k in key_order]
        files.append(_layout(f"{stem}-{i + 1:05d}-of-{len(groups):05d}.gguf", (kv if i == 0 else []) + split_kv,
                             group))
    return files


def _layout(name: str, kv, tensors: list[QuantTensor]) -> PlannedFile:
    head = gguf_header(kv, tensors)
    placed, offset = [], 0
    for t in tensors:
        placed.append((OutSpec(t.p.name, torch.uint8, (t.nbytes,)), offset))
        offset += _pad(t.nbytes)
    return PlannedFile(name, head, placed, len(head) + offset)


# -- the tensors ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Rows of one tensor converted together: expert `expert` of a stack, or rows [row, row + count)."""

    tensor: QuantTensor
    expert: int | None
    row: int
    count: int

    @property
    def byte_offset(self) -> int:
        experts_before = 0 if self.expert is None else self.expert * self.tensor.p.shape[-2]
        return (experts_before + self.row) * self.tensor.row_bytes


def pieces(t: QuantTensor) -> list[Piece]:
    shape = t.p.shape
    if len(shape) == 3:
        return [Piece(t, e, 0, shape[1]) for e in range(shape[0])]
    rows = math.prod(shape[:-1])
    step = max(1, ROW_BLOCK_ELEMENTS // shape[-1])
    return [Piece(t, None, r, min(step, rows - r)) for r in range(0, rows, step)]


def read_piece(ckpt: Checkpoint, piece: Piece, rope_factors: np.ndarray | None) -> torch.Tensor:
    """The piece's source rows, 2-D (mmap views of the checkpoint)."""
    p = piece.tensor.p
    if p.source is None:
        return torch.from_numpy(rope_factors.reshape(1, -1))
    if piece.expert is not None:
        return ckpt.read_expert(p.source, piece.expert)
    w = ckpt.read(p.source)
    w = w.reshape(1, -1) if w.dim() == 1 else w.reshape(-1, w.shape[-1])
    return w[piece.row:piece.row + piece.count]


def convert_piece(piece: Piece, imatrix: np.ndarray | None, converter: StreamedTensor, rows: torch.Tensor
                  ) -> np.ndarray | torch.Tensor:
    """The piece's bytes as the output stores them; `imatrix`: its matrix's column weights (`Importance.weights`),
    looked up by the caller so that a task sent to another process carries one vector, not the whole imatrix."""
    t = piece.tensor
    if t.qtype == t.p.qtype:  # a direct type's tensor, or kept in the intermediate's type (F32)
        if converter.raw_copy:  # the source's own bytes (mmap'd, read-only): handed on without a copy
            converter.encode(rows)  # the finite check
            return rows.contiguous().reshape(-1).view(torch.uint8)
        return converter.encode(rows)
    if not bool(torch.isfinite(rows).all()):
        raise BadInput(f"tensor {t.p.source}: contains NaN or Inf")
    values = rows.to(torch.bfloat16).to(torch.float32).numpy()  # the BF16 intermediate's values
    try:
        return ggml_quants.quantize(int(t.qtype), values, imatrix)
    except ValueError as e:
        raise BadInput(f"tensor {t.p.source}: {t.qtype.name}: {e}") from e


def tensor_tasks(ckpt: Checkpoint, t: QuantTensor, importance: Importance | None) -> list[Task]:
    """A tensor's pieces as executor tasks, keyed (tensor, piece, last?)."""
    converter = StreamedTensor(ckpt, t.p, llama3_rope_factors(ckpt.config) if t.p.source is None else None)
    ps = pieces(t)
    src_bytes = ckpt.tensors[t.p.source].entry.nbytes if t.p.source is not None else 0
    quantized = t.qtype != t.p.qtype and importance is not None
    return [Task((t, piece, i == len(ps) - 1), partial(read_piece, ckpt, piece, converter.rope_factors),
                 partial(convert_piece, piece, importance.weights(t.p.name, piece.expert or 0) if quantized else None,
                         converter), src_bytes // len(ps))
            for i, piece in enumerate(ps)]


def tensor_key(ckpt: Checkpoint, t: QuantTensor, settings: str, importance: Importance | None) -> str:
    """What a tensor's bytes depend on: the export's settings, its source tensor's identity, its imatrix weights."""
    src = None
    if t.p.source is not None:
        s = ckpt.tensors[t.p.source]
        src = [s.info.name, s.entry.dtype, list(s.entry.shape), s.entry.start, s.shard, ckpt.shard_identity(s.shard)]
    return digest({"settings": settings, "name": t.p.name, "type": t.qtype.name, "shape": list(t.p.shape),
                   "source": src, "imatrix": importance.digest(t.p.name) if importance is not None else None})


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))

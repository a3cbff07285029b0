"""Step-3.5 checkpoint -> GGUF (llama.cpp arch `step35`), streamed tensor by tensor, MTP head as `blk.N.nextn.*`.

Output is identical, key for key and tensor for tensor, to llama.cpp's own converter (`convert_hf_to_gguf.py`,
`conversion/step3.py`, in the tree stepq builds its tools from): same metadata keys in the same order, same tensor
names, order, shapes, types and bytes. tests/test_gguf.py checks that against the converter itself.

Types written here are those gguf-py quantizes (F32, F16, BF16, Q8_0; byte-identical to `llama-quantize`); K- and
IQ-quants are quantized in one pass by ggml's quantizer from the same plan and metadata (`convert.gguf_quantize`).

Memory: a tensor is converted in row blocks (3-D expert stacks one expert at a time) while GGUFWriter writes it,
so peak memory is one block, whatever the model size.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from convert.checkpoint import Checkpoint, open_checkpoint
from convert.config import Step35Config
from convert.errors import BadInput
from convert.gguf_names import QT, ROPE_FREQS, ZERO_CENTRED_NORMS, PlannedTensor, gguf_name, storage_type
from convert.gguf_vocab import add_tokenizer
from quant.fast_common import all_finite
from quant.fast_q8_0 import quantize_q8_0
from quant.mtp import in_gguf
from quant.roles import VISION_ROLES

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.STEP35]  # "step35"
OUTTYPES: dict[str, QT] = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16, "Q8_0": QT.Q8_0}
FILE_TYPES: dict[QT, gguf.LlamaFileType] = {
    QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
ROW_BLOCK_ELEMENTS = 1 << 22  # rows converted at a time: 16 MiB of float32
WORKERS = max(1, min(8, os.cpu_count() or 1))


# -- tensors ----------------------------------------------------------------------------------------------------

def llama3_rope_factors(cfg: Step35Config) -> np.ndarray | None:
    """`rope_freqs.weight` for llama3 rope scaling: factors over the rotary dims of the full-attention layers
    (head_dim x partial_rotary_factor), padded with 1.0 to head_dim/2 so unscaled dims stay neutral."""
    rope = _rope_parameters(cfg.raw)
    params = rope.get("full_attention", rope)
    if str(params.get("rope_type") or "").lower() != "llama3":
        return None
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    if not full:
        raise BadInput(f"{cfg.path}: llama3 rope scaling but no full_attention layer")
    theta = cfg.raw.get("rope_theta", 10000.0)
    base = float(theta[0] if isinstance(theta, list) else theta)
    rot = int(cfg.head_dim * float(cfg.partial_rotary_factors[full[0]]))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    orig = int(params.get("original_max_position_embeddings", 8192))
    # inverse frequencies in float32, as the reference converter computes them (the thresholds below see them)
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - s) / factor + s))
    out += [1.0] * max(0, cfg.head_dim // 2 - len(out))
    return np.asarray(out, dtype=np.float32)



def plan_tensors(ckpt: Checkpoint, outtype: str = "BF16", mtp: bool = True, mtp_only: bool = False
                 ) -> list[PlannedTensor]:
    """Every GGUF tensor in llama.cpp's converter order: `rope_freqs` first, then shard by shard (sorted file
    names), tensors sorted by checkpoint name within a shard. `mtp_only`: the draft-only file (`--mtp`)."""
    qt = _outtype(outtype)
    cfg = ckpt.config
    if mtp_only and (not mtp or cfg.num_mtp_layers == 0):
        raise BadInput(f"{ckpt.dir}: a draft-only MTP GGUF needs the MTP layers (num_nextn_predict_layers = "
                       f"{cfg.num_mtp_layers}{', and --no-mtp drops them' if not mtp else ''})")
    plan: list[PlannedTensor] = []
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        plan.append(PlannedTensor(ROPE_FREQS, factors.shape, QT.F32, None, "rope_freqs"))
    for t in sorted(ckpt.tensors.values(), key=lambda t: (t.shard, t.info.name)):
        if t.info.role in VISION_ROLES:  # Step-3.7's vision side goes to the mmproj file (convert.gguf_mmproj)
            continue
        if not in_gguf(t.info.role, t.info.layer, t.info.mtp, with_mtp=mtp, mtp_only=mtp_only):
            continue
        name = gguf_name(t.info)
        shape = tuple(t.entry.shape)
        plan.append(PlannedTensor(name, shape, storage_type(name, shape, qt), t.info.name, t.info.label,
                                  t.info.layer, t.info.mtp, t.info.role in ZERO_CENTRED_NORMS))
    names = [p.name for p in plan]
    if len(set(names)) != len(names):
        raise BadInput(f"{ckpt.dir}: two checkpoint tensors map to the same GGUF name")
    return plan


def _encode(rows: np.ndarray, qtype: QT) -> np.ndarray:
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)


def _byte_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    if qtype in (QT.F32, QT.F16):
        return shape
    return gguf.quant_shape_to_byte_shape(shape, qtype)


class StreamedTensor:
    """Duck-typed array for `GGUFWriter.add_tensor`: shape/dtype/nbytes up front, data produced in row blocks
    (one expert at a time for 3-D stacks) when the writer calls `tofile`.

    BF16 (F32) sources exported as BF16 (F32) are copied byte for byte: bf16 -> f32 -> bf16 is exact, so this is
    what gguf-py's quantizer would produce, minus the time. Other conversions run gguf-py's quantizers on row
    blocks in a thread pool (numpy releases the GIL), written in order."""

    def __init__(self, ckpt: Checkpoint, p: PlannedTensor, rope_factors: np.ndarray | None = None):
        self.ckpt, self.p, self.rope_factors = ckpt, p, rope_factors
        self.shape = _byte_shape(p.shape, p.qtype)
        self.dtype = np.dtype({QT.F32: np.float32, QT.F16: np.float16}.get(p.qtype, np.uint8))
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        src_dtype = ckpt.tensors[p.source].entry.dtype if p.source is not None else None
        self.raw_copy = not p.add_one and (src_dtype, p.qtype) in (("BF16", QT.BF16), ("F32", QT.F32))

    def _matrices(self):
        """2-D views of the source (1-D tensors as one row), one per expert for 3-D stacks."""
        p = self.p
        if p.source is None:
            yield torch.from_numpy(self.rope_factors.reshape(1, -1))
        elif len(p.shape) == 3:
            for e in range(p.shape[0]):
                yield self.ckpt.read_expert(p.source, e)
        else:
            w = self.ckpt.read(p.source)
            yield w.reshape(1, -1) if w.dim() == 1 else w.reshape(-1, w.shape[-1])

    def _convert(self, rows: torch.Tensor) -> np.ndarray:
        rows = rows.to(torch.float32)
        if self.p.add_one:
            rows = rows + 1.0
        if not torch.isfinite(rows).all():
            raise BadInput(f"tensor {self.p.source}: contains NaN or Inf")
        return _encode(rows.numpy(), self.p.qtype)

    def encode(self, block: torch.Tensor) -> np.ndarray:
        """One block of rows as stored: the source bytes when they already are, Q8_0 by the fused kernel (gguf-py's
        bytes, ~6x faster), else gguf-py's conversion."""
        if self.p.qtype == QT.Q8_0 and not self.p.add_one:
            try:
                fast = quantize_q8_0(block)
            except ValueError as e:
                raise BadInput(f"tensor {self.p.source}: {e}") from e
            if fast is not None:
                return fast
        if not self.raw_copy:
            return self._convert(block)
        if not all_finite(block):
            raise BadInput(f"tensor {self.p.source}: contains NaN or Inf")
        return block.contiguous().view(torch.uint8).numpy()

    def _blocks(self):
        for m in self._matrices():
            step = max(1, ROW_BLOCK_ELEMENTS // max(1, m.shape[-1]))
            for r in range(0, m.shape[0], step):
                yield m[r:r + step]

    def tofile(self, fp) -> None:
        written = 0
        if self.raw_copy:
            for block in self._blocks():
                data = self.encode(block)
                fp.write(memoryview(data).cast("B"))
                written += data.nbytes
        else:
            with ThreadPoolExecutor(max_workers=WORKERS) as pool:
                pending: deque = deque()
                for block in self._blocks():
                    pending.append(pool.submit(self.encode, block))
                    if len(pending) > 2 * WORKERS:  # bounded look-ahead: memory stays a few blocks
                        written += _write(fp, pending.popleft().result())
                while pending:
                    written += _write(fp, pending.popleft().result())
        if written != self.nbytes:
            raise RuntimeError(f"tensor {self.p.name}: wrote {written} of {self.nbytes} bytes")

    def byteswap(self, inplace: bool = False):  # only called for big-endian output, which stepq never writes
        raise NotImplementedError


def _write(fp, data: np.ndarray) -> int:
    data.tofile(fp)
    return data.nbytes


# -- metadata ---------------------------------------------------------------------------------------------------

def _rope_parameters(raw: dict) -> dict:
    return dict(raw.get("rope_parameters", raw.get("rope_scaling")) or {})


def _first(raw: dict, keys: list[str]):
    return next((raw[k] for k in keys if k in raw), None)


def _per_layer(values, n: int, default) -> list:
    values = list(values or [])
    return (values + [default] * (n - len(values)))[:n]


def add_model_metadata(w: gguf.GGUFWriter, cfg: Step35Config, ftype: gguf.LlamaFileType, mtp: bool) -> None:
    """Hyper-parameters, in the order llama.cpp's converter adds them (general.* and tokenizer.* excluded)."""
    raw = cfg.raw
    n_blocks = cfg.num_trunk_layers + (cfg.num_mtp_layers if mtp else 0)
    layer_types = _per_layer(raw.get("layer_types") or cfg.layer_types, n_blocks, "full_attention")
    rotary = _per_layer(raw.get("partial_rotary_factors"), n_blocks, 0.5)
    expected = [1.0 if t == "sliding_attention" else 0.5 for t in layer_types]
    if [float(x) for x in rotary] != expected:
        raise BadInput(f"{cfg.path}: partial_rotary_factors {rotary} must be 0.5 on full-attention and 1.0 on "
                       f"sliding layers: llama.cpp's step35 halves the rotary dims of full layers, nothing else")
    rope = _rope_parameters(raw)
    theta = raw.get("rope_theta")
    if isinstance(theta, list):
        full = [float(theta[i]) for i, t in enumerate(layer_types) if t == "full_attention" and i < len(theta)]
        swa = [float(theta[i]) for i, t in enumerate(layer_types) if t != "full_attention" and i < len(theta)]
        if len(set(full)) > 1 or len(set(swa)) > 1:
            raise BadInput(f"{cfg.path}: rope_theta varies within full or sliding layers; GGUF stores one of each")
        rope_theta, swa_theta = float(theta[0]), float(theta[1])  # what llama.cpp's converter reads
        rope["rope_theta"], rope["sliding_attention"] = rope_theta, {"rope_theta": swa_theta}
    elif theta is not None and "full_attention" not in rope and "sliding_attention" not in rope:
        rope.setdefault("rope_theta", theta)
    params = rope.get("full_attention", rope)
    rope_type = params.get("rope_type") or params.get("type")
    if rope_type is not None and str(rope_type).lower() not in ("llama3", "default"):
        raise BadInput(f"{cfg.path}: rope_type {rope_type!r}: the step35 GGUF writer handles llama3 (or none)")

    other = raw.get("attention_other_setting") or {}
    n_head, n_kv = raw["num_attention_heads"], raw["num_attention_groups"]
    n_head_swa, n_kv_swa = other.get("num_attention_heads", n_head), other.get("num_attention_groups", n_kv)

    w.add_block_count(n_blocks)
    if (n_ctx := _first(raw, ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                              "max_sequence_length", "model_max_length"])) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(cfg.hidden_size)
    if (n_ff := _first(raw, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size"])) is not None:
        w.add_feed_forward_length(n_ff)
    heads = [n_head_swa if t == "sliding_attention" else n_head for t in layer_types]
    w.add_head_count(heads)  # (llama.cpp's converter writes the scalar here, then replaces it with the array)
    kv_heads = [n_kv_swa if t == "sliding_attention" else n_kv for t in layer_types]
    kv_early = _first(raw, ["num_key_value_heads", "n_kv_heads"]) is not None
    if kv_early:
        w.add_head_count_kv(kv_heads)
    if (theta0 := params.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta0)
    if (theta_swa := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta_swa)
    eps_early = _first(raw, ["rms_norm_eps", "norm_eps"]) is not None
    if eps_early:
        w.add_layer_norm_rms_eps(raw.get("rms_norm_eps", 1e-5))
    if (act := raw.get("moe_router_activation")) is not None:
        gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
        if act not in gating:
            raise BadInput(f"{cfg.path}: moe_router_activation {act!r} (llama.cpp: sigmoid or softmax)")
        w.add_expert_gating_func(gating[act])
    if "head_dim" in raw:
        w.add_key_length(raw["head_dim"])
        w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)

    if not kv_early:
        w.add_head_count_kv(kv_heads)
    w.add_sliding_window(raw["sliding_window"])
    w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if "head_dim" not in raw:
        w.add_value_length(cfg.head_dim)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(raw["share_expert_dim"])
    if (scale := raw.get("moe_router_scaling_factor")) is not None:
        w.add_expert_weights_scale(scale)
    if (norm := raw.get("norm_expert_weight")) is not None:
        w.add_expert_weights_norm(norm)
    w.add_leading_dense_block_count(min(cfg.moe_layers) if cfg.moe_layers else 0)
    w.add_moe_every_n_layers(int(raw.get("moe_every_n_layer", 1)))
    if not eps_early:
        w.add_layer_norm_rms_eps(raw.get("rms_norm_eps", 1e-5))
    for key, add in (("swiglu_limits", w.add_swiglu_clamp_exp), ("swiglu_limits_shared", w.add_swiglu_clamp_shexp)):
        if raw.get(key) is not None:
            add(_per_layer([0.0 if v is None else float(v) for v in raw[key]], n_blocks, 0.0))
    if mtp and cfg.num_mtp_layers > 0:
        w.add_nextn_predict_layers(cfg.num_mtp_layers)


def general_metadata(w: gguf.GGUFWriter, model_dir: Path, model_name: str | None,
                     gtype: str = gguf.GGUFType.MODEL) -> None:
    """general.type/name/size_label/... from the model folder (README card, config, generation config), through
    gguf-py's Metadata as llama.cpp's converter does; `gtype` the file's general.type (`model`, or `mmproj`)."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, model_name, total)
    gen = _json(model_dir / "generation_config.json")
    if meta.sampling_penalty_repeat is None and "repetition_penalty" in gen:
        meta.sampling_penalty_repeat = gen["repetition_penalty"]  # the target tree's gguf-py reads this key too
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gtype)
    meta.set_gguf_meta_model(w)


def _json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


# -- the writer -------------------------------------------------------------------------------------------------

@dataclass
class GGUFExport:
    files: list[Path]
    tensors: list[PlannedTensor]
    tokenizer: dict
    outtype: str
    mtp: bool
    mtp_only: bool = False


def _outtype(outtype: str) -> QT:
    key = outtype.upper()
    if key not in OUTTYPES:
        raise BadInput(f"GGUF type {outtype!r}: gguf-py writes {', '.join(OUTTYPES)}; other types go through "
                       f"llama-quantize")
    return OUTTYPES[key]


def shard_paths(out_file: Path, count: int) -> list[Path]:
    """`name.gguf`, or `name-00001-of-0000N.gguf` ... when split (llama.cpp's naming)."""
    if count <= 1:
        return [out_file]
    return [out_file.with_name(f"{out_file.stem}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


def describe_gguf(ckpt: Checkpoint, outtype: str = "BF16", mtp: bool = True, mtp_only: bool = False) -> GGUFExport:
    """What `write_gguf` writes (tensor plan, tokenizer summary), without writing: the provenance of a file that an
    interrupted run already finished."""
    plan = plan_tensors(ckpt, outtype, mtp, mtp_only)
    tok = add_tokenizer(gguf.GGUFWriter(None, ARCH), ckpt.dir, ckpt.config.vocab_size)  # a writer never written
    return GGUFExport([], plan, tok, _outtype(outtype).name, mtp, mtp_only)


def metadata_writer(ckpt: Checkpoint, plan: list[PlannedTensor], qt: QT, mtp: bool, model_name: str | None = None,
                    split_max_bytes: int = 0) -> tuple[gguf.GGUFWriter, dict]:
    """A gguf-py writer holding the plan's tensors (streamed when written) and every metadata key in llama.cpp's
    converter order, not yet written; and the tokenizer summary. The K/IQ export takes its keys from here."""
    factors = llama3_rope_factors(ckpt.config)
    w = gguf.GGUFWriter(None, ARCH, split_max_size=split_max_bytes)
    for p in plan:
        w.add_tensor(p.name, StreamedTensor(ckpt, p, factors if p.source is None else None), raw_dtype=p.qtype)
    general_metadata(w, ckpt.dir, model_name)  # counts the parameters of the tensors added above
    add_model_metadata(w, ckpt.config, FILE_TYPES[qt], mtp)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = add_tokenizer(w, ckpt.dir, ckpt.config.vocab_size)
    return w, tok


def write_whole(w: gguf.GGUFWriter, out_file: Path) -> None:
    """A writer with every tensor added (or streamed) -> its file(s) on disk; the writer is closed either way."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file(path=out_file)
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()


def write_gguf(model: str | Path | Checkpoint, out_file: str | Path, outtype: str = "BF16", mtp: bool = True,
               split_max_bytes: int = 0, model_name: str | None = None, mtp_only: bool = False) -> GGUFExport:
    """Write `out_file` (or its `-0000i-of-0000N` shards when the data exceeds `split_max_bytes` > 0).

    `mtp_only`: the draft-only GGUF of llama.cpp's `convert_hf_to_gguf.py --mtp` -- the MTP blocks plus
    `token_embd`, `output_norm`, `output` (and `rope_freqs`), with the full model's metadata (block_count = trunk +
    MTP, `nextn_predict_layers`), which llama.cpp loads as `--spec-draft-model` next to a `--no-mtp` trunk."""
    qt = _outtype(outtype)
    own = not isinstance(model, Checkpoint)
    ckpt = open_checkpoint(model) if own else model
    try:
        out_file = Path(out_file)
        plan = plan_tensors(ckpt, outtype, mtp, mtp_only)
        w, tok = metadata_writer(ckpt, plan, qt, mtp, model_name, split_max_bytes)
        n_files = len(w.tensors)
        write_whole(w, out_file)
        return GGUFExport(shard_paths(out_file, n_files), plan, tok, qt.name, mtp, mtp_only)
    finally:
        if own:
            ckpt.close()


# -- reading back -----------------------------------------------------------------------------------------------

class _CheckedReader(gguf.GGUFReader):
    """gguf-py's reader, naming the first tensor whose data lies past the end of the file (it would fail on a
    reshape, naming nothing)."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path)
        for field in self.fields.values():  # GGUF strings are UTF-8; gguf-py decodes values only when asked
            if field.types and field.types[-1] == gguf.GGUFValueType.STRING:
                for i in field.data:
                    try:
                        bytes(field.parts[i]).decode("utf-8")
                    except UnicodeDecodeError:
                        raise BadInput(f"{self.path}: key {_shown(field.name)}: a string value is not UTF-8")

    def _get(self, offset: int, dtype, count: int = 1, override_order=None):
        # gguf-py slices its memmap, so a read past the end returns fewer items, not an error: an array of a billion
        # numbers declared near the end of the file then loops (and allocates) without ever advancing.
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if count < 0 or offset < 0 or end > len(self.data):
            raise ValueError(f"a field at byte {offset} runs to byte {end}, past the end of the {len(self.data)}-byte file")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            end = start_offs + int(offset[0]) + math.prod(int(d) for d in dims) * type_size // block
            if end > len(self.data):
                raise BadInput(f"{self.path}: tensor {_shown(bytes(name).decode(errors='replace'))}: data ends at byte "
                               f"{end}, past the end of the {len(self.data)}-byte file (truncated?)")
        super()._build_tensors(start_offs, fields)


def _shown(name: str) -> str:
    """A name from the file as it can go into a one-line message."""
    return name if name.isprintable() else repr(name)


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    """The GGUF's headers and tensor table, or BadInput naming the file (and the tensor) when it is not a whole GGUF."""
    path = Path(path)
    try:
        return _CheckedReader(path)
    except BadInput:
        raise
    except (ValueError, KeyError, IndexError, OverflowError, OSError) as e:  # what gguf-py raises on bad bytes
        first = (str(e).splitlines() or [""])[0]  # an exception may have an empty message
        raise BadInput(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {first})") from e

"""Step-3.5 roles -> llama.cpp `step35` GGUF tensor names, and the per-tensor storage rules of a GGUF export.

The GGUF column of the role table (convert/arch/step35.py), kept here because it is gguf-py's vocabulary; which
tensors a GGUF carries with or without the MTP layers is the MTP rule's (quant/mtp.py `in_gguf`).

Names come from gguf-py's own tables (`gguf.TENSOR_NAMES`); which role maps to which table entry is ours. The
rules mirror what llama.cpp's converter (`conversion/step3.py` + `conversion/base.py`) does, so a stepq GGUF is
tensor-for-tensor identical to one written by `convert_hf_to_gguf.py`:

- every zero-centred RMSNorm weight is stored as `1 + w` (HF computes `x * (1 + w)`, ggml computes `x * w`);
- 1-D tensors, `*_norm.weight`, the router (`ffn_gate_inp`) and non-`.weight` tensors (`exp_probs_b.bias`) are F32;
- everything else gets the export type (F16, BF16, Q8_0), falling back to F16 when a row does not fill whole
  quantization blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from convert.arch.step35 import TensorInfo
from convert.errors import BadInput
from quant.roles import Role

T = gguf.MODEL_TENSOR
QT = gguf.GGMLQuantizationType

# roles whose GGUF name does not depend on where in the block they sit
_ROLE_TENSOR: dict[Role, gguf.MODEL_TENSOR] = {
    Role.EMBED: T.TOKEN_EMBD,
    Role.LM_HEAD: T.OUTPUT,
    Role.ATTN_Q: T.ATTN_Q,
    Role.ATTN_K: T.ATTN_K,
    Role.ATTN_V: T.ATTN_V,
    Role.ATTN_O: T.ATTN_OUT,
    Role.ATTN_GATE: T.ATTN_GATE,
    Role.MLP_GATE: T.FFN_GATE,
    Role.MLP_UP: T.FFN_UP,
    Role.MLP_DOWN: T.FFN_DOWN,
    Role.EXPERTS_GATE: T.FFN_GATE_EXP,
    Role.EXPERTS_UP: T.FFN_UP_EXP,
    Role.EXPERTS_DOWN: T.FFN_DOWN_EXP,
    Role.SHARED_GATE: T.FFN_GATE_SHEXP,
    Role.SHARED_UP: T.FFN_UP_SHEXP,
    Role.SHARED_DOWN: T.FFN_DOWN_SHEXP,
    Role.ROUTER: T.FFN_GATE_INP,
    Role.ROUTER_BIAS: T.FFN_EXP_PROBS_B,
    Role.MTP_EH_PROJ: T.NEXTN_EH_PROJ,
    Role.MTP_ENORM: T.NEXTN_ENORM,
    Role.MTP_HNORM: T.NEXTN_HNORM,
    Role.MTP_HEAD_NORM: T.NEXTN_SHARED_HEAD_NORM,
    Role.MTP_HEAD: T.NEXTN_SHARED_HEAD_HEAD,
}

# Role.NORM covers five different norms; the checkpoint suffix tells them apart
_NORM_TENSOR: dict[str, gguf.MODEL_TENSOR] = {
    "model.norm.weight": T.OUTPUT_NORM,
    "input_layernorm.weight": T.ATTN_NORM,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "self_attn.q_norm.weight": T.ATTN_Q_NORM,
    "self_attn.k_norm.weight": T.ATTN_K_NORM,
}

ZERO_CENTRED_NORMS = frozenset({Role.NORM, Role.MTP_ENORM, Role.MTP_HNORM, Role.MTP_HEAD_NORM})
ROPE_FREQS = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"


def gguf_name(info: TensorInfo) -> str:
    """The llama.cpp name of a checkpoint tensor (`blk.N.*` for layer tensors, `blk.N.nextn.*` for MTP extras)."""
    if info.role is Role.NORM:
        suffix = info.name if info.layer is None else info.name.split(".", 3)[3]
        key = _NORM_TENSOR.get(suffix)
    else:
        key = _ROLE_TENSOR.get(info.role)
    if key is None:
        raise BadInput(f"tensor {info.name}: role {info.role} has no GGUF name")
    name = gguf.TENSOR_NAMES[key]
    if "{bid}" in name:
        if info.layer is None:
            raise BadInput(f"tensor {info.name}: a per-layer GGUF tensor without a layer index")
        name = name.format(bid=info.layer)
    return name + (".bias" if info.role is Role.ROUTER_BIAS else ".weight")


def storage_type(name: str, shape: tuple[int, ...], outtype: QT) -> QT:
    """GGML type a tensor is written in, for an export of type `outtype` (F32, F16, BF16 or Q8_0)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QT.F32
    if ".ffn_gate_inp." in name:
        return QT.F32
    block, _ = gguf.GGML_QUANT_SIZES[outtype]
    if shape[-1] % block != 0:
        return QT.F16  # llama.cpp's converter falls back the same way
    return outtype


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor of an export: where it comes from and how it is stored."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows..., cols); ggml order is the reverse
    qtype: QT
    source: str | None  # checkpoint tensor name; None for generated tensors (rope_freqs)
    role: str  # the role label (`mtp.attn_q`, `experts_up`, ...) or `rope_freqs`
    layer: int | None = None
    mtp: bool = False
    add_one: bool = False  # zero-centred norm stored as 1 + w

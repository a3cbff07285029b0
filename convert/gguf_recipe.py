"""MoE-aware GGUF quantization recipes: which GGML type each role gets, for each `QTYPE`.

Types gguf-py writes itself (BF16, F16, Q8_0) come straight from the checkpoint. K- and IQ-quants are quantized
in one pass by ggml's own quantizer (`convert.gguf_quantize`), each tensor in the type `intended_type` gives it;
the same recipe as llama.cpp's two-pass flow is `llama_quantize_args`: `--tensor-type REGEX=TYPE` overrides (first
match wins, so MTP blocks come first), `--token-embedding-type` and `--output-tensor-type` (recorded in
`stepq.json`; the tests run it to check the one-pass bytes).

Policy (community practice for large MoEs, e.g. AesSedai's Step-3.5 mixes "Q8_0 / Q4_K / Q4_K / Q5_K"): the
routed experts hold ~96% of Step-3.5's weights but each token uses 8 of 288, so they take the low-bit type, with
`ffn_down_exps` one step above gate/up; every always-active tensor (attention incl. the head-wise gate, shared
expert, dense MLP, embeddings, output) and the whole MTP head stay at Q8_0 (Q6_K for the sub-4-bit mixes, as
AesSedai's IQ2_S/IQ3_S files and above llama.cpp's own IQ2 defaults, which put output at Q5_K and token_embd at
Q2_K). The router (`ffn_gate_inp`), its selection bias and all norms are never quantized by llama.cpp (F32).

imatrix-only types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS: llama-quantize refuses them without one,
`tensor_requires_imatrix` in src/llama-quant.cpp) are offered only with an importance matrix (`--imatrix`).

Row-size fallback: a type needs rows that fill whole blocks (256 values for K/IQ types, 32 for Q8_0/IQ4_NL/...).
A tensor whose row length does not gets llama.cpp's fallback (`tensor_type_fallback`, reproduced in
`fallback_type`): IQ* -> IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when the
fallback does not fit either. llama-quantize applies it to `--tensor-type` overrides but not to
`--token-embedding-type` / `--output-tensor-type`, so the recipe applies it to those itself. gguf-py's direct
types fall back to F16 as llama.cpp's converter does (`convert.gguf_names.storage_type`). `stepq.json` records the
requested and the written type of each tensor, and why they differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from convert.arch.step35 import Role
from convert.errors import BadInput

DIRECT_TYPES = ("BF16", "F16", "Q8_0")  # written by gguf-py, byte-identical to llama.cpp

# QTYPE -> (routed gate/up, routed down, always-active + embeddings/output, MTP head). The QTYPE is also the
# llama-quantize file type, whose default type is the routed gate/up type (llama_ftype_get_default_type).
_MIXES: dict[str, tuple[str, str, str, str]] = {
    "IQ1_S": ("IQ1_S", "IQ2_XXS", "Q6_K", "Q8_0"),
    "IQ1_M": ("IQ1_M", "IQ2_XXS", "Q6_K", "Q8_0"),
    "IQ2_XXS": ("IQ2_XXS", "IQ2_XS", "Q6_K", "Q8_0"),
    "IQ2_XS": ("IQ2_XS", "IQ2_S", "Q6_K", "Q8_0"),
    "IQ2_S": ("IQ2_XS", "IQ3_XXS", "Q6_K", "Q8_0"),  # llama.cpp's IQ2_S file type is IQ2_XS-based; AesSedai's mix
    "IQ2_M": ("IQ2_S", "IQ3_XXS", "Q6_K", "Q8_0"),
    "IQ3_XXS": ("IQ3_XXS", "IQ3_S", "Q6_K", "Q8_0"),
    "IQ3_S": ("IQ3_S", "IQ4_XS", "Q6_K", "Q8_0"),
    "Q3_K_S": ("Q3_K", "Q3_K", "Q6_K", "Q8_0"),
    "Q3_K_M": ("Q3_K", "Q4_K", "Q6_K", "Q8_0"),
    "Q3_K_L": ("Q3_K", "Q5_K", "Q8_0", "Q8_0"),
    "Q4_K_S": ("Q4_K", "Q4_K", "Q8_0", "Q8_0"),
    "Q4_K_M": ("Q4_K", "Q5_K", "Q8_0", "Q8_0"),
    "Q5_K_S": ("Q5_K", "Q5_K", "Q8_0", "Q8_0"),
    "Q5_K_M": ("Q5_K", "Q6_K", "Q8_0", "Q8_0"),
    "Q6_K": ("Q6_K", "Q6_K", "Q8_0", "Q8_0"),
    "IQ4_NL": ("IQ4_NL", "IQ4_NL", "Q8_0", "Q8_0"),
    "IQ4_XS": ("IQ4_XS", "Q4_K", "Q8_0", "Q8_0"),
}
# GGML types llama-quantize refuses to write without an importance matrix (tensor_requires_imatrix; token_embd
# and output are exempt there, and never get these types here)
IMATRIX_ONLY_TYPES = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type used when a row does not fill whole blocks
_FALLBACK = {**{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
             **{t: "Q4_0" for t in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def block_size(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]


def fallback_type(qtype: str, ncols: int) -> str:
    """The type llama.cpp writes for a tensor whose rows have `ncols` values when `qtype` is asked for."""
    if ncols % block_size(qtype) == 0:
        return qtype
    fb = _FALLBACK.get(qtype, qtype if block_size(qtype) <= 32 else None)
    if fb is None:
        raise BadInput(f"GGUF type {qtype}: llama.cpp defines no fallback for rows of {ncols} values")
    return fb if ncols % block_size(fb) == 0 else "F16"


ALWAYS_ACTIVE = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.ATTN_GATE, Role.MLP_GATE, Role.MLP_UP,
                 Role.MLP_DOWN, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN)
_GGUF_BLOCK_NAME = {  # role -> name inside `blk.N.` (from gguf-py's table)
    Role.ATTN_Q: gguf.MODEL_TENSOR.ATTN_Q, Role.ATTN_K: gguf.MODEL_TENSOR.ATTN_K,
    Role.ATTN_V: gguf.MODEL_TENSOR.ATTN_V, Role.ATTN_O: gguf.MODEL_TENSOR.ATTN_OUT,
    Role.ATTN_GATE: gguf.MODEL_TENSOR.ATTN_GATE, Role.MLP_GATE: gguf.MODEL_TENSOR.FFN_GATE,
    Role.MLP_UP: gguf.MODEL_TENSOR.FFN_UP, Role.MLP_DOWN: gguf.MODEL_TENSOR.FFN_DOWN,
    Role.SHARED_GATE: gguf.MODEL_TENSOR.FFN_GATE_SHEXP, Role.SHARED_UP: gguf.MODEL_TENSOR.FFN_UP_SHEXP,
    Role.SHARED_DOWN: gguf.MODEL_TENSOR.FFN_DOWN_SHEXP, Role.EXPERTS_GATE: gguf.MODEL_TENSOR.FFN_GATE_EXP,
    Role.EXPERTS_UP: gguf.MODEL_TENSOR.FFN_UP_EXP, Role.EXPERTS_DOWN: gguf.MODEL_TENSOR.FFN_DOWN_EXP,
}


def _block_pattern(role: Role) -> str:
    suffix = gguf.TENSOR_NAMES[_GGUF_BLOCK_NAME[role]].split(".", 2)[2]
    return rf"^blk\.\d+\.{re.escape(suffix)}\.weight$"


@dataclass(frozen=True)
class GGUFRecipe:
    qtype: str
    experts_gate_up: str
    experts_down: str
    always_active: str
    embeddings: str
    mtp: str
    mtp_layers: tuple[int, ...]
    n_embd: int = 0  # row length of token_embd / output (0: unknown, no fallback applied)
    imatrix: bool = False  # quantized with an importance matrix

    def role_types(self) -> dict[str, str]:
        """role label -> requested type (what stepq.json records as the recipe)."""
        out = {str(r): self.always_active for r in ALWAYS_ACTIVE}
        out.update({str(Role.EXPERTS_GATE): self.experts_gate_up, str(Role.EXPERTS_UP): self.experts_gate_up,
                    str(Role.EXPERTS_DOWN): self.experts_down, str(Role.EMBED): self.embeddings,
                    str(Role.LM_HEAD): self.embeddings})
        if self.mtp_layers:
            out["mtp.*"] = self.mtp
        out.update({str(Role.ROUTER): "F32", str(Role.ROUTER_BIAS): "F32", str(Role.NORM): "F32"})
        return out

    def tensor_type_overrides(self) -> list[tuple[str, str]]:
        """(regex, type) pairs in priority order, for `llama-quantize --tensor-type`."""
        pairs = []
        if self.mtp_layers:
            layers = "|".join(str(i) for i in self.mtp_layers)
            pairs.append((rf"^blk\.({layers})\.", self.mtp))
        pairs += [(_block_pattern(Role.EXPERTS_GATE), self.experts_gate_up),
                  (_block_pattern(Role.EXPERTS_UP), self.experts_gate_up),
                  (_block_pattern(Role.EXPERTS_DOWN), self.experts_down)]
        pairs += [(_block_pattern(r), self.always_active) for r in ALWAYS_ACTIVE]
        return pairs

    def embeddings_type(self) -> str:
        """The embeddings/output type after the row-size fallback: llama-quantize does not apply it to
        `--token-embedding-type` / `--output-tensor-type`, it would fail on such a row."""
        return fallback_type(self.embeddings, self.n_embd) if self.n_embd else self.embeddings

    def imatrix_only_types(self, mtp_only: bool = False) -> list[str]:
        """Types of this mix that llama-quantize writes only with an importance matrix (for a draft-only MTP
        file: of its tensors, the MTP blocks; embeddings/output are exempt in llama.cpp)."""
        used = [self.mtp] if mtp_only else [self.experts_gate_up, self.experts_down, self.always_active, self.mtp]
        return sorted({t for t in used if t in IMATRIX_ONLY_TYPES})

    def llama_quantize_args(self) -> list[str]:
        emb = self.embeddings_type().lower()
        args = ["--token-embedding-type", emb, "--output-tensor-type", emb]
        for pattern, qtype in self.tensor_type_overrides():
            args += ["--tensor-type", f"{pattern}={qtype.lower()}"]
        return args

    def intended_type(self, role: str, mtp: bool) -> str:
        """The type the recipe asks for a GGUF tensor of this role (F32 for what llama.cpp never quantizes)."""
        if mtp and self.mtp_layers and role not in (str(Role.ROUTER), str(Role.ROUTER_BIAS)) \
                and "norm" not in role:
            return self.mtp
        return self.role_types().get(role.removeprefix("mtp."), "F32")

    def to_dict(self) -> dict:
        return {"qtype": self.qtype, "tool": "ggml_quantize_chunk (llama.cpp's quantizer, in-process, one pass)",
                "imatrix": "stepq calibration statistics" if self.imatrix else None, "role_types": self.role_types(),
                "llama_quantize_args": self.llama_quantize_args()}


def supported_qtypes() -> list[str]:
    return [*DIRECT_TYPES, *_MIXES]


def recipe_for(qtype: str, mtp_layers: tuple[int, ...] = (), imatrix: bool = False, n_embd: int = 0,
               mtp_only: bool = False) -> GGUFRecipe:
    """The recipe of `qtype`. Raises BadInput for an unknown type, or an imatrix-only one without `imatrix`."""
    key = qtype.upper()
    if key not in _MIXES:
        raise BadInput(f"--qtype {qtype}: unknown (supported: {', '.join(supported_qtypes())})")
    gate_up, down, active, mtp = _MIXES[key]
    recipe = GGUFRecipe(key, gate_up, down, active, active, mtp, tuple(mtp_layers), n_embd, imatrix)
    if not imatrix and recipe.imatrix_only_types(mtp_only):
        raise BadInput(f"{key} needs an importance matrix: pass --imatrix (calibrates first)")
    return recipe

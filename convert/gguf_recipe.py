"""MoE-aware GGUF quantization recipes: which GGML type each role gets, for each `QTYPE`.

Types gguf-py writes itself (BF16, F16, Q8_0) come straight from the checkpoint. K- and IQ-quants are made by
`llama-quantize` from a BF16 GGUF: the recipe becomes its `--tensor-type REGEX=TYPE` overrides (first match
wins, so MTP blocks come first), `--token-embedding-type` and `--output-tensor-type`.

Policy (community practice for large MoEs, e.g. AesSedai's Step-3.5 mixes "Q8_0 / Q4_K / Q4_K / Q5_K"): the
routed experts hold ~96% of Step-3.5's weights but each token uses 8 of 288, so they take the low-bit type, with
`ffn_down_exps` one step above gate/up; every always-active tensor (attention incl. the head-wise gate, shared
expert, dense MLP, embeddings, output) and the whole MTP head stay at Q8_0 (Q6_K for the sub-4-bit mixes). The
router (`ffn_gate_inp`), its selection bias and all norms are never quantized by llama.cpp (F32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from convert.arch.step35 import Role
from convert.errors import BadInput

DIRECT_TYPES = ("BF16", "F16", "Q8_0")  # written by gguf-py, byte-identical to llama.cpp

# QTYPE -> (routed gate/up, routed down, always-active + embeddings/output, MTP head)
_MIXES: dict[str, tuple[str, str, str, str]] = {
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
# types llama-quantize refuses without an importance matrix (stepq statistics do not feed one yet)
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S")

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

    def llama_quantize_args(self) -> list[str]:
        args = ["--token-embedding-type", self.embeddings.lower(), "--output-tensor-type", self.embeddings.lower()]
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
        return {"qtype": self.qtype, "tool": "llama-quantize", "imatrix": None, "role_types": self.role_types(),
                "llama_quantize_args": self.llama_quantize_args()}


def supported_qtypes() -> list[str]:
    return [*DIRECT_TYPES, *_MIXES]


def recipe_for(qtype: str, mtp_layers: tuple[int, ...] = ()) -> GGUFRecipe:
    key = qtype.upper()
    if key in NEEDS_IMATRIX:
        raise BadInput(f"--qtype {qtype}: needs an importance matrix, which stepq does not produce yet "
                       f"(supported: {', '.join(supported_qtypes())})")
    if key not in _MIXES:
        raise BadInput(f"--qtype {qtype}: unknown (supported: {', '.join(supported_qtypes())})")
    gate_up, down, active, mtp = _MIXES[key]
    return GGUFRecipe(key, gate_up, down, active, active, mtp, tuple(mtp_layers))

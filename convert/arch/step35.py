"""Step-3.5 role table: every checkpoint tensor name maps to a role; an unmapped name is an error.

Recipes and writers speak in roles, never in substrings of names. MTP layers (indices >= num_hidden_layers)
carry the same block roles flagged `mtp=True`, plus their own `mtp_*` roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from convert.config import Step35Config
from convert.errors import BadInput


class Role(StrEnum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    NORM = "norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_GATE = "attn_gate"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    EXPERTS_GATE = "experts_gate"
    EXPERTS_UP = "experts_up"
    EXPERTS_DOWN = "experts_down"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    MTP_EH_PROJ = "mtp_eh_proj"
    MTP_ENORM = "mtp_enorm"
    MTP_HNORM = "mtp_hnorm"
    MTP_HEAD_NORM = "mtp_head_norm"
    MTP_HEAD = "mtp_head"


EXPERT_ROLES = frozenset({Role.EXPERTS_GATE, Role.EXPERTS_UP, Role.EXPERTS_DOWN})
LINEAR_ROLES = frozenset({
    Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.ATTN_GATE, Role.MLP_GATE, Role.MLP_UP,
    Role.MLP_DOWN, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN, Role.MTP_EH_PROJ, Role.MTP_HEAD, Role.ROUTER,
    *EXPERT_ROLES,
})

GLOBAL_TENSORS = {
    "model.embed_tokens.weight": Role.EMBED,
    "model.norm.weight": Role.NORM,
    "lm_head.weight": Role.LM_HEAD,
}

# suffix under `model.layers.{i}.` -> (role, which layers carry it: "all" | "dense" | "moe" | "mtp")
LAYER_TENSORS = {
    "input_layernorm.weight": (Role.NORM, "all"),
    "post_attention_layernorm.weight": (Role.NORM, "all"),
    "self_attn.q_proj.weight": (Role.ATTN_Q, "all"),
    "self_attn.k_proj.weight": (Role.ATTN_K, "all"),
    "self_attn.v_proj.weight": (Role.ATTN_V, "all"),
    "self_attn.o_proj.weight": (Role.ATTN_O, "all"),
    "self_attn.g_proj.weight": (Role.ATTN_GATE, "all"),
    "self_attn.q_norm.weight": (Role.NORM, "all"),
    "self_attn.k_norm.weight": (Role.NORM, "all"),
    "mlp.gate_proj.weight": (Role.MLP_GATE, "dense"),
    "mlp.up_proj.weight": (Role.MLP_UP, "dense"),
    "mlp.down_proj.weight": (Role.MLP_DOWN, "dense"),
    "moe.gate.weight": (Role.ROUTER, "moe"),
    "moe.router_bias": (Role.ROUTER_BIAS, "moe"),
    "moe.gate_proj.weight": (Role.EXPERTS_GATE, "moe"),
    "moe.up_proj.weight": (Role.EXPERTS_UP, "moe"),
    "moe.down_proj.weight": (Role.EXPERTS_DOWN, "moe"),
    "share_expert.gate_proj.weight": (Role.SHARED_GATE, "moe"),
    "share_expert.up_proj.weight": (Role.SHARED_UP, "moe"),
    "share_expert.down_proj.weight": (Role.SHARED_DOWN, "moe"),
    "eh_proj.weight": (Role.MTP_EH_PROJ, "mtp"),
    "enorm.weight": (Role.MTP_ENORM, "mtp"),
    "hnorm.weight": (Role.MTP_HNORM, "mtp"),
    "transformer.shared_head.norm.weight": (Role.MTP_HEAD_NORM, "mtp"),
    "transformer.shared_head.output.weight": (Role.MTP_HEAD, "mtp"),
}

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: Role
    layer: int | None = None
    mtp: bool = False

    @property
    def label(self) -> str:
        """Role as shown to users and recipes: MTP block tensors read `mtp.<role>`."""
        return f"mtp.{self.role}" if self.mtp and not self.role.startswith("mtp_") else str(self.role)

    @property
    def module(self) -> str:
        """The module path (the name without `.weight`), as engines' ignore lists name it."""
        return self.name.removesuffix(".weight")


@dataclass(frozen=True)
class TensorSpec:
    """What the config says a tensor must look like."""

    info: TensorInfo
    shape: tuple[int, ...]
    dtype: str


def classify(name: str, cfg: Step35Config) -> TensorInfo:
    """Role of a checkpoint tensor; BadInput naming the tensor when the table has no entry for it."""
    if name in GLOBAL_TENSORS:
        return TensorInfo(name, GLOBAL_TENSORS[name])
    m = _LAYER_NAME.match(name)
    if m and m.group(2) in LAYER_TENSORS:
        layer = int(m.group(1))
        role, where = LAYER_TENSORS[m.group(2)]
        if layer < cfg.num_layers and _layer_has(cfg, layer, where):
            return TensorInfo(name, role, layer, cfg.is_mtp(layer))
        raise BadInput(f"tensor {name}: not expected in layer {layer} of this config "
                       f"({_layer_kind(cfg, layer)} layer)")
    raise BadInput(f"tensor {name}: unknown to the step3p5 role table")


def _layer_kind(cfg: Step35Config, layer: int) -> str:
    if layer >= cfg.num_layers:
        return "out-of-range"
    return "mtp" if cfg.is_mtp(layer) else "moe" if cfg.is_moe(layer) else "dense"


def _layer_has(cfg: Step35Config, layer: int, where: str) -> bool:
    kind = _layer_kind(cfg, layer)
    return where == "all" or where == kind or (where == "dense" and kind == "mtp")


def _shape(cfg: Step35Config, layer: int | None, suffix: str, role: Role) -> tuple[int, ...]:
    H, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    E, Ie, Is, I = cfg.num_experts, cfg.moe_intermediate_size, cfg.share_expert_dim, cfg.intermediate_size
    nh = cfg.num_heads(layer) if layer is not None else 0
    kv = cfg.num_kv_heads
    if role in (Role.NORM, Role.MTP_ENORM, Role.MTP_HNORM, Role.MTP_HEAD_NORM):
        return (hd,) if suffix.startswith("self_attn.") else (H,)
    return {
        Role.EMBED: (V, H), Role.LM_HEAD: (V, H), Role.MTP_HEAD: (V, H),
        Role.ATTN_Q: (nh * hd, H), Role.ATTN_K: (kv * hd, H), Role.ATTN_V: (kv * hd, H),
        Role.ATTN_O: (H, nh * hd), Role.ATTN_GATE: (nh, H),
        Role.MLP_GATE: (I, H), Role.MLP_UP: (I, H), Role.MLP_DOWN: (H, I),
        Role.ROUTER: (E, H), Role.ROUTER_BIAS: (E,),
        Role.EXPERTS_GATE: (E, Ie, H), Role.EXPERTS_UP: (E, Ie, H), Role.EXPERTS_DOWN: (E, H, Ie),
        Role.SHARED_GATE: (Is, H), Role.SHARED_UP: (Is, H), Role.SHARED_DOWN: (H, Is),
        Role.MTP_EH_PROJ: (H, 2 * H),
    }[role]


def expected_tensors(cfg: Step35Config) -> list[TensorSpec]:
    """Every tensor the config implies, trunk then MTP, with shapes and the checkpoint's dtypes."""
    specs = []
    for name, role in GLOBAL_TENSORS.items():
        specs.append(TensorSpec(TensorInfo(name, role), _shape(cfg, None, name, role), "BF16"))
    for layer in range(cfg.num_layers):
        for suffix, (role, where) in LAYER_TENSORS.items():
            if _layer_has(cfg, layer, where):
                info = TensorInfo(f"model.layers.{layer}.{suffix}", role, layer, cfg.is_mtp(layer))
                dtype = "F32" if role is Role.ROUTER_BIAS else "BF16"
                specs.append(TensorSpec(info, _shape(cfg, layer, suffix, role), dtype))
    return specs

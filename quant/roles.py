"""The role vocabulary: what a tensor does in the model, whatever a checkpoint or an engine calls it.

Recipes are written in roles and validated here, and `quant` imports nothing of ours, so the vocabulary lives at the
bottom of the arrows; each architecture's table (`convert/arch/`) maps its tensor names to these roles and the roles
to every format's names.
"""

from __future__ import annotations

from enum import StrEnum


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
    # Step-3.7's vision tower and the projector into the text stack: kept BF16 in every format (as StepFun's own
    # FP8 and NVFP4 releases do); GGUF writes them to the separate mmproj file.
    VISION_LINEAR = "vision_linear"
    VISION = "vision"
    VISION_PROJECTOR = "vision_projector"


EXPERT_ROLES = frozenset({Role.EXPERTS_GATE, Role.EXPERTS_UP, Role.EXPERTS_DOWN})
LINEAR_ROLES = frozenset({
    Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.ATTN_GATE, Role.MLP_GATE, Role.MLP_UP,
    Role.MLP_DOWN, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN, Role.MTP_EH_PROJ, Role.MTP_HEAD, Role.ROUTER,
    *EXPERT_ROLES,
})
# The MTP layers' own tensors (beside their decoder block, which carries the trunk's roles).
MTP_OWN_ROLES = frozenset({Role.MTP_EH_PROJ, Role.MTP_ENORM, Role.MTP_HNORM, Role.MTP_HEAD_NORM, Role.MTP_HEAD})

VISION_ROLES = frozenset({Role.VISION_LINEAR, Role.VISION, Role.VISION_PROJECTOR})
# Linear modules of the vision side: not quantized, but the engines' ignore lists must name them.
VISION_MODULE_ROLES = frozenset({Role.VISION_LINEAR, Role.VISION_PROJECTOR})

# Roles an engine fuses into one parameter: they must be quantized together and, where the format has a
# per-tensor global scale, share it (vLLM keeps one scale per fused parameter, e.g. only w1's for MoE w13).
FUSED_GROUPS: tuple[tuple[Role, ...], ...] = (
    (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V),
    (Role.MLP_GATE, Role.MLP_UP),
    (Role.SHARED_GATE, Role.SHARED_UP),
    (Role.EXPERTS_GATE, Role.EXPERTS_UP),
)

# Roles an engine runs in one module, which takes one quantization scheme: the fused groups, and a layer's routed
# experts (vLLM's FusedMoE holds gate, up and down and refuses mixed schemes; its ignore rules name the whole module).
# Recipes keep or quantize each group whole.
SCHEME_GROUPS: tuple[tuple[Role, ...], ...] = FUSED_GROUPS + ((Role.EXPERTS_GATE, Role.EXPERTS_UP, Role.EXPERTS_DOWN),)


def fused_group(role: str) -> tuple[str, ...]:
    """The roles fused with `role` (itself alone when it is not fused), in the engines' order."""
    for group in FUSED_GROUPS:
        if role in group:
            return group
    return (role,)

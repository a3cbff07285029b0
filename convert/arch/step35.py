"""Step-3.5 role table: every checkpoint tensor name maps to a role, and each role to the names transformers' Step3p7
modules and vLLM's Step-3.5 models give it; an unmapped name is an error. GGUF names are keyed on the same roles in
convert/gguf_names.py.

Recipes and writers speak in roles, never in substrings of names. MTP layers (indices >= num_hidden_layers)
carry the same block roles flagged `mtp=True`, plus their own `mtp_*` roles; what each format does with them is
decided in quant/mtp.py, what they are called is in this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from convert.arch import step37_vision as vision
from convert.config import Step35Config
from convert.errors import BadInput
from quant.roles import EXPERT_ROLES, VISION_ROLES, Role


@dataclass(frozen=True)
class Names:
    """One row: a tensor's role, the layers that carry it, and its names outside the checkpoint.

    `transformers`: the Step3p7 parameter holding it (None: the checkpoint's own name); the expert gate and up
    stacks are the two halves, in that order, of one fused parameter. `vllm`: the module vLLM runs it in when that
    is not the checkpoint's module (a fused module, or the MTP drafter's rename), as vLLM's ignore matching sees it:
    before the trunk's own mapper moves `share_expert` under `moe.`."""

    role: Role
    layers: str = "global"  # "global" | "all" | "dense" | "moe" | "mtp" (the MTP layers' own tensors)
    transformers: str | None = None
    vllm: str | None = None


GLOBAL_TENSORS = {
    "model.embed_tokens.weight": Names(Role.EMBED),
    "model.norm.weight": Names(Role.NORM),
    "lm_head.weight": Names(Role.LM_HEAD),
}

# suffix under `model.layers.{i}.`; MTP layers carry the "all" and "dense" rows as their decoder block
LAYER_TENSORS = {
    "input_layernorm.weight": Names(Role.NORM, "all"),
    "post_attention_layernorm.weight": Names(Role.NORM, "all"),
    "self_attn.q_proj.weight": Names(Role.ATTN_Q, "all", vllm="self_attn.qkv_proj"),
    "self_attn.k_proj.weight": Names(Role.ATTN_K, "all", vllm="self_attn.qkv_proj"),
    "self_attn.v_proj.weight": Names(Role.ATTN_V, "all", vllm="self_attn.qkv_proj"),
    "self_attn.o_proj.weight": Names(Role.ATTN_O, "all"),
    "self_attn.g_proj.weight": Names(Role.ATTN_GATE, "all"),
    "self_attn.q_norm.weight": Names(Role.NORM, "all"),
    "self_attn.k_norm.weight": Names(Role.NORM, "all"),
    "mlp.gate_proj.weight": Names(Role.MLP_GATE, "dense", vllm="mlp.gate_up_proj"),
    "mlp.up_proj.weight": Names(Role.MLP_UP, "dense", vllm="mlp.gate_up_proj"),
    "mlp.down_proj.weight": Names(Role.MLP_DOWN, "dense"),
    "moe.gate.weight": Names(Role.ROUTER, "moe", "mlp.gate.weight"),
    "moe.router_bias": Names(Role.ROUTER_BIAS, "moe", "mlp.gate.e_score_correction_bias"),
    # vLLM runs a layer's expert stacks as one FusedMoE `moe.experts`: its names are in `vllm_names`, not here.
    "moe.gate_proj.weight": Names(Role.EXPERTS_GATE, "moe", "mlp.experts.gate_up_proj"),
    "moe.up_proj.weight": Names(Role.EXPERTS_UP, "moe", "mlp.experts.gate_up_proj"),
    "moe.down_proj.weight": Names(Role.EXPERTS_DOWN, "moe", "mlp.experts.down_proj"),
    "share_expert.gate_proj.weight": Names(Role.SHARED_GATE, "moe", "mlp.shared_experts.gate_proj.weight",
                                           "share_expert.gate_up_proj"),
    "share_expert.up_proj.weight": Names(Role.SHARED_UP, "moe", "mlp.shared_experts.up_proj.weight",
                                         "share_expert.gate_up_proj"),
    "share_expert.down_proj.weight": Names(Role.SHARED_DOWN, "moe", "mlp.shared_experts.down_proj.weight"),
    "eh_proj.weight": Names(Role.MTP_EH_PROJ, "mtp"),
    "enorm.weight": Names(Role.MTP_ENORM, "mtp"),
    "hnorm.weight": Names(Role.MTP_HNORM, "mtp"),
    "transformer.shared_head.norm.weight": Names(Role.MTP_HEAD_NORM, "mtp", vllm="shared_head.norm"),
    "transformer.shared_head.output.weight": Names(Role.MTP_HEAD, "mtp", vllm="shared_head.head"),
}

# Where an MTP layer's decoder block sits, in vLLM's drafter (`step3p5_mtp`) and in our transformers reference alike.
MTP_BLOCK = "mtp_block"
# The reference model's MTP layers: `mtp.<depth - 1>.` (transformers itself never builds them).
_TRANSFORMERS_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
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
    if name.startswith(vision.PREFIXES):
        return TensorInfo(name, vision.classify(name, cfg.vision, cfg.hidden_size))
    if name in GLOBAL_TENSORS:
        return TensorInfo(name, GLOBAL_TENSORS[name].role)
    m = _LAYER_NAME.match(name)
    if m and m.group(2) in LAYER_TENSORS:
        layer = int(m.group(1))
        row = LAYER_TENSORS[m.group(2)]
        if layer < cfg.num_layers and _layer_has(cfg, layer, row.layers):
            return TensorInfo(name, row.role, layer, cfg.is_mtp(layer))
        raise BadInput(f"tensor {name}: not expected in layer {layer} of this config "
                       f"({_layer_kind(cfg, layer)} layer)")
    if name.startswith(("model.language_model.", "model.vision_model.", "model.vit_large_projector.")):
        raise BadInput(f"tensor {name}: transformers' re-saved layout; stepq reads the layout StepFun publishes "
                       f"(model.layers.*, vision_model.*, vit_large_projector.*)")
    raise BadInput(f"tensor {name}: unknown to the step3p5 role table")


# ---- names in other formats ---------------------------------------------------------------------------------------
def _split(name: str) -> tuple[int, str]:
    m = _LAYER_NAME.match(name)
    if m is None or m.group(2) not in LAYER_TENSORS:
        raise ValueError(f"tensor {name}: unknown to the step3p5 role table")
    return int(m.group(1)), m.group(2)


def transformers_name(name: str, num_trunk_layers: int) -> tuple[str, int | None]:
    """Checkpoint tensor -> (its transformers Step3p7 parameter, which part of a fused parameter it is, or None).

    Trunk layers as transformers' own conversion mapping for step3p7 names them; MTP layer n is the reference's
    `mtp.<n - num_trunk_layers>.`, its decoder block under `mtp_block.` as in vLLM's drafter."""
    if name in GLOBAL_TENSORS:
        return name, None
    layer, suffix = _split(name)
    row = LAYER_TENSORS[suffix]
    hf = row.transformers or suffix
    parts = _FUSED_PARTS.get(hf)
    part = parts.index(suffix) if parts else None
    if layer < num_trunk_layers:
        return f"model.layers.{layer}.{hf}", part
    inner = hf if row.layers == "mtp" else f"{MTP_BLOCK}.{hf}"
    return f"mtp.{layer - num_trunk_layers}.{inner}", part


def checkpoint_names(transformers: str, num_trunk_layers: int) -> list[str]:
    """Inverse of `transformers_name`: the checkpoint tensors a transformers parameter holds, in part order (gate
    then up for the fused expert stack)."""
    if transformers in GLOBAL_TENSORS:
        return [transformers]
    suffixes = None
    if m := _TRANSFORMERS_MTP.match(transformers):
        head, inner = f"model.layers.{num_trunk_layers + int(m[1])}", m[2]
        block = inner.removeprefix(f"{MTP_BLOCK}.")
        suffixes = _BLOCK_FROM_TRANSFORMERS.get(block) if block != inner else _MTP_OWN_FROM_TRANSFORMERS.get(inner)
    elif m := _LAYER_NAME.match(transformers):
        head, suffixes = f"model.layers.{m[1]}", _BLOCK_FROM_TRANSFORMERS.get(m[2])
    if not suffixes:
        raise ValueError(f"parameter {transformers}: not the Step3p7 name of a step3p5 checkpoint tensor")
    return [f"{head}.{s}" for s in suffixes]


def vllm_names(info: TensorInfo) -> list[str]:
    """The module names vLLM may give a checkpoint module at run time, as its ignore lists must name them: its own,
    the fused module it is loaded into, and inside the MTP drafter both again under `mtp_block.` (block tensors) or
    the drafter's rename (own tensors). The last one is the module vLLM runs it in.

    A routed-expert stack runs in the layer's FusedMoE `moe.experts`, which takes one scheme for gate, up and down:
    the `fp8` and ModelOpt configs skip it by that name, compressed-tensors by its per-expert linears
    (`moe.experts.<e>.<proj>`, vLLM checks expert 0's), which one `re:` pattern per stack covers (inert in the
    exact-match `fp8` list)."""
    if info.role in VISION_ROLES:
        return vision.vllm_names(info.name)
    if info.layer is None:
        return [info.module]
    layer, suffix = _split(info.name)
    row = LAYER_TENSORS[suffix]
    head, own = f"model.layers.{layer}", suffix.removesuffix(".weight")
    if info.role in EXPERT_ROLES:
        proj = own.rsplit(".", 1)[1]
        return [info.module, rf"re:^{re.escape(head)}\.moe\.experts\.\d+\.{proj}$", f"{head}.moe.experts"]
    names = [info.module, f"{head}.{row.vllm or own}"]
    if info.mtp and row.layers != "mtp":
        names += [f"{head}.{MTP_BLOCK}.{own}", f"{head}.{MTP_BLOCK}.{row.vllm or own}"]
    return list(dict.fromkeys(names))


def _from_transformers(own: bool) -> dict[str, tuple[str, ...]]:
    """transformers parameter suffix -> the checkpoint suffixes it holds, for the block rows or the MTP own rows."""
    out: dict[str, list[str]] = {}
    for suffix, row in LAYER_TENSORS.items():
        if (row.layers == "mtp") == own:
            out.setdefault(row.transformers or suffix, []).append(suffix)
    return {hf: tuple(s) for hf, s in out.items()}


_BLOCK_FROM_TRANSFORMERS = _from_transformers(own=False)
_MTP_OWN_FROM_TRANSFORMERS = _from_transformers(own=True)
# `mlp.experts.gate_up_proj` -> (gate, up): parameters holding several checkpoint tensors, concatenated on dim 1
_FUSED_PARTS = {hf: s for hf, s in _BLOCK_FROM_TRANSFORMERS.items() if len(s) > 1}


# ---- the tensors a config implies ---------------------------------------------------------------------------------
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
    """Every tensor the config implies, trunk then MTP (then Step-3.7's vision side), with shapes and the
    checkpoint's dtypes."""
    specs = []
    for name, row in GLOBAL_TENSORS.items():
        specs.append(TensorSpec(TensorInfo(name, row.role), _shape(cfg, None, name, row.role), "BF16"))
    for layer in range(cfg.num_layers):
        for suffix, row in LAYER_TENSORS.items():
            if _layer_has(cfg, layer, row.layers):
                info = TensorInfo(f"model.layers.{layer}.{suffix}", row.role, layer, cfg.is_mtp(layer))
                dtype = "F32" if row.role is Role.ROUTER_BIAS else "BF16"
                specs.append(TensorSpec(info, _shape(cfg, layer, suffix, row.role), dtype))
    if cfg.vision is not None:
        for name, (role, shape) in vision.expected(cfg.vision, cfg.hidden_size).items():
            specs.append(TensorSpec(TensorInfo(name, role), shape, "BF16"))
    return specs

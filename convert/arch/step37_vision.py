"""Step-3.7 vision role table: the Perception Encoder tower (`vision_model.*`) and the projector into the text stack
(`vit_large_projector.*`), with the shapes `vision_config` implies and the module names vLLM runs them under.

Names as StepFun's checkpoint spells them, which transformers' conversion mapping (`step3p7`, `step3p5_vision`),
vLLM's `Step3p7ForConditionalGeneration` mapper and llama.cpp's `conversion/step3.py` all read. Every tensor maps
or is an error; nothing here is quantized (quant/recipe.py protects the vision roles).
"""

from __future__ import annotations

import re

from convert.config import VisionConfig
from convert.errors import BadInput
from quant.roles import Role

TOWER = "vision_model."
PROJECTOR = "vit_large_projector."
PREFIXES = (TOWER, PROJECTOR)

# suffix under `vision_model.transformer.resblocks.{i}.` -> (role, shape from (width, intermediate))
_BLOCK = {
    "ln_1.weight": (Role.VISION, "W"), "ln_1.bias": (Role.VISION, "W"),
    "attn.in_proj_weight": (Role.VISION_LINEAR, "3W,W"), "attn.in_proj_bias": (Role.VISION, "3W"),
    "attn.out_proj.weight": (Role.VISION_LINEAR, "W,W"), "attn.out_proj.bias": (Role.VISION, "W"),
    "ls_1.gamma": (Role.VISION, "W"),
    "ln_2.weight": (Role.VISION, "W"), "ln_2.bias": (Role.VISION, "W"),
    "mlp.c_fc.weight": (Role.VISION_LINEAR, "I,W"), "mlp.c_fc.bias": (Role.VISION, "I"),
    "mlp.c_proj.weight": (Role.VISION_LINEAR, "W,I"), "mlp.c_proj.bias": (Role.VISION, "W"),
    "ls_2.gamma": (Role.VISION, "W"),
}
# What vLLM calls a block's linear modules once its mapper has run (`in_proj` -> `qkv_proj`, `c_fc` -> `fc1`, ...);
# an ignore list names both spellings, and the q/k/v shards vLLM checks for a fused QKV module.
_VLLM_BLOCK = {
    "attn.in_proj_weight": ("attn.in_proj", "attn.qkv_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "attn.out_proj.weight": ("attn.out_proj",),
    "mlp.c_fc.weight": ("mlp.c_fc", "mlp.fc1"),
    "mlp.c_proj.weight": ("mlp.c_proj", "mlp.fc2"),
}
_BLOCK_NAME = re.compile(r"^vision_model\.transformer\.resblocks\.(\d+)\.(.+)$")


def _dims(spec: str, v: VisionConfig) -> tuple[int, ...]:
    sizes = {"W": v.width, "3W": 3 * v.width, "I": v.intermediate}
    return tuple(sizes[d] for d in spec.split(","))


def expected(v: VisionConfig, text_hidden: int) -> dict[str, tuple[Role, tuple[int, ...]]]:
    """Every vision and projector tensor the config implies: name -> (role, shape)."""
    W, P = v.width, v.patch_size
    out = {
        f"{TOWER}conv1.weight": (Role.VISION, (W, 3, P, P)),
        f"{TOWER}positional_embedding": (Role.VISION, (int(v.use_cls_token) + v.grid * v.grid, W)),
    }
    if v.use_cls_token:
        out[f"{TOWER}class_embedding"] = (Role.VISION, (W,))
    for norm, present in (("ln_pre", v.use_ln_pre), ("ln_post", v.use_ln_post)):
        if present:
            out |= {f"{TOWER}{norm}.weight": (Role.VISION, (W,)), f"{TOWER}{norm}.bias": (Role.VISION, (W,))}
    for i in range(v.layers):
        for suffix, (role, spec) in _BLOCK.items():
            out[f"{TOWER}transformer.resblocks.{i}.{suffix}"] = (role, _dims(spec, v))
    out |= {
        f"{TOWER}vit_downsampler1.weight": (Role.VISION, (2 * W, W, 3, 3)),
        f"{TOWER}vit_downsampler1.bias": (Role.VISION, (2 * W,)),
        f"{TOWER}vit_downsampler2.weight": (Role.VISION, (4 * W, 2 * W, 3, 3)),
        f"{TOWER}vit_downsampler2.bias": (Role.VISION, (4 * W,)),
        f"{PROJECTOR}weight": (Role.VISION_PROJECTOR, (text_hidden, 4 * W)),
    }
    if v.projector_bias:
        out[f"{PROJECTOR}bias"] = (Role.VISION, (text_hidden,))
    return out


def classify(name: str, v: VisionConfig | None, text_hidden: int) -> Role:
    """Role of a vision-side tensor; BadInput naming it when the config implies no such tensor."""
    if v is None:
        raise BadInput(f"tensor {name}: a vision tensor, but config.json is a text-only model (model_type step3p5)")
    table = expected(v, text_hidden)
    if name in table:
        return table[name][0]
    m = _BLOCK_NAME.match(name)
    if m and m.group(2) in _BLOCK:
        raise BadInput(f"tensor {name}: vision block {m.group(1)} is past vision_config's {v.layers} layers")
    raise BadInput(f"tensor {name}: unknown to the step3p7 vision role table")


def vllm_names(name: str) -> list[str]:
    """Module names an ignore list must carry for a vision-side linear weight: the checkpoint's module and what
    vLLM's `Step3p7ForConditionalGeneration` runs it as."""
    if name == f"{PROJECTOR}weight":
        return ["vit_large_projector"]
    m = _BLOCK_NAME.match(name)
    if m is None or m.group(2) not in _VLLM_BLOCK:
        raise ValueError(f"tensor {name}: not a vision linear weight")
    head = f"{TOWER}transformer.resblocks.{m.group(1)}."
    return [head + own for own in _VLLM_BLOCK[m.group(2)]]

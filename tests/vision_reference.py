"""The vision tower + projector as vLLM 0.33 computes them, in plain torch: the reference stepq's tower (calib.images)
and llama.cpp's mmproj are measured against. Loaded by path through the `vision_reference` fixture (importlib test
mode)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def perception_encoder(model_dir: Path, pixels: torch.Tensor) -> torch.Tensor:
    """[tokens, H] image features as vLLM 0.33 computes them (`step_vl.py` PerceptionEncoder, "a copy from
    perception_models pe.py", + Step3p7's `vit_large_projector`), in plain float32 torch over the checkpoint's
    tensors: the reference for both llama.cpp and transformers. Its 2-D RoPE: per head, the first half of the dims
    (interleaved pairs) rotates with the column index, the second with the row (`torch.cat([freqs_w, freqs_h])`)."""
    import torch.nn.functional as F
    from safetensors import safe_open

    vc = json.loads((model_dir / "config.json").read_text())["vision_config"]
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    files = {s: safe_open(model_dir / s, "pt") for s in set(weight_map.values())}

    def t(name: str) -> torch.Tensor:
        return files[weight_map[name]].get_tensor(name).float()

    width, heads, patch = vc["width"], vc["heads"], vc["patch_size"]
    hd = width // heads
    gh, gw = pixels.shape[2] // patch, pixels.shape[3] // patch
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd // 2, 2)[: hd // 4].float() / (hd // 2)))
    fh = (torch.arange(gh).float()[:, None] * inv).repeat_interleave(2, -1)[:, None].expand(gh, gw, -1)
    fw = (torch.arange(gw).float()[:, None] * inv).repeat_interleave(2, -1)[None, :].expand(gh, gw, -1)
    freqs = torch.cat([fw, fh], -1).reshape(gh * gw, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        return x * freqs.cos() + rotated * freqs.sin()

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), t(p + ".weight"), t(p + ".bias"), vc["layer_norm_eps"])

    x = F.conv2d(pixels.float(), t("vision_model.conv1.weight"), stride=patch).flatten(2).transpose(1, 2)
    pos = t("vision_model.positional_embedding")
    side = int(pos.shape[0] ** 0.5)
    if (gh, gw) != (side, side):  # a 504 px local patch: vLLM's sample_abs_posemb, bilinear, align_corners=False
        grid = pos.reshape(1, side, side, width).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(gh * gw, width)
    x = ln(x + pos, "vision_model.ln_pre")
    for i in range(vc["layers"]):
        p = f"vision_model.transformer.resblocks.{i}."
        q, k, v = (F.linear(ln(x, p + "ln_1"), t(p + "attn.in_proj_weight"), t(p + "attn.in_proj_bias"))
                   .view(1, -1, 3 * heads, hd).transpose(1, 2).chunk(3, dim=1))
        a = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).reshape(1, -1, width)
        x = x + F.linear(a, t(p + "attn.out_proj.weight"), t(p + "attn.out_proj.bias")) * t(p + "ls_1.gamma")
        y = F.linear(ln(x, p + "ln_2"), t(p + "mlp.c_fc.weight"), t(p + "mlp.c_fc.bias"))
        y = F.linear(y * torch.sigmoid(1.702 * y), t(p + "mlp.c_proj.weight"), t(p + "mlp.c_proj.bias"))  # quick_gelu
        x = x + y * t(p + "ls_2.gamma")
    x = x.transpose(1, 2).reshape(1, width, gh, gw)
    for i in (1, 2):
        x = F.conv2d(x, t(f"vision_model.vit_downsampler{i}.weight"), t(f"vision_model.vit_downsampler{i}.bias"),
                     stride=2, padding=1)
    return F.linear(x.flatten(2).transpose(1, 2), t("vit_large_projector.weight"))[0]

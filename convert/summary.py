"""What a checkpoint holds, by role, without reading any weights (`stepq inspect`)."""

from __future__ import annotations

from collections import defaultdict

from convert.checkpoint import Checkpoint


def summarize(ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    roles: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "dtypes": set()})
    for t in ckpt:
        r = roles[t.info.label]
        r["tensors"] += 1
        r["params"] += t.entry.nbytes // max(1, _itemsize(t.entry.dtype))
        r["bytes"] += t.entry.nbytes
        r["dtypes"].add(t.entry.dtype)
    trunk = range(cfg.num_trunk_layers)
    vision = None
    if (v := cfg.vision) is not None:
        vision = {"width": v.width, "layers": v.layers, "heads": v.heads, "mlp": v.intermediate,
                  "image_size": v.image_size, "patch_size": v.patch_size,
                  "tokens_per_view": (v.grid // 4) ** 2, "projector": [4 * v.width, cfg.hidden_size],
                  "image_token_id": v.image_token_id,
                  "params": sum(r["params"] for k, r in roles.items() if k.startswith("vision"))}
    return {
        "model_type": cfg.model_type,
        "path": str(ckpt.dir),
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "bytes": sum(t.entry.nbytes for t in ckpt.tensors.values()),
        "layout": {
            "trunk_layers": cfg.num_trunk_layers,
            "dense_layers": [i for i in trunk if not cfg.is_moe(i)],
            "moe_layers": sorted(cfg.moe_layers),
            "mtp_layers": list(cfg.mtp_layers),
            "full_attention_layers": [i for i in range(cfg.num_layers) if cfg.layer_types[i] == "full_attention"],
            "experts": cfg.num_experts, "top_k": cfg.top_k,
        },
        "vision": vision,
        "roles": {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in sorted(roles.items())},
    }


def _itemsize(dtype: str) -> int:
    from convert.safetensors_io import itemsize

    return itemsize(dtype)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def render(s: dict) -> str:
    lay = s["layout"]
    lines = [
        f"{s['path']}: {s['model_type']}, {s['tensors']} tensors in {s['shards']} shard(s), {_human(s['bytes'])}",
        f"layers: {lay['trunk_layers']} trunk (dense {lay['dense_layers']}, MoE {len(lay['moe_layers'])} layers, "
        f"{lay['experts']} experts top-{lay['top_k']}), MTP {lay['mtp_layers']}, "
        f"full attention {lay['full_attention_layers']}",
    ]
    if (v := s.get("vision")) is not None:
        lines.append(f"vision: {v['layers']} layers, width {v['width']}, {v['heads']} heads, MLP {v['mlp']}, "
                     f"{v['image_size']}px / {v['patch_size']}px patches -> {v['tokens_per_view']} tokens per view, "
                     f"projector {v['projector'][0]} -> {v['projector'][1]}, image token {v['image_token_id']}, "
                     f"{v['params']:,} params (kept BF16 in every format)")
    lines += [
        f"{'role':<18} {'tensors':>7} {'params':>14} {'bytes':>10}  dtypes",
    ]
    for role, r in s["roles"].items():
        lines.append(f"{role:<18} {r['tensors']:>7} {r['params']:>14,} {_human(r['bytes']):>10}  {','.join(r['dtypes'])}")
    return "\n".join(lines)

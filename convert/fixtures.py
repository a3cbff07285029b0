"""Random Step-3.5-shaped checkpoints of any size, for tests (the trained fixture lives in fixtures/)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from convert.arch.step35 import Role, expected_tensors
from convert.config import parse_config

BUNDLED_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-step35"
# The Step-3.7 fixture: the same trained text stack with a vision tower (fixtures/make_tiny_step37.py).
STEP37_FIXTURE = BUNDLED_FIXTURE.with_name("tiny-step37")
BUNDLED_FIXTURES = (BUNDLED_FIXTURE, STEP37_FIXTURE)


def fixture_config(**overrides) -> dict:
    """The bundled fixture's config.json with overrides (a starting point for random checkpoints)."""
    cfg = json.loads((BUNDLED_FIXTURE / "config.json").read_text())
    cfg.update(overrides)
    return cfg


def write_random_checkpoint(out_dir: str | Path, config: dict, seed: int = 0, num_shards: int = 2,
                            std: float = 0.02) -> Path:
    """Every tensor the config implies, random normal (norms near zero, as zero-centred norms are), split
    round-robin by layer into `num_shards` files with an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(config, out / "config.json")
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for spec in expected_tensors(cfg):
        scale = 0.1 * std if spec.info.role in (Role.NORM, Role.MTP_ENORM, Role.MTP_HNORM, Role.MTP_HEAD_NORM) else std
        t = torch.randn(spec.shape, generator=g) * scale
        t = t.to(torch.float32 if spec.dtype == "F32" else torch.bfloat16)
        shard = (spec.info.layer + 1 if spec.info.layer is not None else 0) % num_shards
        shards[shard][spec.info.name] = t
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

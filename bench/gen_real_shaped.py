"""Write a random BF16 Step-3.5-Flash checkpoint with the real shapes: 1 dense layer, N MoE layers, 1 MTP layer.

Dims come from the real config (tests/data/step35_flash_config.json: hidden 4096, 288 routed experts of 1280, shared
expert 1280, dense MLP 11264, 64 heads on full-attention and 96 on sliding layers, vocab 128896); every tensor's
shape is checked against the real inventory (tests/data/step35_flash_tensors.tsv) under the real layer it stands
for: layer 0 is real layer 0 (dense, full attention), MoE layer i is real layer 2+i (3 = sliding, 4 = full, ...),
the MTP layer is real layer 45. `--experts` / `--vocab` shrink those two counts for quick runs (dims stay real).

Streaming: tensors are generated in chunks of rows (one expert at a time for 3-D stacks) and written straight to
their planned offsets by stepq's own sharded writer (convert/writer.py, 5 GB shards), so memory stays at a few
chunks whatever the size. Deterministic: each tensor's generator is seeded from its name.
With 288 experts and the real vocab: ~13.4 GB for one MoE layer, +9.3 GB per extra MoE layer.

Usage: .venv/bin/python bench/gen_real_shaped.py [--moe-layers N] [--experts E] [--vocab V] [--out DIR] [--force]
Default DIR: ~/.cache/stepq/bench/real-<N>moe[-<E>e][-v<V>]. Prints the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.arch.step35 import Role, expected_tensors  # noqa: E402
from convert.config import parse_config  # noqa: E402
from convert.writer import ArtifactWriter, OutSpec  # noqa: E402

REAL_CONFIG = ROOT / "tests" / "data" / "step35_flash_config.json"
REAL_TENSORS = ROOT / "tests" / "data" / "step35_flash_tensors.tsv"
PER_LAYER_KEYS = ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared")
CHUNK_ELEMENTS = 1 << 24  # 32 MB of bf16 per generated chunk
STAMP = ".stepq-gen.json"
NORMS = (Role.NORM, Role.MTP_ENORM, Role.MTP_HNORM, Role.MTP_HEAD_NORM)


def default_dir(moe_layers: int, experts: int, vocab: int) -> Path:
    real = json.loads(REAL_CONFIG.read_text())
    name = f"real-{moe_layers}moe"
    if experts != real["moe_num_experts"]:
        name += f"-{experts}e"
    if vocab != real["vocab_size"]:
        name += f"-v{vocab}"
    return Path.home() / ".cache" / "stepq" / "bench" / name


def real_layer(layer: int, moe_layers: int) -> int:
    """The real checkpoint's layer a generated layer stands for (its shapes and per-layer settings)."""
    if layer == 0:
        return 0
    if layer <= moe_layers:
        return 2 + layer
    return 45  # the MTP layer


def make_config(moe_layers: int, experts: int, vocab: int) -> dict:
    real = json.loads(REAL_CONFIG.read_text())
    if not 1 <= moe_layers <= 42:
        raise SystemExit("--moe-layers must be 1..42 (the real model has 42 MoE layers)")
    cfg = dict(real)
    n = moe_layers + 2
    for key in PER_LAYER_KEYS:
        cfg[key] = [real[key][real_layer(i, moe_layers)] for i in range(n)]
    cfg.update(num_hidden_layers=moe_layers + 1, num_nextn_predict_layers=1, moe_num_experts=experts,
               moe_top_k=min(real["moe_top_k"], experts), vocab_size=vocab,
               moe_layers_enum=",".join(str(i) for i in range(1, moe_layers + 1)))
    cfg["eos_token_id"] = [t for t in real["eos_token_id"] if t < vocab]
    return cfg


def _real_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in REAL_TENSORS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            shapes[name] = tuple(int(d) for d in shape.split("x"))
    return shapes


def check_real_shapes(specs, moe_layers: int, experts: int, vocab: int) -> None:
    """Every generated tensor has the real tensor's shape (with E and V substituted when shrunk)."""
    real = _real_shapes()
    real_cfg = json.loads(REAL_CONFIG.read_text())
    for s in specs:
        name = s.info.name
        if s.info.layer is not None:
            rest = name.split(".", 3)[3]
            name = f"model.layers.{real_layer(s.info.layer, moe_layers)}.{rest}"
        want = tuple(experts if d == real_cfg["moe_num_experts"] and i == 0 else vocab
                     if d == real_cfg["vocab_size"] else d for i, d in enumerate(real[name]))
        if s.shape != want:
            raise SystemExit(f"{s.info.name}: generated shape {s.shape}, real ({name}) {want}")


def _chunks(shape: tuple[int, ...]):
    """Row ranges along dim 0 of at most CHUNK_ELEMENTS each (one expert per chunk for 3-D stacks)."""
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1)) if len(shape) < 3 else 1
    for r in range(0, shape[0], step):
        yield r, min(shape[0], r + step)


def generate(out: Path, moe_layers: int, experts: int, vocab: int, force: bool = False, std: float = 0.02) -> Path:
    args = {"moe_layers": moe_layers, "experts": experts, "vocab": vocab, "std": std, "version": 1}
    stamp = out / STAMP
    if out.exists() and not force:
        if stamp.is_file() and json.loads(stamp.read_text()) == args:
            return out  # already generated with these settings
        raise SystemExit(f"{out}: exists and was not generated with these settings (pass --force)")
    config = make_config(moe_layers, experts, vocab)
    specs = expected_tensors(parse_config(config, out / "config.json"))
    check_real_shapes(specs, moe_layers, experts, vocab)
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32}
    plan = [OutSpec(s.info.name, dtypes[s.dtype], s.shape) for s in specs]
    total = sum(p.nbytes for p in plan)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.home()).free
    if free < total * 1.05 + (1 << 30):
        raise SystemExit(f"{out}: needs {total / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")
    out.parent.mkdir(parents=True, exist_ok=True)
    with ArtifactWriter(out, force=True) as writer:
        writer.plan(plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"generate {out.name}",
                  mininterval=2) as bar:
            for s, p in zip(specs, plan):
                g = torch.Generator().manual_seed(zlib.crc32(s.info.name.encode()))
                scale = 0.1 * std if s.info.role in NORMS else std
                for r0, r1 in _chunks(s.shape):
                    t = torch.randn((r1 - r0, *s.shape[1:]), generator=g)
                    if len(s.shape) == 3:  # experts differ in magnitude, as trained ones do
                        t *= scale * (0.5 + 1.5 * torch.rand((), generator=g).item())
                    else:
                        t *= scale
                    writer.write(s.info.name, t.to(p.dtype), r0)
                    bar.update((r1 - r0) * p.nbytes // max(s.shape[0], 1))
        writer.write_json("config.json", config)
        writer.write_json(STAMP, args)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real = json.loads(REAL_CONFIG.read_text())
    ap.add_argument("--moe-layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=real["moe_num_experts"])
    ap.add_argument("--vocab", type=int, default=real["vocab_size"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force", action="store_true", help="regenerate even if the folder exists")
    a = ap.parse_args()
    out = a.out or default_dir(a.moe_layers, a.experts, a.vocab)
    print(generate(out, a.moe_layers, a.experts, a.vocab, a.force))


if __name__ == "__main__":
    main()

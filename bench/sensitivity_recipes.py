"""What a sensitivity recipe buys on the bundled model: NVFP4 W4A4 with the (layer, role group)s that `stepq
sensitivity` measured as most sensitive kept BF16, against a recipe of the same budget that keeps the first and last
layers BF16 (what a community quantizer did for Step-3.5), the all-NVFP4 recipe and BF16 itself.

    .venv/bin/python bench/sensitivity_recipes.py [--shares 0.10,0.20,0.35,0.50] [--windows 48]

Budgets: the all-NVFP4 artifact + each share of the way to all-BF16. Both recipes fill it greedily with whole keepable
(layer, role group)s: the sensitivity recipe by measured KLD per byte saved (quant/keep_budget.py), the first/last one
by layer order 0, last, 1, last-1, ... (every group of a layer before the next layer). Sensitivity is measured on
the calibration set; the comparison on held-out text (the fixture's eval.txt), through the same layer-streamed
forward as `stepq eval` with the engine's activation quantization (eval.forward: W4A4 as W4A4).
Writes bench/results/sensitivity_recipes.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.checkpoint import open_checkpoint  # noqa: E402
from convert.fixtures import BUNDLED_FIXTURE  # noqa: E402
from eval.forward import artifact_outputs, source_outputs  # noqa: E402
from eval.measure import eval_text  # noqa: E402
from quant.keep_budget import Option, keep_rules  # noqa: E402
from stepq.cli import main as stepq  # noqa: E402

SCHEME = "nvfp4"


def first_last(options: list[Option], spare: int, num_layers: int) -> list[Option]:
    """The naive rule: whole layers from both ends inwards (0, last, 1, last-1, ...), each group that still fits."""
    order = sorted(range(num_layers), key=lambda i: (min(i, num_layers - 1 - i), i))
    chosen, left = [], spare
    for layer in order:
        for o in (o for o in options if o.layer == layer):
            if o.bytes_saved <= left:
                chosen.append(o)
                left -= o.bytes_saved
    return chosen


def write_recipe(path: Path, name: str, sens_recipe: dict, chosen: list[Option]) -> Path:
    recipe = {**sens_recipe, "name": name, "keep": keep_rules(chosen)}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))
    return path


def quantize(out: Path, recipe: Path | None) -> Path:
    args = ["quantize", str(BUNDLED_FIXTURE), "--scheme", SCHEME, "--out", str(out)]
    assert stepq(args + (["--recipe", str(recipe)] if recipe else [])) == 0
    return Path((out / ".last-artifact").read_text().strip())


def figures(ref, got) -> dict:
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0).flatten().double()
    return {"kld_mean": kl.mean().item(), "kld_p99": float(np.quantile(kl.numpy(), 0.99)),
            "top1": (ref.argmax(-1) == got.argmax(-1)).double().mean().item()}


def weight_bytes(art: Path) -> int:
    return json.loads((art / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shares", default="0.10,0.20,0.35,0.50",
                    help="budgets: all-NVFP4 + each share of the gap to BF16")
    ap.add_argument("--windows", type=int, default=48, help="held-out eval sequences of 256 tokens")
    args = ap.parse_args()
    shares = [float(x) for x in args.shares.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sens = ["sensitivity", str(BUNDLED_FIXTURE), "--scheme", SCHEME, "--out", str(out)]
        t0 = time.time()
        assert stepq(sens) == 0
        sensitivity_s = time.time() - t0
        sens_dir = out / f"{BUNDLED_FIXTURE.name}-sensitivity"
        report = json.loads((sens_dir / "sensitivity.json").read_text())
        sizes = report["sizes"]
        options = [Option(c["layer"], tuple(c["roles"]), c["figures"]["kld_mean"], c["bytes_saved"], c["group"])
                   for c in report["candidates"] if c["keepable"]]
        ckpt = open_checkpoint(BUNDLED_FIXTURE)
        ids = eval_text(BUNDLED_FIXTURE, None, args.windows, 256, 0).ids
        ref = source_outputs(ckpt, ids, progress=False).logits

        def evaluate(art: Path, kept: list[Option]) -> dict:
            got, _ = artifact_outputs(ckpt, art, ids, progress=False)
            return {"bytes": weight_bytes(art), **figures(ref, got.logits),
                    "kept": [f"{o.layer}:{o.name}" for o in kept], "calibration_kld_of_kept": sum(o.kld for o in kept)}

        rows = {"bf16": {"bytes": sizes["bf16_bytes"], "kld_mean": 0.0, "kld_p99": 0.0, "top1": 1.0, "kept": "all"},
                "nvfp4 (uniform)": evaluate(quantize(out, None), [])}
        budgets = []
        for share in shares:
            budget = sizes["uniform_bytes"] + share * (sizes["bf16_bytes"] - sizes["uniform_bytes"])
            # the same measurement (sensitivity.json's key matches), only the recipe is new
            assert stepq(sens + ["--budget-gb", f"{budget / 1e9:.9f}"]) == 0
            b = json.loads((sens_dir / "sensitivity.json").read_text())["budget"]
            pct = round(100 * share)
            sens_recipe = yaml.safe_load((sens_dir / "recipe.yaml").read_text())
            chosen = [o for o in options if any((k["layer"], k["group"]) == (o.layer, o.name) for k in b["kept"])]
            naive = first_last(options, b["spare_bytes"], ckpt.config.num_trunk_layers)
            paths = {f"first/last layers BF16, +{pct}%": (write_recipe(out / f"first-last-{pct}.yaml",
                                                                       f"{SCHEME}-first-last-{pct}", sens_recipe, naive), naive),
                     f"sensitivity recipe, +{pct}%": (write_recipe(out / f"sensitivity-{pct}.yaml",
                                                                   f"{SCHEME}-sensitivity-{pct}", sens_recipe, chosen), chosen)}
            for name, (path, kept) in paths.items():
                rows[name] = evaluate(quantize(out, path), kept)
            budgets.append({"share": share, "budget_bytes": int(budget), "predicted_bytes": b["artifact_bytes"]})
        ckpt.close()
    results = {"scheme": SCHEME, "eval_tokens": int(ids.numel()), "budgets": budgets,
               "calibration": report["calibration"] | {"dataset": "bundled calib.txt"},
               "sensitivity_s": round(sensitivity_s, 1), "uniform_bytes": sizes["uniform_bytes"], "rows": rows,
               "candidates": [{k: c[k] for k in ("layer", "group", "bytes_saved", "figures")}
                              for c in report["candidates"]]}
    dest = ROOT / "bench" / "results" / "sensitivity_recipes.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"budgets: all-{SCHEME} {sizes['uniform_bytes'] / 1e6:.3f} MB + a share of the gap to BF16 "
          f"{sizes['bf16_bytes'] / 1e6:.3f} MB; sensitivity {sensitivity_s:.0f} s; eval on {ids.numel()} held-out tokens")
    print("| recipe | weights (MB) | KLD mean | KLD p99 | top-1 | kept BF16 (layer:group) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        k = r["kept"] if isinstance(r["kept"], str) else (", ".join(r["kept"]) or "none")
        print(f"| {name} | {r['bytes'] / 1e6:.3f} | {r['kld_mean']:.3e} | {r['kld_p99']:.3e} | {r['top1']:.4f} | {k} |")


if __name__ == "__main__":
    main()

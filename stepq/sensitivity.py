"""`stepq sensitivity`: the KLD cost of quantizing each (layer, role group) alone, and a recipe that keeps the most
sensitive ones BF16 under a size budget.

Top to bottom: the base recipe (the scheme's bundled one) -> candidates sized by a meta-device dry run -> the budget
checked against those sizes (bad input writes nothing) -> the model must fit in memory -> calibration statistics
(`stepq calibrate`'s file, same settings, reused) and the calibration tokens -> each candidate measured
(eval.sensitivity), or the figures of a sensitivity.json with the same key reused -> OUT/<model>-sensitivity/
{sensitivity.json, heatmap.png} -> with a budget, recipe.yaml (quant.keep_budget), a normal `stepq quantize --recipe`
file.

Sizes are the artifact's weight bytes: every tensor the export writes (codes, scales, input scales, the MTP layers'
extra tensors); bits per weight are over the recipe's quantizable linears in the trunk (the candidates' tensors).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from calib.stats import model_fingerprint
from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.durable import write_atomic
from convert.errors import BadInput
from convert.provenance import digest, versions
from convert.safetensors_export import load_recipe
from quant.keep_budget import Option, choose, keep_rules
from quant.layouts import layout_for
from quant.recipe import Recipe

FORMAT_VERSION = 1
RESULT_NAME, HEATMAP_NAME, RECIPE_NAME = "sensitivity.json", "heatmap.png", "recipe.yaml"
MEMORY_SHARE = 0.8  # of the memory available now: the measurement's estimate must fit in this share


def output_dir(model_dir: str | Path, out_root: str | Path) -> Path:
    return Path(out_root) / f"{model_name(model_dir)}-sensitivity"


@dataclass
class Sizes:
    """Artifact weight bytes all-BF16 and all-quantized, and the quantizable linears' weights."""

    bf16_bytes: int
    uniform_bytes: int
    linear_params: int
    uniform_linear_bytes: int

    def bpw(self, linear_bytes: int) -> float:
        return 8 * linear_bytes / self.linear_params


def sensitivity(model_dir: str | Path, scheme: str = "nvfp4", out_root: str | Path = "out",
                budget_gb: float | None = None, budget_bpw: float | None = None, force: bool = False, *,
                dataset: str | None = None, n: int | None = None, seq_len: int | None = None, seed: int = 0,
                all_experts: bool = False, device: str | None = None, dtype: str | None = None,
                progress: bool = True) -> dict:
    """Write OUT/<model>-sensitivity/ (and recipe.yaml with a budget); returns the report (sensitivity.json's
    content). `budget_gb` (decimal GB of artifact weights) or `budget_bpw` (bits per weight over the quantizable
    linears); the calibration settings are `stepq calibrate`'s (`device`/`dtype` apply to the calibration; the
    measurement runs on the CPU in float32). A sensitivity.json with the same key is reused unless `force`."""
    from calib.data import load_calibration
    from eval.sensitivity import candidates, measure, write_heatmap
    from stepq.calibrate import calibrate

    if budget_gb is not None and budget_bpw is not None:
        raise BadInput("--budget-gb and --budget-bpw: give one budget, not both")
    for flag, value in (("--budget-gb", budget_gb), ("--budget-bpw", budget_bpw)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise BadInput(f"{flag} {value}: must be a positive number")
    model_dir = Path(model_dir)
    ckpt = open_checkpoint(model_dir)
    try:
        recipe = load_recipe(scheme)
        if recipe.mtp != "keep":
            raise BadInput(f"--scheme {scheme}: quantizes the MTP layers; sensitivity measures the trunk only "
                           f"(use the scheme's recipe with `mtp: keep`)")
        layout = layout_for(recipe.scheme)
        cands = candidates(ckpt, recipe, layout)
        sizes = _sizes(ckpt, cands, layout)
        spare = _spare_bytes(sizes, budget_gb, budget_bpw, recipe.scheme)
        data_n, data_len = _settings(model_dir, dataset, n, seq_len)
        check_memory(ckpt, data_n, data_len)
        stats = None
        if layout.static_activations:  # the same statistics file `stepq calibrate` / `stepq quantize` use
            from calib.stats import CalibStats

            stats = CalibStats.load(calibrate(model_dir, dataset=dataset, out_root=out_root, n=n, seq_len=seq_len,
                                              seed=seed, all_experts=all_experts, device=device, dtype=dtype,
                                              progress=progress))
        data = load_calibration(model_dir, dataset, n, seq_len, seed)
        key = digest({"format": FORMAT_VERSION, "source": model_fingerprint(model_dir), "recipe": recipe.to_dict(),
                      "dataset": data.dataset, "n": data.n, "seq_len": data.seq_len, "seed": seed,
                      "statistics": stats and stats.sha256})
        out = output_dir(model_dir, out_root)
        t0 = time.time()
        if not (not force and _reuse(out / RESULT_NAME, key, cands)):
            measure(ckpt, cands, layout, stats, data.ids, progress)
        report = {
            "format_version": FORMAT_VERSION, "key": key, "model": str(model_dir), "scheme": recipe.scheme,
            "recipe": recipe.to_dict(), "method": "rtn",
            "metric": "KL(BF16 || quantized) of the trunk's next-token distribution in nats per position, on the "
                      "calibration tokens, each candidate quantized alone with the engine's input quantization; "
                      "top1: argmax agreement",
            "calibration": {"dataset": data.dataset, "n": data.n, "seq_len": data.seq_len, "seed": seed,
                            "statistics_sha256": stats and stats.sha256},
            "sizes": {"bf16_bytes": sizes.bf16_bytes, "uniform_bytes": sizes.uniform_bytes,
                      "linear_params": sizes.linear_params, "uniform_bpw": sizes.bpw(sizes.uniform_linear_bytes)},
            "candidates": [c.as_dict() for c in cands],
            "measure_s": round(time.time() - t0, 3),
            "versions": versions("stepq", "torch", "transformers"),
        }
        out.mkdir(parents=True, exist_ok=True)
        if spare is not None:
            report["budget"] = _write_recipe(out / RECIPE_NAME, recipe, cands, sizes, spare, budget_gb, budget_bpw,
                                             ckpt.config.num_layers, data.dataset)
        write_atomic(out / RESULT_NAME, json.dumps(report, indent=2) + "\n")
        write_heatmap(cands, out / HEATMAP_NAME, f"{model_name(model_dir)}: {recipe.scheme} sensitivity")
    finally:
        ckpt.close()
    report["dir"] = str(out)
    return report


def _settings(model_dir: Path, dataset, n, seq_len) -> tuple[int, int]:
    from calib.data import resolve_settings

    _, n, seq_len = resolve_settings(model_dir, dataset, n, seq_len)
    return n, seq_len


def _sizes(ckpt, cands, layout) -> Sizes:
    keepable = [c for c in cands if c.keepable]
    bf16 = sum(t.entry.nbytes for t in ckpt)
    extras = sum(t.numel() * t.element_size() for _, t, _ in layout.extra_tensors(list(ckpt.config.mtp_layers)))
    return Sizes(bf16 + extras, bf16 + extras - sum(c.bytes_saved for c in keepable),
                 sum(c.params for c in keepable), sum(c.quantized_bytes for c in keepable))


def _spare_bytes(sizes: Sizes, budget_gb, budget_bpw, scheme: str) -> int | None:
    """Bytes the budget leaves above the all-quantized artifact; BadInput when it is below it."""
    if budget_gb is not None:
        spare = int(budget_gb * 1e9) - sizes.uniform_bytes
        if spare < 0:
            raise BadInput(f"--budget-gb {budget_gb}: below the all-{scheme} artifact "
                           f"({sizes.uniform_bytes / 1e9:.6g} GB of weights)")
        return spare
    if budget_bpw is not None:
        uniform = sizes.bpw(sizes.uniform_linear_bytes)
        spare = int(budget_bpw / 8 * sizes.linear_params) - sizes.uniform_linear_bytes
        if spare < 0:
            raise BadInput(f"--budget-bpw {budget_bpw}: below the all-{scheme} {uniform:.3f} bits per weight")
        return spare
    return None


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); physical memory where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(ckpt, n: int, seq_len: int) -> None:
    """The in-memory measurement's footprint (eval/sensitivity.py): float32 weights and the load's copy, every
    trunk layer's input, three [N, T, V] float32 logit tensors. BadInput when it does not fit."""
    cfg = ckpt.config
    weights = 4 * sum(math.prod(t.entry.shape) for t in ckpt)
    need = 2 * weights + 4 * n * seq_len * (cfg.num_trunk_layers * cfg.hidden_size + 3 * cfg.vocab_size)
    avail = available_memory()
    if need > MEMORY_SHARE * avail:
        raise BadInput(f"{cfg.path.parent}: sensitivity holds the whole model in float32 in memory, ~{need / 1e9:.1f} "
                       f"GB for {n} x {seq_len} tokens, {avail / 1e9:.1f} GB available (a layer-streamed measurement "
                       f"is not built: eval/sensitivity.py)")


def _reuse(path: Path, key: str, cands) -> bool:
    """Take the figures of an earlier run with the same key (source, recipe, calibration tokens, statistics)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or old.get("key") != key:
        return False
    figures = {(c["layer"], c["group"]): c.get("figures") for c in old.get("candidates", [])}
    if any(not figures.get((c.layer, c.group)) for c in cands):
        return False
    for c in cands:
        c.figures = figures[(c.layer, c.group)]
    return True


def _write_recipe(path: Path, base: Recipe, cands, sizes: Sizes, spare: int, budget_gb, budget_bpw,
                  num_layers: int, dataset: dict) -> dict:
    """recipe.yaml keeping the chosen candidates BF16 (validated as `stepq quantize` will load it) -> its summary."""
    by_option = {}
    options = []
    for c in cands:
        if c.keepable:
            o = Option(c.layer, tuple(c.roles), c.figures["kld_mean"], c.bytes_saved, c.group)
            by_option[o] = c
            options.append(o)
    chosen = choose(options, spare)
    budget = f"{budget_gb} GB of weights" if budget_gb is not None else f"{budget_bpw} bits per weight"
    data = str(dataset.get("id", "the calibration set"))
    data = Path(data).name if Path(data).exists() else data  # a recipe travels with the artifact: no local paths
    recipe = {"name": f"{base.name}-sensitivity",
              "description": f"{base.description} Kept BF16 by measured sensitivity (stepq sensitivity, "
                            f"{base.scheme} alone per layer and role group on {data}) "
                            f"within {budget}.",
              "scheme": base.scheme, "quantize": sorted(base.quantize), "mtp": base.mtp, "keep": keep_rules(chosen)}
    Recipe.from_dict(recipe, str(path)).check_layers(num_layers)  # a recipe `stepq quantize` accepts
    header = ("# Written by `stepq sensitivity`: the (layer, role group)s whose quantization alone costs the most KLD\n"
              "# per byte saved are kept BF16 (greedy, see quant/keep_budget.py) until the budget is spent.\n"
              "# Use: stepq quantize MODEL --scheme SCHEME --recipe THIS_FILE\n")
    write_atomic(path, header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120))
    kept_saved = sum(o.bytes_saved for o in chosen)
    linear_bytes = sizes.uniform_linear_bytes + kept_saved
    keepable = [c for c in cands if c.keepable]
    return {
        "budget_gb": budget_gb, "budget_bpw": budget_bpw, "spare_bytes": spare, "recipe_file": RECIPE_NAME,
        "artifact_bytes": sizes.uniform_bytes + kept_saved, "bpw": sizes.bpw(linear_bytes),
        "kept": [{"layer": o.layer, "group": o.name, "kld_mean": o.kld, "bytes_saved": o.bytes_saved} for o in chosen],
        "kld_sum_kept": sum(o.kld for o in chosen), "kld_sum_all": sum(c.figures["kld_mean"] for c in keepable),
    }


def summary(report: dict, top: int = 12) -> str:
    """What the command prints: the most sensitive candidates, the size trade, the recipe."""
    s = report["sizes"]
    cands = sorted(report["candidates"], key=lambda c: -c["figures"]["kld_mean"])
    cal = report["calibration"]
    lines = [f"{report['scheme']} sensitivity, {len(cands)} (layer, role group)s quantized alone, on "
             f"{cal['n']} x {cal['seq_len']} calibration tokens -> {report['dir']}/{RESULT_NAME}",
             f"  {'layer':>5}  {'group':<16} {'KLD mean':>10} {'KLD p99':>10} {'top-1':>7} {'bytes saved':>12}"]
    for c in cands[:top]:
        f = c["figures"]
        lines.append(f"  {c['layer']:>5}  {c['group']:<16} {f['kld_mean']:>10.3g} {f['kld_p99']:>10.3g} "
                     f"{f['top1']:>7.4f} {c['bytes_saved']:>12,}")
    if len(cands) > top:
        lines.append(f"  ... {len(cands) - top} more in {RESULT_NAME}")
    lines.append(f"all {report['scheme']}: {s['uniform_bytes'] / 1e9:.6g} GB ({s['uniform_bpw']:.2f} bpw); "
                 f"all BF16: {s['bf16_bytes'] / 1e9:.6g} GB (16 bpw)")
    if b := report.get("budget"):
        lines.append(f"budget {b['budget_gb']} GB" if b["budget_gb"] is not None else f"budget {b['budget_bpw']} bpw")
        lines[-1] += (f": {report['dir']}/{b['recipe_file']} keeps {len(b['kept'])} BF16 -> "
                      f"{b['artifact_bytes'] / 1e9:.6g} GB ({b['bpw']:.2f} bpw), keeping candidates whose KLD sums "
                      f"to {b['kld_sum_kept']:.3g} of {b['kld_sum_all']:.3g}")
    return "\n".join(lines)

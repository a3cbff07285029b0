"""`stepq quantize`: stream a checkpoint through a recipe's layout into an artifact folder.

Top to bottom: open + validate the source -> load the recipe -> group tensors into units (fused groups together)
-> plan every output tensor with a meta-device dry run -> lock the output -> (GPTQ methods: the layer-by-layer GPTQ
pass, calib.gptq, writes the quantized units' tensors) -> stream real tensors (expert by expert for 3-D stacks),
skipping units an interrupted run already finished -> config, tokenizer, provenance -> atomic rename.
The stage bodies are in `convert.safetensors_export`.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.executor import Executor, LocalExecutor, describe
from convert.lock import OutputLock
from convert.provenance import peak_rss_mib
from convert.safetensors_export import (
    SourceReader,
    activation_fallbacks,
    load_recipe,
    plan_outputs,
    plan_units,
    provenance,
    settings_digest,
    source_hashes,
    unit_key,
    variant_name,
    write_metadata,
    write_units,
)
from convert.writer import ArtifactWriter, OutSpec
from quant.layouts import NEEDS_ACTIVATION_STATS, layout_for

RECIPE_COPY = "recipe.yaml"  # a --recipe file, copied into the artifact


def quantize(model: str | Path, scheme: str, out: str | Path, recipe_file: str | None = None, force: bool = False,
             max_shard_bytes: int | None = None, source_id: str | None = None, revision: str | None = None,
             stats=None, method: str = "rtn", allow_nonfinite: bool = False,
             executor: Executor | None = None, device: str | None = None, dtype: str | None = None,
             gptq_hessian_bytes: int | None = None) -> Path:
    """`stats`: calibration statistics (`calib.stats.CalibStats`), required by schemes with static activation
    scales (`quant.layouts.NEEDS_ACTIVATION_STATS`), used as channel importance by `method="search"`, and naming
    the calibration samples the GPTQ methods run on (`device` / `dtype`: where that forward runs, calib.compute;
    `gptq_hessian_bytes`: the routed experts' Hessians held at once, calib.gptq.HESSIAN_BYTES by default). The
    GPTQ pass's per-layer results stay beside the output (`.<artifact>.gptq/`) until the artifact is complete, so
    an interrupted run resumes there too.

    Re-running after an interruption resumes: units finished by the earlier run (same inputs, same settings, bytes
    intact) are kept, the rest converted; `force` starts over. One run per output folder (`convert.lock`).

    `executor` runs the pieces (default: `LocalExecutor`, reading ahead on a thread while the kernels use every
    core); the source shards are hashed for the provenance on another thread meanwhile."""
    t0 = time.time()
    ckpt = open_checkpoint(model)
    try:
        recipe = load_recipe(scheme, recipe_file)
        try:  # per-layer keep rules (quant/recipe.py) name layers of this model
            recipe.check_layers(ckpt.config.num_layers)
        except ValueError as e:
            raise BadInput(str(e))
        try:
            layout = layout_for(recipe.scheme, method)
        except ValueError as e:
            raise BadInput(str(e))
        if (recipe.scheme in NEEDS_ACTIVATION_STATS or layout.gptq) and stats is None:
            needs = f"--method {method}" if layout.gptq else f"--scheme {scheme}"
            raise BadInput(f"{needs}: needs calibration statistics (run `stepq calibrate` first)")
        if recipe.scheme not in NEEDS_ACTIVATION_STATS and method == "rtn":
            stats = None
        units = plan_units(ckpt, recipe)
        extras = list(layout.extra_tensors(list(ckpt.config.mtp_layers)))
        specs = plan_outputs(units, layout, ckpt, stats) + [OutSpec(n, t.dtype, tuple(t.shape)) for n, t, _ in extras]
        t_plan = time.time()
        out_dir = Path(out) / f"{model_name(model)}-{variant_name(recipe)}"
        kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
        with ExitStack() as stack:
            stack.enter_context(OutputLock(out_dir))
            writer = stack.enter_context(ArtifactWriter(out_dir, force=force, resumable=True, **kwargs))
            writer.plan(specs)
            hashes = source_hashes(writer, ckpt)
            stack.callback(hashes.close)
            if executor is None:
                executor = stack.enter_context(LocalExecutor())
            gptq = None
            if layout.gptq:
                gptq_dir = out_dir.parent / f".{out_dir.name}.gptq"
                stack.callback(lambda: gptq.close() if gptq else None)
                gptq, gptq_summary = _gptq_pass(ckpt, units, layout, stats, gptq_dir, recipe, force, device, dtype,
                                                gptq_hessian_bytes)
            src = SourceReader(ckpt, stats=stats, allow_nonfinite=allow_nonfinite, gptq=gptq)
            settings = settings_digest(ckpt, recipe, method, layout, gptq.key if gptq else None)
            keys = {u.id: unit_key(u, ckpt, settings, stats and stats.sha256) for u in units}
            write_units(writer, units, keys, layout, src, specs, f"quantize {recipe.name}", executor)
            for name, t, _ in extras:
                writer.write(name, t)
            t_convert = time.time()
            write_metadata(writer, ckpt, units, layout, recipe)
            prov = provenance(ckpt, recipe, method, units, writer, hashes, source_id or str(model), revision,
                              {"plan_s": t_plan - t0, "convert_s": t_convert - t_plan})
            prov["added_tensors"] = {name: why for name, _, why in extras}
            prov["executor"] = describe(executor)
            if stats is not None:
                prov["calibration"] = {"statistics_sha256": stats.sha256, "settings": stats.meta,
                                       "activation_fallbacks": activation_fallbacks(units, stats)
                                       if layout.static_activations else []}
            if gptq is not None:
                prov["gptq"] = {**gptq_summary, "not_gptq": [r for r in gptq.records() if r["method"] != "gptq"]}
            if recipe_file:  # the recipe file itself beside the provenance (`stepq sensitivity` writes such files)
                writer.copy_file(Path(recipe_file), RECIPE_COPY)
                prov["recipe"]["file"] = RECIPE_COPY
            writer.write_json("stepq.json", prov)
        if gptq is not None:
            shutil.rmtree(gptq.folder, ignore_errors=True)  # the artifact holds its result now
    finally:
        ckpt.close()
    return out_dir


def _gptq_pass(ckpt, units, layout, stats, folder: Path, recipe, force: bool, device, dtype, hessian_bytes):
    """Run (or resume, or reuse) the GPTQ pass into `folder` -> (its store, a summary for stepq.json)."""
    from calib.compute import resolve
    from calib.gptq import HESSIAN_BYTES, run_gptq
    from convert.gptq_store import GptqStore

    t0 = time.time()
    try:
        key, summary = run_gptq(ckpt, units, layout, stats, folder,
                                compute=resolve(device or "auto", dtype or "bfloat16"),
                                hessian_bytes=hessian_bytes or HESSIAN_BYTES, force=force,
                                extra_key={"recipe": recipe.to_dict()})
    except BadInput:
        shutil.rmtree(folder, ignore_errors=True)  # bad input leaves nothing; an interruption keeps it to resume
        raise
    store = GptqStore(folder, key)
    records = store.records()
    summary.update({"gptq_modules": sum(r["method"] == "gptq" for r in records), "modules": len(records),
                    "pass_s": round(time.time() - t0, 3), "peak_rss_mib": peak_rss_mib()})
    return store, summary

"""`stepq quantize`: stream a checkpoint through a recipe's layout into an artifact folder.

Top to bottom: open + validate the source -> load the recipe -> group tensors into units (fused groups together)
-> plan every output tensor with a meta-device dry run -> lock the output -> stream real tensors (expert by expert
for 3-D stacks), skipping units an interrupted run already finished -> config, tokenizer, provenance -> atomic rename.
The stage bodies are in `convert.safetensors_export`.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from convert.checkpoint import open_checkpoint
from convert.config import model_name
from convert.errors import BadInput
from convert.executor import Executor, LocalExecutor
from convert.lock import OutputLock
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
             executor: Executor | None = None) -> Path:
    """`stats`: calibration statistics (`calib.stats.CalibStats`), required by schemes with static activation
    scales (`quant.layouts.NEEDS_ACTIVATION_STATS`) and used as channel importance by `method="search"`.

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
        if recipe.scheme in NEEDS_ACTIVATION_STATS and stats is None:
            raise BadInput(f"--scheme {scheme}: needs calibration statistics (run `stepq calibrate` first)")
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
            src = SourceReader(ckpt, stats=stats, allow_nonfinite=allow_nonfinite)
            settings = settings_digest(ckpt, recipe, method, layout)
            keys = {u.id: unit_key(u, ckpt, settings, stats and stats.sha256) for u in units}
            write_units(writer, units, keys, layout, src, specs, f"quantize {recipe.name}", executor)
            for name, t, _ in extras:
                writer.write(name, t)
            t_convert = time.time()
            write_metadata(writer, ckpt, units, layout, recipe)
            prov = provenance(ckpt, recipe, method, units, writer, hashes, source_id or str(model), revision,
                              {"plan_s": t_plan - t0, "convert_s": t_convert - t_plan})
            prov["added_tensors"] = {name: why for name, _, why in extras}
            if stats is not None:
                prov["calibration"] = {"statistics_sha256": stats.sha256, "settings": stats.meta,
                                       "activation_fallbacks": activation_fallbacks(units, stats)}
            if recipe_file:  # the recipe file itself beside the provenance (`stepq sensitivity` writes such files)
                writer.copy_file(Path(recipe_file), RECIPE_COPY)
                prov["recipe"]["file"] = RECIPE_COPY
            writer.write_json("stepq.json", prov)
    finally:
        ckpt.close()
    return out_dir

"""`stepq quantize`: stream a checkpoint through a recipe's layout into an artifact folder.

Top to bottom: open + validate the source -> load the recipe -> group tensors into units (fused groups together)
-> plan every output tensor with a meta-device dry run -> stream real tensors (expert by expert for 3-D stacks)
-> config, tokenizer, provenance -> atomic rename.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from convert.arch.step35 import EXPERT_ROLES, LINEAR_ROLES
from convert.checkpoint import Checkpoint, SourceTensor, open_checkpoint
from convert.errors import BadInput
from convert.hashing import file_sha256
from convert.hub import TOKENIZER_FILES
from convert.safetensors_io import DTYPES
from convert.writer import ArtifactWriter, OutSpec
import quant
from quant.layouts import NEEDS_ACTIVATION_STATS, KeptModule, layout_for
from quant.recipe import Recipe, fused_group

RECIPES_DIR = Path(quant.__file__).resolve().parent / "recipes"


@dataclass
class Unit:
    """Tensors converted together: one kept tensor, or a fused group quantized with shared scales."""

    members: list[SourceTensor]
    quantize: bool
    reason: str
    outputs: list[str] = field(default_factory=list)

    @property
    def experts(self) -> bool:
        return self.members[0].info.role in EXPERT_ROLES


def load_recipe(scheme: str, recipe_file: str | None = None) -> Recipe:
    if recipe_file:
        path = Path(recipe_file)
        if not path.is_file():
            raise BadInput(f"{path}: recipe file not found")
        text, source = path.read_text(), str(path)
    else:
        res = RECIPES_DIR / f"{scheme}.yaml"
        if not res.is_file():
            known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
            raise BadInput(f"--scheme {scheme}: unknown (bundled recipes: {', '.join(known)})")
        text, source = res.read_text(), f"quant/recipes/{scheme}.yaml"
    try:
        return Recipe.from_dict(yaml.safe_load(text), source)
    except (yaml.YAMLError, ValueError) as e:
        raise BadInput(str(e).splitlines()[0])


def plan_units(ckpt: Checkpoint, recipe: Recipe) -> list[Unit]:
    """Units in on-disk order of their first member; fused groups collected across shards."""
    units: list[Unit] = []
    groups: dict[tuple, Unit] = {}
    for t in ckpt:
        d = recipe.decide(t.info.role, t.info.mtp)
        if not d.quantize:
            units.append(Unit([t], False, d.reason))
            continue
        group = fused_group(t.info.role)
        key = (t.info.layer, group)
        if key not in groups:
            groups[key] = Unit([], True, d.reason)
            units.append(groups[key])
        groups[key].members.append(t)
    for u in units:  # canonical member order (q, k, v / gate, up) whatever the on-disk order
        u.members.sort(key=lambda t: fused_group(t.info.role).index(t.info.role))
    return units


class _Reader:
    """Checkpoint reads; with `meta=True` the same reads on the meta device: the dry run that plans every output
    shape without touching data."""

    def __init__(self, ckpt: Checkpoint, meta: bool = False, stats=None):
        self.ckpt, self.meta, self.stats = ckpt, meta, stats
        self.fallbacks: list[dict] = []  # experts whose input scale came from their siblings

    def read(self, name: str) -> torch.Tensor:
        if self.meta:
            e = self.ckpt.tensors[name].entry
            return torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta")
        return self.ckpt.read(name)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        return self.read(name)[expert] if self.meta else self.ckpt.read_expert(name, expert)

    def act(self, t: SourceTensor, expert: int | None = None) -> torch.Tensor | None:
        """Calibrated input absmax of a module (or of one expert); None when the scheme runs without statistics."""
        if self.stats is None:
            return None
        if self.meta:
            return torch.zeros((), device="meta")
        module = t.info.module
        if expert is None:
            return self.stats.input_amax(module)
        if self.stats.tokens(module, expert) > 0:
            return self.stats.input_amax(module, expert)
        # No calibration token reached this expert: the largest input absmax among its siblings in this layer
        # keeps its activations from saturating if it is routed to at run time.
        self.fallbacks.append({"module": module, "expert": expert, "reason": "no calibration tokens; "
                               "input scale from the max over the layer's experts"})
        return torch.stack([self.stats.input_amax(module, e) for e in range(t.entry.shape[0])]).amax()

    def importance(self, t: SourceTensor, expert: int | None = None) -> torch.Tensor | None:
        """Mean squared calibration input per input channel (the imatrix diagonal); None without statistics."""
        if self.stats is None:
            return None
        if self.meta:
            return torch.zeros(t.entry.shape[-1], device="meta")
        module = t.info.module
        tokens = self.stats.tokens(module, expert)
        return self.stats.channel_sumsq(module, expert).float() / max(tokens, 1)

    def checked(self, t: SourceTensor, w: torch.Tensor) -> torch.Tensor:
        if not self.meta and w.is_floating_point() and not torch.isfinite(w).all():
            raise BadInput(f"{self.ckpt.shard_path(t.shard)}: tensor {t.info.name}: contains NaN or Inf")
        return w


def emit(unit: Unit, layout, src) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """The output tensors of one unit; `src` is the checkpoint or its meta twin."""
    if not unit.quantize:
        t = unit.members[0]
        yield t.info.name, src.read(t.info.name), None  # kept: the source bytes, unchanged
        return
    modules = [t.info.module for t in unit.members]
    if unit.experts:
        for e in range(unit.members[0].entry.shape[0]):
            ws = [src.checked(t, src.read_expert(t.info.name, e)) for t in unit.members]
            yield from layout.experts(modules, e, ws, _acts(src, unit, e), _importance(src, unit, e, layout))
    else:
        ws = [src.checked(t, src.read(t.info.name)) for t in unit.members]
        yield from layout.linear(modules, ws, _acts(src, unit, None), _importance(src, unit, None, layout))


def _acts(src: _Reader, unit: Unit, expert: int | None) -> list[torch.Tensor] | None:
    acts = [src.act(t, expert) for t in unit.members]
    return None if acts[0] is None else acts


def _importance(src: _Reader, unit: Unit, expert: int | None, layout) -> list[torch.Tensor] | None:
    if layout.method != "search":  # only the scale search weighs errors by channel importance
        return None
    imp = [src.importance(t, expert) for t in unit.members]
    return None if imp[0] is None else imp


def plan_outputs(units: list[Unit], layout, ckpt: Checkpoint, stats=None) -> list[OutSpec]:
    meta = _Reader(ckpt, meta=True, stats=stats)
    specs: dict[str, OutSpec] = {}
    for u in units:
        for name, t, row in emit(u, layout, meta):
            if name not in specs:
                u.outputs.append(name)
            if row is None:
                specs[name] = OutSpec(name, t.dtype, tuple(t.shape))
            else:
                prev = specs[name].shape[0] if name in specs else 0
                specs[name] = OutSpec(name, t.dtype, (max(prev, row + t.shape[0]), *t.shape[1:]))
    return list(specs.values())


def _versions() -> dict:
    import compressed_tensors
    import safetensors
    import transformers

    import stepq

    return {"stepq": stepq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__, "safetensors": safetensors.__version__}


def variant_name(recipe: Recipe) -> str:
    return recipe.name.upper()


def quantize(model: str | Path, scheme: str, out: str | Path, recipe_file: str | None = None, force: bool = False,
             max_shard_bytes: int | None = None, source_id: str | None = None, revision: str | None = None,
             stats=None, method: str = "rtn") -> Path:
    """`stats`: calibration statistics (`calib.stats.CalibStats`), required by schemes with static activation
    scales (`quant.layouts.NEEDS_ACTIVATION_STATS`) and used as channel importance by `method="search"`."""
    t0 = time.time()
    ckpt = open_checkpoint(model)
    try:
        recipe = load_recipe(scheme, recipe_file)
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
        out_dir = Path(out) / f"{Path(model).resolve().name}-{variant_name(recipe)}"
        kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
        total = sum(s.nbytes for s in specs)
        with ArtifactWriter(out_dir, force=force, **kwargs) as writer:
            writer.plan(specs)
            src = _Reader(ckpt, stats=stats)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"quantize {recipe.name}") as bar:
                for u in units:
                    for name, t, row in emit(u, layout, src):
                        writer.write(name, t, row)
                        bar.update(t.numel() * t.element_size())
                for name, t, _ in extras:
                    writer.write(name, t)
            t_convert = time.time()
            kept = [KeptModule(u.members[0].info.module, u.members[0].info.role, u.members[0].info.mtp)
                    for u in units if not u.quantize and u.members[0].info.role in LINEAR_ROLES]
            whole_mtp = list(ckpt.config.mtp_layers) if recipe.mtp == "keep" else []
            qcfg = layout.quantization_config(kept, whole_mtp)
            config = dict(ckpt.config.raw)
            config["quantization_config"] = qcfg
            writer.write_json("config.json", config)
            for name, obj in layout.extra_files(kept, whole_mtp).items():
                writer.write_json(name, obj)
            for name in TOKENIZER_FILES:
                if (ckpt.dir / name).is_file():
                    writer.copy_file(ckpt.dir / name)
            prov = _provenance(ckpt, recipe, method, units, writer, source_id or str(model), revision,
                               {"plan_s": t_plan - t0, "convert_s": t_convert - t_plan})
            prov["added_tensors"] = {name: why for name, _, why in extras}
            if stats is not None:
                prov["calibration"] = {"statistics_sha256": stats.sha256, "settings": stats.meta,
                                       "activation_fallbacks": src.fallbacks}
            writer.write_json("stepq.json", prov)
    finally:
        ckpt.close()
    return out_dir


def _provenance(ckpt: Checkpoint, recipe: Recipe, method: str, units: list[Unit], writer: ArtifactWriter,
                source: str, revision: str | None, timings: dict) -> dict:
    files = {}
    for shard in sorted(ckpt.shards) + ["config.json"]:
        p = ckpt.dir / shard
        files[shard] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    decisions = {}
    for u in units:
        for t in u.members:
            decisions[t.info.name] = {
                "role": t.info.label, "shape": list(t.entry.shape), "dtype": t.entry.dtype,
                "action": "quantized" if u.quantize else "kept",
                "format": recipe.scheme if u.quantize else t.entry.dtype, "reason": u.reason,
                "outputs": [o for o in u.outputs if o.startswith(t.info.module + ".") or o == t.info.name
                            or (u.experts and _expert_output_of(o, t.info.module))],
            }
    return {
        "format_version": 1,
        "source": {"model": source, "revision": revision, "path": str(ckpt.dir.resolve()), "files": files},
        "scheme": recipe.scheme, "method": method, "recipe": recipe.to_dict(), "variant": variant_name(recipe),
        "shards": writer.shard_names,
        "tensors": decisions,
        "versions": _versions(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _expert_output_of(output: str, stack_module: str) -> bool:
    head, proj = stack_module.rsplit(".", 1)
    return output.startswith(head + ".experts.") and output.split(".")[-2] == proj

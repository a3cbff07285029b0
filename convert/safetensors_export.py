"""`stepq quantize`: stream a checkpoint through a recipe's layout into an artifact folder.

Top to bottom: open + validate the source -> load the recipe -> group tensors into units (fused groups together)
-> plan every output tensor with a meta-device dry run -> lock the output -> stream real tensors (expert by expert
for 3-D stacks), skipping units an interrupted run already finished -> config, tokenizer, provenance -> atomic rename.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from convert.arch.step35 import EXPERT_ROLES, LINEAR_ROLES
from convert.checkpoint import Checkpoint, SourceTensor, open_checkpoint
from convert.config import model_file, model_name
from convert.errors import BadInput
from convert.hashing import BackgroundHashes, file_sha256
from convert.hub import TOKENIZER_FILES
from convert.lock import OutputLock
from convert.safetensors_io import DTYPES
from convert.writer import ArtifactWriter, OutSpec
from stepq.executor import Executor, LocalExecutor, Task
import quant
from quant.fast_common import all_finite
from quant.layouts import NEEDS_ACTIVATION_STATS, KeptModule, layout_for
from quant.recipe import Recipe, fused_group

RECIPES_DIR = Path(quant.__file__).resolve().parent / "recipes"
SOURCE_SHA256 = "source_sha256"  # progress-file memo kind: a resumed run does not hash the source shards again
log = logging.getLogger("stepq.quantize")


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

    @property
    def id(self) -> str:
        return "+".join(t.info.name for t in self.members)


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

    def __init__(self, ckpt: Checkpoint, meta: bool = False, stats=None, allow_nonfinite: bool = False):
        self.ckpt, self.meta, self.stats, self.allow_nonfinite = ckpt, meta, stats, allow_nonfinite
        self._warned: set[str] = set()

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
        # keeps its activations from saturating if it is routed to at run time (listed by activation_fallbacks).
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
        """`w` (a tensor, or one expert of a stack) after the NaN/Inf check: bad input unless allowed."""
        if self.meta or not w.is_floating_point() or not has_nonfinite(w):
            return w
        where = f"{self.ckpt.shard_path(t.shard)}: tensor {t.info.name}"
        nan, inf = int(w.isnan().sum()), int(w.isinf().sum())
        what = f"contains NaN or Inf ({nan} NaN, {inf} Inf values)"
        if not self.allow_nonfinite:
            raise BadInput(f"{where}: {what} (--allow-nonfinite converts it anyway)")
        if t.info.name not in self._warned:
            self._warned.add(t.info.name)
            log.warning("%s: %s; converting anyway (--allow-nonfinite): its outputs will not be finite", where, what)
        return w


# NaN and Inf are the floats whose exponent bits are all ones. Testing the bits through numpy is ~20x faster than
# torch.isfinite on BF16 (which converts every element): minutes instead of hours over the real model's 197B weights.
_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                  torch.float32: (torch.int32, 0x7F800000)}


def has_nonfinite(w: torch.Tensor) -> bool:
    if w.numel() == 0:
        return False
    if w.dtype == torch.bfloat16:  # the source dtype: one fused numba pass on all cores, no full-size temporary
        return not all_finite(w)
    if w.dtype not in _EXPONENT_BITS:
        return not bool(torch.isfinite(w).all())
    int_dtype, mask = _EXPONENT_BITS[w.dtype]
    bits = w.contiguous().view(int_dtype).numpy()
    return int((bits & mask).max()) == mask


def parts(unit: Unit) -> list[int | None]:
    """The pieces a unit is converted in: one per expert for 3-D expert stacks (memory stays at one expert's
    slices), else the whole unit (None)."""
    if unit.quantize and unit.experts:
        return list(range(unit.members[0].entry.shape[0]))
    return [None]


def read_part(src, unit: Unit, expert: int | None) -> list[torch.Tensor]:
    """The I/O half of a piece: the members' source tensors (mmap views), Inf/NaN-checked."""
    if expert is None:
        return [src.checked(t, src.read(t.info.name)) for t in unit.members]
    return [src.checked(t, src.read_expert(t.info.name, expert)) for t in unit.members]


def compute_part(layout, src, unit: Unit, expert: int | None,
                 ws: list[torch.Tensor]) -> list[tuple[str, torch.Tensor, int | None]]:
    """The CPU half: the piece's output tensors (name, tensor, first row or None)."""
    if not unit.quantize:
        return [(unit.members[0].info.name, ws[0], None)]  # kept: the source bytes, unchanged
    modules = [t.info.module for t in unit.members]
    acts, importance = _acts(src, unit, expert), _importance(src, unit, expert, layout)
    if expert is None:
        return list(layout.linear(modules, ws, acts, importance))
    return list(layout.experts(modules, expert, ws, acts, importance))


def emit(unit: Unit, layout, src) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """The output tensors of one unit, piece after piece; `src` is the checkpoint or its meta twin."""
    for e in parts(unit):
        yield from compute_part(layout, src, unit, e, read_part(src, unit, e))


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
    owner: dict[str, str] = {}  # output -> the unit writing it: one each, so a unit can be redone on its own
    for u in units:
        for name, t, row in emit(u, layout, meta):
            if owner.setdefault(name, u.id) != u.id:
                raise ValueError(f"output {name} written by two units ({owner[name]}, {u.id})")
            if name not in specs:
                u.outputs.append(name)
            if row is None:
                specs[name] = OutSpec(name, t.dtype, tuple(t.shape))
            else:
                prev = specs[name].shape[0] if name in specs else 0
                specs[name] = OutSpec(name, t.dtype, (max(prev, row + t.shape[0]), *t.shape[1:]))
    return list(specs.values())


def activation_fallbacks(units: list[Unit], stats) -> list[dict]:
    """Experts no calibration token reached, whose input scale is the max over the layer's experts (`_Reader.act`);
    derived from the statistics, in conversion order, so a resumed run records the same list."""
    if stats is None:
        return []
    return [{"module": t.info.module, "expert": e,
             "reason": "no calibration tokens; input scale from the max over the layer's experts"}
            for u in units if u.quantize and u.experts
            for e in range(u.members[0].entry.shape[0]) for t in u.members if stats.tokens(t.info.module, e) == 0]


def _versions() -> dict:
    # From the installed metadata: importing transformers only to read its version costs seconds per run.
    import stepq

    v = importlib.metadata.version
    return {"stepq": stepq.__version__, "torch": torch.__version__, "transformers": v("transformers"),
            "compressed_tensors": v("compressed-tensors"), "safetensors": v("safetensors")}


def _settings_digest(ckpt: Checkpoint, recipe: Recipe, method: str, layout) -> str:
    """Everything besides a unit's own tensors that decides its output bytes."""
    settings = {"recipe": recipe.to_dict(), "scheme": recipe.scheme, "method": method,
                "layout": type(layout).__name__, "config_sha256": file_sha256(ckpt.dir / "config.json"),
                "stepq": _versions()["stepq"], "torch": torch.__version__}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def unit_key(unit: Unit, ckpt: Checkpoint, settings: str, stats_sha256: str | None) -> str:
    """The identity of what a unit's output depends on: settings, its source tensors (name, place, shard identity)
    and, for quantized units, the statistics file. A resumed run reuses a unit only under the same key."""
    members = [[t.info.name, t.entry.dtype, list(t.entry.shape), t.entry.start, t.shard,
                ckpt.shard_identity(t.shard)] for t in unit.members]
    key = {"settings": settings, "members": members, "outputs": unit.outputs,
           "stats": stats_sha256 if unit.quantize else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def unit_tasks(unit: Unit, layout, src: _Reader) -> list[Task]:
    """A unit's pieces as executor tasks; the key (unit, last piece?) tells the writer when to commit the unit."""
    ps = parts(unit)
    piece_bytes = sum(t.entry.nbytes for t in unit.members) // max(len(ps), 1)
    return [Task((unit, i == len(ps) - 1), partial(read_part, src, unit, e),
                 partial(compute_part, layout, src, unit, e), piece_bytes) for i, e in enumerate(ps)]


def write_units(writer: ArtifactWriter, units: list[Unit], keys: dict[str, str], layout, src: _Reader,
                specs: list[OutSpec], desc: str, executor: Executor) -> None:
    """Convert and write every unit, each recorded as finished once all its outputs are written; units an
    interrupted run finished under the same key are verified and kept instead. The executor reads the next pieces
    and quantizes while this thread writes; results come back in order, so each shard is written front to back."""
    nbytes = {s.name: s.nbytes for s in specs}
    # disable=None: a progress bar on a terminal only, never \r-garbage in logs and captured stderr
    with tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc=desc, disable=None) as bar:
        todo = []
        for u in units:
            if writer.reuse(u.id, keys[u.id], u.outputs):
                bar.update(sum(nbytes[o] for o in u.outputs))
            else:
                todo.append(u)
        tasks = (task for u in todo for task in unit_tasks(u, layout, src))
        for task, outputs in executor.map(tasks):
            for name, t, row in outputs:
                writer.write(name, t, row)
                bar.update(t.numel() * t.element_size())
            unit, last = task.key
            if last:
                writer.commit(unit.id, keys[unit.id], unit.outputs)
    if writer.reused_units:
        log.info("resumed: %d of %d units reused from the interrupted run", writer.reused_units, len(units))


def variant_name(recipe: Recipe) -> str:
    return recipe.name.upper()


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
            hashes = BackgroundHashes([ckpt.dir / s for s in sorted(ckpt.shards)
                                       if not writer.memoized(SOURCE_SHA256, _shard_memo_key(ckpt, s))])
            stack.callback(hashes.close)
            if executor is None:
                executor = stack.enter_context(LocalExecutor())
            src = _Reader(ckpt, stats=stats, allow_nonfinite=allow_nonfinite)
            settings, stats_sha256 = _settings_digest(ckpt, recipe, method, layout), stats and stats.sha256
            keys = {u.id: unit_key(u, ckpt, settings, stats_sha256) for u in units}
            write_units(writer, units, keys, layout, src, specs, f"quantize {recipe.name}", executor)
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
                if (path := model_file(ckpt.dir, name)) is not None:
                    writer.copy_file(path)
            prov = _provenance(ckpt, recipe, method, units, writer, hashes, source_id or str(model), revision,
                               {"plan_s": t_plan - t0, "convert_s": t_convert - t_plan})
            prov["added_tensors"] = {name: why for name, _, why in extras}
            if stats is not None:
                prov["calibration"] = {"statistics_sha256": stats.sha256, "settings": stats.meta,
                                       "activation_fallbacks": activation_fallbacks(units, stats)}
            writer.write_json("stepq.json", prov)
    finally:
        ckpt.close()
    return out_dir


def _shard_memo_key(ckpt: Checkpoint, shard: str) -> str:
    return f"{shard} {json.dumps(ckpt.shard_identity(shard), sort_keys=True)}"


def _provenance(ckpt: Checkpoint, recipe: Recipe, method: str, units: list[Unit], writer: ArtifactWriter,
                hashes: BackgroundHashes, source: str, revision: str | None, timings: dict) -> dict:
    files = {}
    for shard in sorted(ckpt.shards):
        p = ckpt.dir / shard
        # a 5 GB shard takes seconds to hash: a resumed run takes the hash from the progress file
        sha = writer.memo(SOURCE_SHA256, _shard_memo_key(ckpt, shard), lambda p=p: hashes.result(p))
        files[shard] = {"size": p.stat().st_size, "sha256": sha}
    config = ckpt.dir / "config.json"
    files["config.json"] = {"size": config.stat().st_size, "sha256": file_sha256(config)}
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

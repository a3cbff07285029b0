"""The safetensors export: a checkpoint streamed through a recipe's layout into planned output shards.

`plan_units` groups tensors into units (fused groups together), `plan_outputs` plans every output tensor with a
meta-device dry run, `write_units` converts and writes them (expert by expert for 3-D stacks) through an executor,
skipping units an interrupted run already finished, and `provenance` describes the result for `stepq.json`.
`stepq.quantize.quantize` runs these top to bottom.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import quant
from convert.arch.step35 import vllm_names
from convert.checkpoint import Checkpoint, SourceTensor
from convert.config import model_file
from convert.errors import BadInput
from convert.executor import Executor, Task
from convert.hashing import BackgroundHashes, file_sha256
from convert.hub import TOKENIZER_FILES
from convert.provenance import digest, peak_rss_mib, source_files, versions
from convert.safetensors_io import DTYPES
from convert.writer import ArtifactWriter, OutSpec
from quant import mtp
from quant.expert_inputs import FALLBACK_REASON, expert_input_amax
from quant.fast_common import all_finite
from quant.layouts import KeptModule
from quant.recipe import Recipe
from quant.roles import EXPERT_ROLES, LINEAR_ROLES, VISION_MODULE_ROLES, fused_group

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
        d = recipe.decide(t.info.role, t.info.mtp, t.info.layer)
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


class SourceReader:
    """Checkpoint reads; with `meta=True` the same reads on the meta device: the dry run that plans every output
    shape without touching data."""

    def __init__(self, ckpt: Checkpoint, meta: bool = False, stats=None, allow_nonfinite: bool = False, gptq=None):
        self.ckpt, self.meta, self.stats, self.allow_nonfinite = ckpt, meta, stats, allow_nonfinite
        self.gptq = gptq  # convert.gptq_store.GptqStore: quantized units' tensors come from there, not the source
        self._warned: set[str] = set()
        self._meta_twin: SourceReader | None = None

    @property
    def meta_twin(self) -> SourceReader:
        if self._meta_twin is None:
            self._meta_twin = SourceReader(self.ckpt, meta=True, stats=self.stats)
        return self._meta_twin

    def read(self, name: str) -> torch.Tensor:
        if self.meta:
            e = self.ckpt.tensors[name].entry
            return torch.empty(e.shape, dtype=DTYPES[e.dtype], device="meta")
        self._read_ahead(name, 0)
        return self.ckpt.read(name)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        if self.meta:
            return self.read(name)[expert]
        self._read_ahead(name, expert)
        return self.ckpt.read_expert(name, expert)

    def _read_ahead(self, name: str, expert: int) -> None:
        """The conversion goes through each shard front to back: keep the disk busy ahead of it."""
        t = self.ckpt.tensors[name]
        per = t.entry.nbytes // t.entry.shape[0] if expert else 0
        self.ckpt.shards[t.shard].read_ahead(t.entry.start + expert * per)

    def act(self, t: SourceTensor, expert: int | None = None) -> torch.Tensor | None:
        """Calibrated input absmax of a module (or of one expert); None when the scheme runs without statistics."""
        if self.stats is None:
            return None
        if self.meta:
            return torch.zeros((), device="meta")
        module = t.info.module
        if expert is None:
            return self.stats.input_amax(module)
        return expert_input_amax(self.stats.input_amax(module, expert), self.stats.tokens(module, expert),
                                 lambda: (self.stats.input_amax(module, e) for e in range(t.entry.shape[0])))

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
        if self.meta or all_finite(w):
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


def parts(unit: Unit) -> list[int | None]:
    """The pieces a unit is converted in: one per expert for 3-D expert stacks (memory stays at one expert's
    slices), else the whole unit (None)."""
    if unit.quantize and unit.experts:
        return list(range(unit.members[0].entry.shape[0]))
    return [None]


def read_part(src, unit: Unit, expert: int | None) -> list[torch.Tensor]:
    """The I/O half of a piece: the members' source tensors (mmap views; the executor faults their pages in).
    A unit GPTQ quantized is not read: its tensors are in the GPTQ store."""
    if unit.quantize and src.gptq is not None:
        src = src.meta_twin
    if expert is None:
        return [src.read(t.info.name) for t in unit.members]
    return [src.read_expert(t.info.name, expert) for t in unit.members]


def compute_part(layout, src, unit: Unit, expert: int | None,
                 ws: list[torch.Tensor]) -> list[tuple[str, torch.Tensor, int | None]]:
    """The CPU half: the Inf/NaN check, then the piece's output tensors (name, tensor, first row or None).
    The check runs here, on pages already read, not in `read_part`: it runs on the kernels' thread pool, whose
    threads would otherwise wait on the disk there while the quantize calls queue behind them."""
    if unit.quantize and src.gptq is not None:  # the GPTQ pass wrote them: the plan's tensors, from its store
        return src.gptq.emits(compute_part(layout, src.meta_twin, unit, expert, ws))
    ws = [src.checked(t, w) for t, w in zip(unit.members, ws)]
    if not unit.quantize:
        return [(unit.members[0].info.name, ws[0], None)]  # kept: the source bytes, unchanged
    modules = [t.info.module for t in unit.members]
    acts, importance = acts_of(src, unit, expert), importance_of(src, unit, expert, layout)
    if expert is None:
        return list(layout.linear(modules, ws, acts, importance))
    return list(layout.experts(modules, expert, ws, acts, importance))


def emit(unit: Unit, layout, src) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """The output tensors of one unit, piece after piece; `src` is the checkpoint or its meta twin."""
    for e in parts(unit):
        yield from compute_part(layout, src, unit, e, read_part(src, unit, e))


def acts_of(src: SourceReader, unit: Unit, expert: int | None) -> list[torch.Tensor] | None:
    acts = [src.act(t, expert) for t in unit.members]
    return None if acts[0] is None else acts


def importance_of(src: SourceReader, unit: Unit, expert: int | None, layout) -> list[torch.Tensor] | None:
    if not layout.searches:  # only the scale search weighs errors by channel importance
        return None
    imp = [src.importance(t, expert) for t in unit.members]
    return None if imp[0] is None else imp


def plan_outputs(units: list[Unit], layout, ckpt: Checkpoint, stats=None) -> list[OutSpec]:
    meta = SourceReader(ckpt, meta=True, stats=stats)
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
    """Experts no calibration token reached, whose input scale is the max over the layer's experts
    (`quant.expert_inputs`);
    derived from the statistics, in conversion order, so a resumed run records the same list."""
    if stats is None:
        return []
    return [{"module": t.info.module, "expert": e, "reason": FALLBACK_REASON}
            for u in units if u.quantize and u.experts
            for e in range(u.members[0].entry.shape[0]) for t in u.members if stats.tokens(t.info.module, e) == 0]


def settings_digest(ckpt: Checkpoint, recipe: Recipe, method: str, layout, gptq_key: str | None = None) -> str:
    """Everything besides a unit's own tensors that decides its output bytes (with GPTQ: its pass's key)."""
    settings = {"recipe": recipe.to_dict(), "scheme": recipe.scheme, "method": method, "gptq": gptq_key,
                "layout": type(layout).__name__, "config_sha256": file_sha256(ckpt.dir / "config.json"),
                "versions": versions("stepq", "torch")}
    return digest(settings)


def unit_key(unit: Unit, ckpt: Checkpoint, settings: str, stats_sha256: str | None) -> str:
    """The identity of what a unit's output depends on: settings, its source tensors (name, place, shard identity)
    and, for quantized units, the statistics file. A resumed run reuses a unit only under the same key."""
    members = [[t.info.name, t.entry.dtype, list(t.entry.shape), t.entry.start, t.shard,
                ckpt.shard_identity(t.shard)] for t in unit.members]
    key = {"settings": settings, "members": members, "outputs": unit.outputs,
           "stats": stats_sha256 if unit.quantize else None}
    return digest(key)


def unit_tasks(unit: Unit, layout, src: SourceReader) -> list[Task]:
    """A unit's pieces as executor tasks; the key (unit, last piece?) tells the writer when to commit the unit."""
    ps = parts(unit)
    piece_bytes = sum(t.entry.nbytes for t in unit.members) // max(len(ps), 1)
    return [Task((unit, i == len(ps) - 1), partial(read_part, src, unit, e),
                 partial(compute_part, layout, src, unit, e), piece_bytes) for i, e in enumerate(ps)]


def write_units(writer: ArtifactWriter, units: list[Unit], keys: dict[str, str], layout, src: SourceReader,
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


def shard_memo_key(ckpt: Checkpoint, shard: str) -> str:
    return f"{shard} {json.dumps(ckpt.shard_identity(shard), sort_keys=True)}"


def provenance(ckpt: Checkpoint, recipe: Recipe, method: str, units: list[Unit], writer: ArtifactWriter,
               hashes: BackgroundHashes, source: str, revision: str | None, timings: dict) -> dict:
    """`stepq.json` of a safetensors artifact: the source's files, every tensor's decision, versions, timings."""
    def sha256_of(p: Path) -> str:
        if p.name not in ckpt.shards:
            return file_sha256(p)
        # a 5 GB shard takes seconds to hash: a resumed run takes the hash from the progress file
        return writer.memo(SOURCE_SHA256, shard_memo_key(ckpt, p.name), lambda: hashes.result(p))

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
        "source": {"model": source, "revision": revision, "path": str(ckpt.dir.resolve()),
                   "files": source_files(ckpt.dir, [*sorted(ckpt.shards), "config.json"], sha256_of)},
        "scheme": recipe.scheme, "method": method, "recipe": recipe.to_dict(), "variant": variant_name(recipe),
        "shards": writer.shard_names,
        "tensors": decisions,
        "versions": versions("stepq", "torch", "transformers", "compressed-tensors", "safetensors",
                             *(["llmcompressor"] if method.startswith("gptq") else [])),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mib": peak_rss_mib(),
    }


def _expert_output_of(output: str, stack_module: str) -> bool:
    head, proj = stack_module.rsplit(".", 1)
    return output.startswith(head + ".experts.") and output.split(".")[-2] == proj


def source_hashes(writer: ArtifactWriter, ckpt: Checkpoint) -> BackgroundHashes:
    """The source shards' sha256 for `stepq.json`, on a thread reading alongside the conversion; shards a resumed
    run already hashed come from the progress file."""
    return BackgroundHashes([ckpt.dir / s for s in sorted(ckpt.shards)
                             if not writer.memoized(SOURCE_SHA256, shard_memo_key(ckpt, s))])


def write_metadata(writer: ArtifactWriter, ckpt: Checkpoint, units: list[Unit], layout, recipe: Recipe) -> None:
    """config.json with the layout's quantization config (what stayed BF16, for the engines' ignore lists), the
    layout's extra files, and the tokenizer files, copied."""
    kept = [KeptModule(t.info.module, t.info.role, t.info.mtp, tuple(vllm_names(t.info)))
            for t in (u.members[0] for u in units if not u.quantize)
            if t.info.role in LINEAR_ROLES or t.info.role in VISION_MODULE_ROLES]
    whole_mtp = mtp.layers_kept_whole(recipe.mtp, ckpt.config.mtp_layers)
    # the whole file, Step-3.7's text_config with its per-layer lists as the source wrote them
    config = dict(ckpt.config.file_raw)
    config["quantization_config"] = layout.quantization_config(kept, whole_mtp)
    writer.write_json("config.json", config)
    for name, obj in layout.extra_files(kept, whole_mtp).items():
        writer.write_json(name, obj)
    for name in TOKENIZER_FILES:
        if (path := model_file(ckpt.dir, name)) is not None:
            writer.copy_file(path)

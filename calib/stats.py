"""Calibration statistics, collected once and reused by every format: per-linear and per-expert input absmax
(per tensor and per input channel), per-channel sums of squares with token counts (llama.cpp imatrix), expert load.

`StatsCollector` is the observer of `calib.stream.stream_forward`: forward pre-hooks on the layer's linears and router
record their inputs; the MoE block (`calib.moe.GroupedMoE`) hands each routed expert's inputs to its hooks as it runs
them: gate/up see the routed tokens, down their clamped-SwiGLU activation.

`CalibStats` reads the stored `stats.safetensors` (tensors keyed by checkpoint module names, settings and provenance
as JSON in the safetensors metadata).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from calib.data import open_source, resolve_settings
from calib.moe import HookSet
from convert.config import Step35Config
from convert.durable import WriteFailed, replace_durably
from convert.errors import BadInput
from convert.hashing import file_sha256
from convert.provenance import hub_blob_sha256
from convert.reopen import reopened, sizes

log = logging.getLogger("stepq.calib")

FORMAT_VERSION = 1
META_KEY = "stepq_calibration"
CHEAP_HASH_BYTES = 256 << 20  # shards up to this size are hashed for the source fingerprint; larger: size + mtime
_ACC_FIELDS = ("amax", "sumsq", "tokens")


# ---- collection ----------------------------------------------------------------------------------------------------

def _reduce(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[..., in] -> per-channel absmax (f32), sum of squares (f64), token count. Squares are summed in f32 per call
    (one micro-batch: pairwise summation keeps that exact enough) and accumulated in f64 across calls."""
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] == 0:
        return torch.zeros(x.shape[-1]), torch.zeros(x.shape[-1], dtype=torch.float64), 0
    return x.abs().amax(0).cpu(), x.square().sum(0).double().cpu(), x.shape[0]


class _Acc:
    """Running statistics of one module (`experts=None`) or of an expert stack (leading expert dim)."""

    def __init__(self, in_features: int, experts: int | None = None):
        lead = () if experts is None else (experts,)
        self.amax = torch.zeros(*lead, in_features)
        self.sumsq = torch.zeros(*lead, in_features, dtype=torch.float64)
        self.tokens = torch.zeros(lead, dtype=torch.int64)

    def add(self, reduced, expert: int | None = None) -> None:
        amax, sumsq, n = reduced
        if n == 0:
            return
        i = ... if expert is None else expert
        torch.maximum(self.amax[i], amax, out=self.amax[i])
        self.sumsq[i] += sumsq
        self.tokens[i] += n

    @classmethod
    def restored(cls, amax: torch.Tensor, sumsq: torch.Tensor, tokens: torch.Tensor) -> _Acc:
        acc = cls.__new__(cls)
        acc.amax, acc.sumsq, acc.tokens = amax, sumsq, tokens
        return acc

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.input_amax": self.amax.amax(-1), f"{module}.input_channel_amax": self.amax.clone(),
                f"{module}.input_sumsq": self.sumsq.float(), f"{module}.tokens": self.tokens.clone()}


class _ExpertStats:
    """`calib.moe.ExpertHook` of one MoE layer: gate/up see each expert's routed tokens, down their clamped SwiGLU
    (what the layer computes anyway). In all-experts mode every token goes through every expert instead, for the
    statistics only."""

    def __init__(self, collector: StatsCollector, base: str, layer: int):
        self.c, self.base, self.layer = collector, base, layer

    def routed(self, moe, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        c = self.c
        c.load[self.layer] += torch.bincount(top_k_index.flatten(), minlength=moe.num_experts).cpu()
        if not c.all_experts:
            return
        full = _reduce(x)
        for e in range(moe.num_experts):
            c._record(self.base + "gate_proj", x, e, full)
            c._record(self.base + "up_proj", x, e, full)
            c._record(self.base + "down_proj", moe.expert_activation(e, x), e)

    def expert_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self.c.all_experts:
            red = _reduce(x)
            self.c._record(self.base + "gate_proj", x, e, red)
            self.c._record(self.base + "up_proj", x, e, red)
        return x

    def down_input(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if not self.c.all_experts:
            self.c._record(self.base + "down_proj", h, e)
        return h


class StatsCollector:
    """Observer for `stream_forward`. all_experts=True also sends every token through every expert for statistics
    (the layer output still uses the real top-k routing; `expert_load` always counts the real routing)."""

    def __init__(self, config: Step35Config, all_experts: bool = False):
        self.config, self.all_experts = config, all_experts
        self.acc: dict[str, _Acc] = {}
        self.load: dict[int, torch.Tensor] = {}
        self._hooks = HookSet()
        self._last: tuple[torch.Tensor, tuple] | None = None
        self._taken: set[str] = set()  # state keys already handed to a checkpoint (or restored from one)

    def module_name(self, ref_name: str) -> str:
        """ReferenceModel module name -> checkpoint module name (`mlp.shared_experts.x` -> `share_expert.x`, ...)."""
        from calib.reference import (
            to_checkpoint_names,  # transformers' model code: seconds to import, only here
        )

        (name,) = to_checkpoint_names({ref_name + ".weight": None}, self.config.raw)
        return name.removesuffix(".weight")

    def _reduced(self, x: torch.Tensor):
        # q/k/v/g_proj (and dense gate/up) get the very same input tensor: reduce it once.
        if self._last is None or self._last[0] is not x:
            self._last = (x, _reduce(x))
        return self._last[1]

    def _record(self, name: str, x: torch.Tensor, expert: int | None = None, reduced=None) -> None:
        self.acc[name].add(reduced if reduced is not None else _reduce(x), expert)

    def attach(self, module: nn.Module, prefix: str, layer: int) -> None:
        from calib.moe import GroupedMoE

        for path, m in module.named_modules():
            if path.endswith("shared_head.output"):
                continue  # the stream reports MTP head inputs via head_input, logits or not
            if isinstance(m, nn.Linear):  # the router too (calib.moe.Router)
                name = self.module_name(prefix + path)
                self.acc.setdefault(name, _Acc(m.in_features))
                self._hooks.add(m.register_forward_pre_hook(
                    lambda mod, args, name=name: self.acc[name].add(self._reduced(args[0]))))
            elif isinstance(m, GroupedMoE):
                base = f"model.layers.{layer}.moe."
                e, h, i = m.num_experts, m.gate.in_features, self.config.moe_intermediate_size
                for proj, width in (("gate_proj", h), ("up_proj", h), ("down_proj", i)):
                    self.acc.setdefault(base + proj, _Acc(width, e))
                self.load.setdefault(layer, torch.zeros(e, dtype=torch.int64))
                self._hooks.add_expert_hook(m, _ExpertStats(self, base, layer))

    def detach(self, layer: int) -> None:
        self._hooks.remove()
        self._last = None

    def head_input(self, module: str, x: torch.Tensor) -> None:
        name = self.module_name(module)
        self.acc.setdefault(name, _Acc(x.shape[-1]))
        self._record(name, x)

    # -- per-layer checkpoints (calib.resume) -------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"{name}.{field}": getattr(acc, field) for name, acc in self.acc.items() for field in _ACC_FIELDS}
        state.update({f"model.layers.{layer}.moe.expert_load": load for layer, load in self.load.items()})
        return state

    def take_state(self) -> dict[str, torch.Tensor]:
        """The raw accumulators (and expert loads) that appeared since the last call: what the layer that just ran
        added. Every module is recorded within one layer (the lm_head's inputs right after the trunk), so they are
        final, and a layer's checkpoint stores them once."""
        new = {k: t for k, t in self._state().items() if k not in self._taken}
        self._taken.update(new)
        return new

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `take_state` gave (a resumed run, for the layers it does not run again)."""
        for module, fields in _by_module(state).items():
            if "expert_load" in fields:
                self.load[int(module.split(".")[2])] = fields["expert_load"]
            else:
                self.acc[module] = _Acc.restored(**fields)
        self._taken.update(state)

    def merge_state(self, state: dict[str, torch.Tensor]) -> None:
        """Add what a collector in another process recorded over other rows of the same layer (calib.distributed):
        maxima, sums and counts, in the order the caller merges them."""
        for module, fields in _by_module(state).items():
            if "expert_load" in fields:
                layer = int(module.split(".")[2])
                self.load[layer] = self.load[layer] + fields["expert_load"] if layer in self.load else \
                    fields["expert_load"].clone()
            elif module in self.acc:
                acc = self.acc[module]
                torch.maximum(acc.amax, fields["amax"], out=acc.amax)
                acc.sumsq += fields["sumsq"]
                acc.tokens += fields["tokens"]
            else:  # the first shard: its values, as zeros plus them would be
                self.acc[module] = _Acc.restored(**{f: t.clone() for f, t in fields.items()})

    def result(self) -> tuple[dict[str, torch.Tensor], dict]:
        """-> (tensors for stats.safetensors, summary for the metadata)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, acc in sorted(self.acc.items()):
            tensors.update(acc.tensors(name))
        without, never = {}, {}
        for layer, load in sorted(self.load.items()):
            tensors[f"model.layers.{layer}.moe.expert_load"] = load.clone()
            seen = self.acc[f"model.layers.{layer}.moe.gate_proj"].tokens
            without[str(layer)] = [int(e) for e in (seen == 0).nonzero().flatten()]
            never[str(layer)] = [int(e) for e in (load == 0).nonzero().flatten()]
        return tensors, {"experts_without_tokens": without, "experts_never_routed": never}


def _by_module(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`take_state`'s flat keys (`module.field`) grouped by module."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, field = key.rsplit(".", 1)
        by_module.setdefault(module, {})[field] = t
    return by_module


# ---- provenance ------------------------------------------------------------------------------------------------------

def _shard_identity(path: Path) -> dict:
    st = path.stat()
    cheap = st.st_size <= CHEAP_HASH_BYTES or hub_blob_sha256(path) is not None  # a Hub blob's name is its hash
    return {"size": st.st_size, "sha256": file_sha256(path)} if cheap else {"size": st.st_size,
                                                                              "mtime_ns": st.st_mtime_ns}


def model_fingerprint(model_dir: str | Path) -> dict:
    """Source identity: config.json sha256 and every shard's size (+ sha256 when cheap: small or a Hub cache blob,
    else mtime), so retrained weights of the same shapes do not reuse stale statistics."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    return {"path": str(model_dir.resolve()), "config_sha256": file_sha256(cfg) if cfg.is_file() else None,
            "shards": {p.name: _shard_identity(p) for p in sorted(model_dir.glob("*.safetensors"))}}


# ---- the store -------------------------------------------------------------------------------------------------------

def save_stats(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomic (`replace_durably`). A failed write raises WriteFailed and
    leaves nothing behind (the caller says what else it keeps)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
        os.chmod(tmp, 0o644)  # safetensors creates its files 0600; statistics are shared like artifacts
        replace_durably(tmp, path)
    except OSError as e:  # disk full, file size limit: one line, and no half-written file left behind
        raise WriteFailed(f"{path}: cannot write the statistics file ({e.strerror or e})")
    except SafetensorError as e:  # how safetensors reports a failed write ("I/O error: File too large")
        raise WriteFailed(f"{path}: cannot write the statistics file ({str(e).splitlines()[0]})")
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _LazyTensors:
    """Tensors of a statistics file read on first access (the real model's file is ~1 GB; a quantize run needs
    mostly the 0-dim and [E] absmax entries)."""

    def __init__(self, f):
        self._f, self._cache = f, {}
        self._keys = set(f.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self._f.get_tensor(key)
        return self._cache[key]

    def keys(self):
        return sorted(self._keys)


class CalibStats:
    """A loaded `stats.safetensors`. Module names are checkpoint module paths (the tensor name without `.weight`),
    e.g. `model.layers.0.self_attn.q_proj`; expert stacks (`model.layers.2.moe.down_proj`) take `expert=e`."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], meta: dict):
        self.path, self.tensors, self.meta = path, tensors, meta
        self._sha256: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> CalibStats:
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"{path}: statistics file not found (run `stepq calibrate`)")
        try:
            f = safe_open(path, "pt")
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = _LazyTensors(f)
        except (KeyError, json.JSONDecodeError):
            raise BadInput(f"{path}: not a stepq statistics file (no {META_KEY} metadata)")
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise BadInput(f"{path}: unreadable statistics file ({e.__class__.__name__}: {str(e).splitlines()[0]})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise BadInput(f"{path}: statistics format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        return cls(path, tensors, meta)

    def __reduce__(self):
        """Pickled by name (a Ray task): the receiving process opens the file itself (convert.reopen)."""
        path = self.path.resolve()
        return reopened, ("stats", load_stats, sizes([path]), str(path))

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def _get(self, module: str, what: str, expert: int | None) -> torch.Tensor:
        key = f"{module}.{what}"
        if key not in self.tensors:
            raise BadInput(f"{self.path}: no statistics for module {module}")
        t = self.tensors[key]
        stacked = t.dim() == (1 if what in ("input_amax", "tokens") else 2)
        if expert is None:
            # a stack asked for as a whole: the max (or sum) over its experts
            return (t.sum(0) if what in ("tokens", "input_sumsq") else t.amax(0)) if stacked else t
        if not stacked or not 0 <= expert < t.shape[0]:
            raise BadInput(f"{self.path}: module {module} has no expert {expert} statistics")
        return t[expert]

    def modules(self) -> list[str]:
        return sorted(k.removesuffix(".input_amax") for k in self.tensors.keys() if k.endswith(".input_amax"))

    def input_amax(self, module: str, expert: int | None = None) -> torch.Tensor:
        return self._get(module, "input_amax", expert).float()

    def channel_amax(self, module: str, expert: int | None = None) -> torch.Tensor:
        return self._get(module, "input_channel_amax", expert)

    def channel_sumsq(self, module: str, expert: int | None = None) -> torch.Tensor:
        return self._get(module, "input_sumsq", expert)

    def tokens(self, module: str, expert: int | None = None) -> int:
        return int(self._get(module, "tokens", expert))

    def expert_load(self, layer: int) -> torch.Tensor:
        key = f"model.layers.{layer}.moe.expert_load"
        if key not in self.tensors:
            raise BadInput(f"{self.path}: no expert load for layer {layer} (not a MoE layer?)")
        return self.tensors[key]

    def experts_without_tokens(self, layer: int) -> list[int]:
        return list(self.meta["experts_without_tokens"].get(str(layer), []))

    def check_source(self, model_dir) -> None:
        """BadInput when this file was computed from another model: another config.json, or shards that differ in
        name, size or (where both sides know it) sha256. A shard known only by its mtime may have been copied, so a
        differing mtime only warns."""
        src, mine = self.meta.get("source") or {}, model_fingerprint(model_dir)
        where = f"{self.path}: statistics computed from another model"
        if src.get("config_sha256") != mine["config_sha256"]:
            raise BadInput(f"{where} (config.json differs from {Path(model_dir) / 'config.json'}; "
                           f"computed from {src.get('path', '?')})")
        theirs = src.get("shards") or {}
        if sorted(theirs) != sorted(mine["shards"]):
            raise BadInput(f"{where} (shards {sorted(theirs)} vs {sorted(mine['shards'])} in {model_dir})")
        for name, ident in mine["shards"].items():
            other = theirs[name]
            if other.get("size") != ident["size"] or ("sha256" in other and "sha256" in ident
                                                      and other["sha256"] != ident["sha256"]):
                raise BadInput(f"{where} ({Path(model_dir) / name} has other contents)")
            if "mtime_ns" in other and "mtime_ns" in ident and other["mtime_ns"] != ident["mtime_ns"]:
                log.warning("%s: %s changed on disk since calibration (same size); using the statistics anyway",
                            self.path, Path(model_dir) / name)

    def matches(self, model_dir, dataset: str | None, n: int | None, seq_len: int | None, seed: int,
                all_experts: bool, dtype: str = "bfloat16") -> bool:
        """True when this file was computed from the same source weights, dataset contents and settings (defaults
        resolved as `stepq calibrate` resolves them) in the same compute dtype, so a quantize run can reuse it."""
        try:
            dataset, n, seq_len = resolve_settings(model_dir, dataset, n, seq_len)
            ds = open_source(dataset).fingerprint()
        except BadInput:
            return False
        m, mine = self.meta, model_fingerprint(model_dir)
        src, d = m.get("source", {}), m.get("dataset", {})
        same_data = (ds["sha256"] == d.get("sha256")) if ds["kind"] == "local" else (
            d.get("kind") == "hub" and ds["id"] == d.get("id"))
        return (same_data and src.get("config_sha256") == mine["config_sha256"]
                and src.get("shards") == mine["shards"] and (m.get("n"), m.get("seq_len"), m.get("seed"),
                                                             m.get("all_experts"), m.get("compute_dtype"))
                == (n, seq_len, seed, all_experts, dtype))


def load_stats(path: str | Path) -> CalibStats:
    """CalibStats.load as a module-level function: pickled by reference (a classmethod would go by value)."""
    return CalibStats.load(path)

"""GPTQ in the layer-streamed forward, sequential as llm-compressor's sequential pipeline: each layer is calibrated on
the outputs of the layers before it as quantized, its linears and routed experts quantized with llm-compressor's GPTQ
(quant.gptq), then run once more, quantized, to give the next layer its input.

Per layer (`GptqPass.run_layer`, driven by `calib.stream.stream_forward`):
1. Hessians: every quantized linear's input (one per fused group: q/k/v, gate/up share theirs) and every routed
   expert's, from exactly its routed tokens (gate/up) and its clamped SwiGLU (down), accumulated in fp32 with
   llm-compressor's `accumulate_hessian`. The real model's 288 experts would need ~20 GB of Hessians per layer, so
   the experts are taken in chunks that fit `hessian_bytes`, one forward pass of the layer per chunk (the first
   pass also collects the dense linears'): memory stays bounded at the price of running the layer again.
2. Grids: the layout's own scales (`layout.grids`: round-to-nearest, or the scale search weighted by the Hessian's
   diagonal for `gptq+search`), with the format's ties (one NVFP4 global scale per fused group and per expert).
3. GPTQ on those grids; the layout encodes the result (`layout.linear(..., grids=)`), exactly the tensors the
   artifact will hold. They are the layer's checkpoint (`take_state`, calib.resume), read back by the export
   (convert.gptq_store).
4. The layer's weights are replaced by the quantized ones, decoded from those tensors, and the layer runs again.

An expert that saw fewer routed tokens than its input width has a rank-deficient Hessian: it is quantized as the
method's grid says without GPTQ (round-to-nearest, or the search), and recorded; so is one whose damped Hessian
llm-compressor could not factorize. A dense linear with too few tokens means the calibration set is too small:
bad input.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn
from tqdm import tqdm

from calib.moe import GroupedMoE, HookSet
from convert.errors import BadInput
from convert.gptq_store import RECORDS_KEY, row_key
from convert.safetensors_export import SourceReader, Unit, acts_of, importance_of, read_part
from quant.gptq import DEFAULT_SETTINGS, GptqSettings, add_to_hessian, empty_hessian, gptq_shared, normalized
from quant.roles import Role

log = logging.getLogger("stepq.gptq")

HESSIAN_BYTES = 8 << 30  # routed experts' Hessians held at once (fp32); more experts -> more passes per layer


class _Hessian:
    def __init__(self, columns: int, device):
        self.h, self.count = empty_hessian(columns, device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        add_to_hessian(self.h, self.count, x)
        self.tokens += x.shape[0]


class _ExpertHessians:
    """`calib.moe.ExpertHook`: the Hessians of the experts in this pass's chunk (gate/up share one per expert)."""

    def __init__(self, experts: range, gate_up: bool, down: bool, widths: tuple[int, int], device):
        self.experts = experts
        self.gate_up = {e: _Hessian(widths[0], device) for e in experts} if gate_up else {}
        self.down = {e: _Hessian(widths[1], device) for e in experts} if down else {}

    def expert_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if e in self.gate_up:
            self.gate_up[e].add(x)
        return x

    def down_input(self, e: int, h: torch.Tensor) -> torch.Tensor:
        if e in self.down:
            self.down[e].add(h)
        return h


class _Rows:
    """`read(stack)[e]` for layouts that store expert rows of 3-D stacks (decode_expert's default)."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str):
        self.tensors, self.name = tensors, name

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.tensors[row_key(self.name, e)][0]


class _QuantizedExperts:
    """`calib.moe.ExpertWeights` of a layer whose expert stacks GPTQ quantized: each expert decoded from the
    layer's output tensors when the layer runs; stacks the recipe keeps come from the original source."""

    def __init__(self, original, layout, tensors: dict[str, torch.Tensor], quantized: set[str], compute):
        self.original, self.layout, self.tensors, self.quantized = original, layout, tensors, quantized
        self.num_experts, self.compute = original.num_experts, compute

    def _read(self, name: str):
        return self.tensors[name] if name in self.tensors else _Rows(self.tensors, name)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        orig = self.original.expert(e)
        out = []
        for i, name in enumerate(self.original.names):
            stack = name.removesuffix(".weight")
            w = self.layout.decode_expert(self._read, stack, e) if stack in self.quantized else orig[i]
            out.append(w.to(self.compute.device))
        return tuple(out)


class GptqPass:
    """The stream's `LayerDriver` and the per-layer checkpoints' collector (`take_state`) for one GPTQ run."""

    def __init__(self, units: list[Unit], layout, src: SourceReader, settings: GptqSettings = DEFAULT_SETTINGS,
                 hessian_bytes: int = HESSIAN_BYTES, progress: bool = False):
        self.layout, self.src, self.settings, self.hessian_bytes = layout, src, settings, hessian_bytes
        self.progress = progress  # a bar over each layer's GPTQ pieces (a real MoE layer's take ~25 min on 2 cores)
        self.by_layer: dict[int, list[Unit]] = defaultdict(list)
        for u in units:
            if u.quantize:
                self.by_layer[u.members[0].info.layer].append(u)
        self.emitted: dict[str, torch.Tensor] = {}  # the running layer's output tensors (row_key -> tensor)
        self.records: list[dict] = []               # the running layer's per-module / per-expert method
        self.passes: dict[int, int] = {}            # layer -> forward passes it took

    # -- calib.resume collector ----------------------------------------------------------------------------------
    def take_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.emitted)
        if self.records:
            state[RECORDS_KEY] = torch.frombuffer(bytearray(json.dumps(self.records).encode()), dtype=torch.uint8)
        self.emitted, self.records = {}, []
        return state

    def restore_file(self, path) -> None:
        """A finished layer of an interrupted run: its tensors stay in their file, where the export reads them."""

    # -- calib.stream observer -----------------------------------------------------------------------------------
    def head_input(self, module: str, x: torch.Tensor) -> None:
        pass  # the output heads are never quantized

    def run_layer(self, module: nn.Module, prefix: str, layer: int, run) -> None:
        units = self.by_layer.get(layer, [])
        if not units:
            run("")
            return
        linears = self._linears(module, prefix)
        moe = next((m for m in module.modules() if isinstance(m, GroupedMoE)), None)
        dense = [u for u in units if not u.experts]
        stacks = [u for u in units if u.experts]
        chunks = self._expert_chunks(stacks, moe)
        bar = tqdm(total=len(dense) + len(stacks) * sum(map(len, chunks)), unit="piece", desc=f"layer {layer + 1} GPTQ",
                   disable=not self.progress, dynamic_ncols=True)
        for i, experts in enumerate(chunks):
            hooks = HookSet()
            dense_h = self._hook_dense(dense, linears, hooks) if i == 0 else {}
            expert_h = None
            if experts:
                roles = {t.info.role for u in stacks for t in u.members}
                expert_h = _ExpertHessians(experts, Role.EXPERTS_GATE in roles, Role.EXPERTS_DOWN in roles,
                                           (moe.gate.in_features, self.src.ckpt.config.moe_intermediate_size),
                                           moe.gate.weight.device)
                hooks.add_expert_hook(moe, expert_h)
            run(f" GPTQ Hessians {i + 1}/{len(chunks)}")
            hooks.remove()
            for u in dense if i == 0 else []:  # the first pass collected their Hessians
                self._quantize(u, None, dense_h[u.id])
                bar.update()
            for u in stacks:
                for e in experts:
                    h = expert_h.down if u.members[0].info.role == Role.EXPERTS_DOWN else expert_h.gate_up
                    self._quantize(u, e, h.get(e))
                    bar.update()
            del dense_h, expert_h
        bar.close()
        self.passes[layer] = len(chunks) + 1
        self._swap(module, linears, moe, dense, stacks)
        # Weights only: propagating with the engine's activation quantization too (W4A4) measured no better on the
        # fixture (mean KLD 0.00501 vs 0.00479).
        run(" quantized")

    # -- helpers -------------------------------------------------------------------------------------------------
    def _linears(self, module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
        from calib.reference import to_checkpoint_names  # transformers' model code: seconds to import

        raw = self.src.ckpt.config.raw
        out = {}
        for path, m in module.named_modules():
            if isinstance(m, nn.Linear) and not path.endswith("shared_head.output"):
                (name,) = to_checkpoint_names({f"{prefix}{path}.weight": None}, raw)
                out[name.removesuffix(".weight")] = m
        return out

    def _expert_chunks(self, stacks: list[Unit], moe) -> list[range]:
        """The experts whose Hessians one pass collects: as many as fit `hessian_bytes`; one pass when none."""
        if not stacks or moe is None:
            return [range(0)]
        per_expert = sum(4 * t.entry.shape[-1] ** 2 for u in stacks for t in u.members[:1])
        n = moe.num_experts
        size = max(1, min(n, self.hessian_bytes // max(per_expert, 1)))
        return [range(s, min(n, s + size)) for s in range(0, n, size)]

    def _hook_dense(self, dense: list[Unit], linears: dict[str, nn.Linear], hooks: HookSet) -> dict[str, _Hessian]:
        out = {}
        for u in dense:
            module = u.members[0].info.module
            lin = linears.get(module)
            if lin is None:
                raise BadInput(f"{self.src.ckpt.dir}: GPTQ: no linear runs {module} in the layer-streamed forward")
            h = out[u.id] = _Hessian(lin.in_features, lin.weight.device)
            hooks.add(lin.register_forward_pre_hook(lambda mod, args, h=h: h.add(args[0])))
        return out

    def _quantize(self, unit: Unit, expert: int | None, h: _Hessian | None) -> None:
        """One piece (a fused group, or one expert of it): grids, GPTQ, the layout's tensors -> self.emitted."""
        src, layout = self.src, self.layout
        # in their own dtype: the grids round scales through it, as round-to-nearest and compressed-tensors do
        ws = [src.checked(t, w) for t, w in zip(unit.members, read_part(src, unit, expert))]
        modules = [t.info.module for t in unit.members]
        acts = acts_of(src, unit, expert)
        columns = ws[0].shape[-1]
        record = {"module": "+".join(modules), "tokens": 0 if h is None else h.tokens}
        if expert is not None:
            record["expert"] = expert
        hessian = None
        if h is not None and h.tokens >= columns:
            hessian = normalized(h.h, h.count).cpu()
        elif expert is None:
            raise BadInput(f"{modules[0]}: GPTQ needs at least {columns} calibration tokens for its {columns}x{columns}"
                           f" Hessian, the calibration set gave {record['tokens']}: use more samples (--num-samples)")
        # the scale search weighs channels by the Hessian's diagonal (mean squared input); without one, as the export
        importance = importance_of(src, unit, expert, layout)
        if layout.searches and hessian is not None:
            importance = [hessian.diagonal().clone()] * len(ws)
        emit = (lambda w, grids=None: layout.linear(modules, w, acts, importance, grids)) if expert is None else \
            (lambda w, grids=None: layout.experts(modules, expert, w, acts, importance, grids))
        if hessian is None:
            record["method"] = "grid only: " + ("no routed tokens" if record["tokens"] == 0 else
                                                f"fewer routed tokens than its {columns} input channels")
            out = list(emit(ws))
        else:
            grids = layout.grids(ws, acts, importance)
            q, losses, fallback = gptq_shared(ws, hessian, grids, self.settings)
            record["method"] = "grid only: Hessian not positive definite" if fallback else "gptq"
            record["loss"] = float(losses)
            out = list(emit(q, grids))
        self.records.append(record)
        for name, t, row in out:
            self.emitted[row_key(name, row)] = t.clone()  # fused members share their scale tensors

    def _swap(self, module: nn.Module, linears: dict[str, nn.Linear], moe, dense: list[Unit],
              stacks: list[Unit]) -> None:
        """The layer runs on from here with its quantized weights (decoded from the tensors the artifact gets)."""
        tensors = self.emitted
        for u in dense:
            for t in u.members:
                lin = linears[t.info.module]
                w = self.layout.decode_linear(lambda n: tensors[n], t.info.module)
                lin.weight = nn.Parameter(w.to(lin.weight.device), requires_grad=False)
        if stacks:
            quantized = {t.info.module for u in stacks for t in u.members}
            moe.experts = _QuantizedExperts(moe.experts, self.layout, tensors, quantized, moe.compute)


def run_gptq(ckpt, units: list[Unit], layout, stats, folder, *, compute, settings: GptqSettings = DEFAULT_SETTINGS,
             hessian_bytes: int = HESSIAN_BYTES, force: bool = False, progress: bool = True,
             extra_key: dict | None = None) -> tuple[str, dict]:
    """The GPTQ pass over the calibration samples the statistics `stats` were computed on; every layer's output
    tensors land in `folder` (per-layer checkpoints, calib.resume: a re-run with the same key continues after the
    last finished layer, a finished pass is reused whole). -> (the run's key, a summary for the provenance)."""
    from calib.data import load_calibration
    from calib.resume import LayerCheckpoints, run_key
    from calib.stats import model_fingerprint
    from calib.stream import SPILL_BYTES, micro_batch_tokens_for, stream_forward
    from convert.provenance import digest

    t0 = time.time()
    meta = stats.meta
    data = load_calibration(ckpt.dir, meta["dataset"]["id"], meta["n"], meta["seq_len"], meta["seed"], images=True)
    if data.dataset != meta["dataset"]:
        raise BadInput(f"{meta['dataset']['id']}: changed since the statistics {stats.path} were computed from it "
                       f"(recalibrate: stepq calibrate --force)")
    mbt = micro_batch_tokens_for(ckpt.config, meta["seq_len"])
    key = digest({"calibration": run_key(model_fingerprint(ckpt.dir), data, False, compute, SPILL_BYTES, mbt),
                  "statistics_sha256": stats.sha256, "layout": type(layout).__name__, "method": layout.method,
                  "gptq": settings.to_dict(), **(extra_key or {})})
    progress = progress and sys.stderr.isatty()  # bars on terminals, not in logs
    driver = GptqPass(units, layout, SourceReader(ckpt, stats=stats), settings, hessian_bytes, progress)
    checkpoints = LayerCheckpoints(folder)
    checkpoints.open(key, driver, force)
    stream_forward(ckpt, data.ids, driver, compute=compute, micro_batch_tokens=mbt, tmp_dir=str(checkpoints.dir),
                   progress=progress, checkpoints=checkpoints, images=data.images)
    return key, {"settings": settings.to_dict(), "hessian_bytes": hessian_bytes, "compute": compute.label,
                 "forward_passes_per_layer": {str(k): v for k, v in sorted(driver.passes.items())},
                 "run_s": round(time.time() - t0, 3)}

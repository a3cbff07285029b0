"""Sensitivity: the KLD cost of quantizing each (layer, role group) ALONE, everything else BF16, against the BF16 model
on the calibration tokens.

Each candidate's tensors go through the scheme's own layout exactly as the export writes them
(`convert.safetensors_export.emit`: round to nearest, fused groups sharing their global scales, the calibrated input
scales of the statistics file), are read back as an artifact is (`decode_*`), and run with the engine's input
quantization hooked on exactly those modules (`eval.forward.InputQuantizer`: W4A4 measured as W4A4). The forward is
`calib.reference.ReferenceModel` in float32, whole in memory: every trunk layer's input is computed once, and a
candidate in layer L runs layers L.. only, with a copy of layer L holding the quantized weights.

Cost: the whole model in float32 (plus the load's transient copy), every trunk layer's input [N, T, H] and two
[N, T, V] logit tensors, and per candidate one forward from its layer on (half a forward on average). On the bundled
fixture that is ~0.4 GB and about a second per candidate. Step-3.5-Flash would need ~800 GB for the float32 weights
alone and ~270 candidates (45 layers x 6 role groups) x half a forward over the calibration set, so
`stepq sensitivity` refuses a model that does not fit in memory (stepq/sensitivity.py `check_memory`). A
layer-streamed version would keep each layer's input on disk (1M calibration tokens x 4096 x 2 B = 8 GB per layer)
and stream the layers after the candidate's: GPU-node hours, not built.

MTP layers are not candidates: the trunk's logits do not depend on them, and recipes keep them BF16 by default.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib.reference import ReferenceModel, from_checkpoint_names
from convert.checkpoint import Checkpoint
from convert.safetensors_export import SourceReader, Unit, emit
from eval.forward import InputQuantizer
from eval.metrics import PositionSink
from quant.recipe import Recipe
from quant.roles import Role, fused_group


@dataclass(frozen=True)
class RoleGroup:
    """Roles measured together. `keepable`: a unit a recipe can keep BF16 by itself (the routed experts' halves
    are measured to show where their error comes from, but vLLM runs gate, up and down as one module)."""

    name: str
    roles: tuple[Role, ...]
    keepable: bool = True


ROLE_GROUPS = (
    RoleGroup("attn_qkv", (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_GATE)),  # g_proj when quantized
    RoleGroup("attn_o", (Role.ATTN_O,)),
    RoleGroup("mlp_gate_up", (Role.MLP_GATE, Role.MLP_UP)),
    RoleGroup("mlp_down", (Role.MLP_DOWN,)),
    RoleGroup("shared_gate_up", (Role.SHARED_GATE, Role.SHARED_UP)),
    RoleGroup("shared_down", (Role.SHARED_DOWN,)),
    RoleGroup("experts_gate_up", (Role.EXPERTS_GATE, Role.EXPERTS_UP), keepable=False),
    RoleGroup("experts_down", (Role.EXPERTS_DOWN,), keepable=False),
    RoleGroup("experts", (Role.EXPERTS_GATE, Role.EXPERTS_UP, Role.EXPERTS_DOWN)),
)
# Meta-device reads never consult the statistics, only whether there are any (SourceReader.act): sizes are
# planned before calibrating.
_SIZING_STATS = object()


@dataclass
class Candidate:
    """One (layer, role group) the recipe quantizes; sizes as the artifact stores them."""

    layer: int
    group: str
    keepable: bool
    roles: list[str]
    tensors: list[str]        # checkpoint names
    params: int               # weights in those tensors
    bf16_bytes: int
    quantized_bytes: int = 0  # every output tensor the layout writes for them (codes, scales, input scales)
    figures: dict = field(default_factory=dict)  # kld_mean, kld_p99, top1

    @property
    def bytes_saved(self) -> int:
        return self.bf16_bytes - self.quantized_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes_saved": self.bytes_saved}


def candidates(ckpt: Checkpoint, recipe: Recipe, layout) -> list[Candidate]:
    """Every (trunk layer, role group) whose roles the recipe quantizes, sized with a meta-device dry run."""
    by_layer: dict[int, dict[Role, str]] = {}
    for t in ckpt:
        if t.info.layer is not None and not t.info.mtp:
            by_layer.setdefault(t.info.layer, {})[t.info.role] = t.info.name
    meta = SourceReader(ckpt, meta=True, stats=_SIZING_STATS if layout.static_activations else None)
    out = []
    for layer in sorted(by_layer):
        present = by_layer[layer]
        for g in ROLE_GROUPS:
            roles = [r for r in g.roles if r in present and recipe.decide(r, False).quantize]
            if not roles:
                continue
            names = [present[r] for r in roles]
            entries = [ckpt.tensors[n].entry for n in names]
            c = Candidate(layer, g.name, g.keepable, [str(r) for r in roles], names,
                          sum(math.prod(e.shape) for e in entries), sum(e.nbytes for e in entries))
            c.quantized_bytes = sum(t.numel() * t.element_size() for u in units(ckpt, c) for _, t, _ in emit(u, layout, meta))
            out.append(c)
    return out


def units(ckpt: Checkpoint, c: Candidate) -> list[Unit]:
    """The candidate's tensors as the export groups them: fused groups together, members in the engines' order."""
    groups: dict[tuple, list] = {}
    for name in c.tensors:
        t = ckpt.tensors[name]
        groups.setdefault(fused_group(t.info.role), []).append(t)
    return [Unit(sorted(ms, key=lambda t: g.index(t.info.role)), True, "sensitivity") for g, ms in groups.items()]


class QuantizedGroup:
    """A candidate's tensors quantized in memory, read back as `convert.artifact.ArtifactReader` reads an artifact:
    `stored`, `decisions`, `layout` (what `InputQuantizer` uses) and `read` (dequantized, float32)."""

    def __init__(self, ckpt: Checkpoint, c: Candidate, layout, src: SourceReader):
        self.layout, self.ckpt = layout, ckpt
        self.decisions = {n: {"action": "quantized"} for n in c.tensors}
        rows: dict[str, list[torch.Tensor]] = {}
        self._stored: dict[str, torch.Tensor] = {}
        for u in units(ckpt, c):
            for name, t, row in emit(u, layout, src):
                if row is None:
                    self._stored[name] = t
                else:  # one expert's slice of a 3-D output stack, in expert order
                    rows.setdefault(name, []).append(t)
        self._stored.update({name: torch.cat(parts) for name, parts in rows.items()})

    def stored(self, name: str) -> torch.Tensor:
        return self._stored[name]

    def read(self, name: str) -> torch.Tensor:
        shape = self.ckpt.tensors[name].entry.shape
        module = name.removesuffix(".weight")
        if len(shape) == 3:  # a routed-expert stack
            return self.layout.decode_experts(self.stored, module, shape[0])
        return self.layout.decode_linear(self.stored, module)


@torch.no_grad()
def measure(ckpt: Checkpoint, cands: list[Candidate], layout, stats, ids: torch.Tensor, progress: bool = True) -> None:
    """Fill each candidate's `figures`: KLD mean and p99 (nats per position) and top-1 agreement of the trunk's
    next-token distribution, the candidate quantized alone vs BF16."""
    raw = ckpt.config.raw
    model = ReferenceModel(raw)
    model.load_checkpoint_tensors({n: ckpt.read(n).float() for n in ckpt.tensors})
    model.float().eval()
    inputs: list[torch.Tensor] = []
    hidden = model.trunk_from(model.model.embed_tokens(ids), 0, layer_inputs=inputs)
    ref = F.log_softmax(model.lm_head(model.model.norm(hidden)).float(), -1).numpy()  # [N, T, V]
    del hidden
    src = SourceReader(ckpt, stats=stats)
    for c in tqdm(cands, desc="sensitivity", unit="candidate", disable=None if progress else True,
                  dynamic_ncols=True):
        group = QuantizedGroup(ckpt, c, layout, src)
        layer = _with_weights(model, c, group, raw)
        quantizer = InputQuantizer(group, raw)
        quantizer.attach(layer, f"model.layers.{c.layer}.", c.layer)
        x = model.trunk_from(inputs[c.layer], c.layer, replace={c.layer: layer})
        c.figures = _figures(ref, model.lm_head(model.model.norm(x)), ids)
        quantizer.detach(c.layer)


def _with_weights(model: ReferenceModel, c: Candidate, group: QuantizedGroup, raw: dict):
    """A copy of the candidate's layer with its tensors replaced by their quantize-dequantize."""
    layer = copy.deepcopy(model.model.layers[c.layer])
    prefix = f"model.layers.{c.layer}."
    for name, w in from_checkpoint_names({n: group.read(n) for n in c.tensors}, raw).items():
        layer.get_parameter(name.removeprefix(prefix)).copy_(w)
    return layer


def _figures(ref_logprobs: np.ndarray, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """KL(BF16 || candidate) per position and top-1 agreement, as the eval computes them (eval.metrics)."""
    sink = PositionSink(ref_logprobs, ids, depths=0)
    for row in range(logits.shape[0]):
        sink.trunk(row, 0, logits[row])
    pos = sink.positions()
    kl = pos.kl.reshape(-1).double()
    return {"kld_mean": kl.mean().item(), "kld_p99": float(np.quantile(kl.numpy(), 0.99)),
            "top1": pos.top1.double().mean().item()}


def write_heatmap(cands: list[Candidate], path: Path, title: str) -> None:
    """Layer x role group, colour = mean KLD (log scale), each cell annotated; blank where a layer has no such
    group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layers = sorted({c.layer for c in cands})
    groups = [g.name for g in ROLE_GROUPS if any(c.group == g.name for c in cands)]
    grid = np.full((len(layers), len(groups)), np.nan)
    for c in cands:
        grid[layers.index(c.layer), groups.index(c.group)] = c.figures["kld_mean"]
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.min() < positive.max() else None
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 2.5, 0.45 * len(layers) + 2))
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", interpolation="nearest", cmap="magma_r", norm=norm)
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            dark = v > 0 and (norm(v) if norm else 1.0) > 0.6  # the colour map runs light to dark
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set(xticks=range(len(groups)), yticks=range(len(layers)), yticklabels=layers, ylabel="layer", title=title)
    ax.set_xticklabels(groups, rotation=35, ha="right")
    fig.colorbar(im, ax=ax, label="KLD mean (nats), quantized alone")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

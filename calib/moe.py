"""The MoE block of the layer-streamed forward: fp32 routing as the engines do it, tokens grouped by expert, one GEMM
per projection per expert on exactly its tokens, the weights read one expert at a time.

transformers' `Step3p7SparseMoeBlock` (5.17) holds the experts as a fused [E, 2I, H] gate/up parameter (a copy of the
checkpoint's two stacks) and loops over experts with a one-hot mask of all tokens per expert; on the real model's 288
experts that used well under a tenth of the machine. Here the experts come from an `ExpertWeights` source: views of
the memory-mapped BF16 stacks (calibration, the BF16 reference) or one expert decoded from an artifact's bytes (eval),
so no stack is ever copied or widened. The golden tests compare this block with transformers' in fp32.

Routing (reference/step35-checkpoint.md, vLLM step3p5.py): p = sigmoid(x Wg^T) in fp32; the top-k of p + router_bias
choose the experts (the bias never weights them); weights = the chosen p, renormalised to sum 1 when
`norm_expert_weight`, times `moe_router_scaling_factor`. The SwiGLU clamp is the layer's `swiglu_limits` entry (0 or
absent: none); the shared expert (an ordinary MLP with its own `swiglu_limits_shared`) sees every token.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from calib.compute import Compute, gemm, on_device


class ExpertWeights(Protocol):
    """One routed expert's weights: gate [I, H], up [I, H], down [H, I], any float dtype, any device."""

    num_experts: int

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ExpertHook(Protocol):
    """What statistics observers and input quantizers see of the routed experts (all optional):
    `routed(moe, x, top_k_index)` once per call; `expert_input(e, x)` -> the gate/up input of expert e (its tokens);
    `down_input(e, h)` -> the down projection's input (clamped SwiGLU). Both may return a changed tensor."""


class HookSet:
    """The hooks an observer put on one layer: torch forward hooks and `ExpertHook`s on MoE blocks, removed together
    when the layer has run."""

    def __init__(self):
        self._handles: list = []
        self._moe: list[tuple[GroupedMoE, object]] = []

    def add(self, handle) -> None:
        self._handles.append(handle)

    def add_expert_hook(self, moe: GroupedMoE, hook) -> None:
        moe.hooks.append(hook)
        self._moe.append((moe, hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for moe, hook in self._moe:
            moe.hooks.remove(hook)
        self._handles.clear()
        self._moe.clear()


class ExpertInputQuant:
    """`ExpertHook`: each routed expert's gate/up and down inputs quantized as the engine does; `fqs[e]` = (gate/up
    input quantizer, down input quantizer), either None."""

    def __init__(self, fqs):
        self.fqs = fqs

    def expert_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        fq = self.fqs[e][0]
        return fq(x) if fq else x

    def down_input(self, e: int, h: torch.Tensor) -> torch.Tensor:
        fq = self.fqs[e][1]
        return fq(h) if fq else h


class Router(nn.Linear):
    """The router as an nn.Linear (so observers record its input like any linear's), weight and bias in fp32;
    forward -> (top_k_index [N, k] int64, top_k_weights [N, k] fp32, not yet scaled)."""

    def __init__(self, hidden: int, experts: int, top_k: int, normalize: bool):
        super().__init__(hidden, experts, bias=False)
        self.top_k, self.normalize = top_k, normalize
        self.register_buffer("e_score_correction_bias", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        _, idx = torch.topk(p + self.e_score_correction_bias.float(), self.top_k, dim=-1, sorted=False)
        w = p.gather(1, idx)
        if self.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w


class GroupedMoE(nn.Module):
    """Drop-in for transformers' `Step3p7SparseMoeBlock`: state-dict names `gate.*` and `shared_experts.*` (the
    experts come from `experts`, set after loading)."""

    def __init__(self, router: Router, shared: nn.Module, limit: float | None, scaling: float, layer: int):
        super().__init__()
        self.gate, self.shared_experts = router, shared
        self.limit = limit or float("inf")
        self.routed_scaling_factor = scaling
        self.layer = layer
        self.experts: ExpertWeights | None = None
        self.compute: Compute | None = None
        self.hooks: list = []

    @property
    def num_experts(self) -> int:
        return self.gate.out_features

    def expert_activation(self, e: int, x: torch.Tensor, weights=None) -> torch.Tensor:
        """Clamped SwiGLU of expert e on x [n, H] -> [n, I] in x's dtype (the down projection's input)."""
        gate_w, up_w, _ = weights or self.experts.expert(e)
        c = self.compute
        g = gemm(x, gate_w, c, torch.float32)
        u = gemm(x, up_w, c, torch.float32)
        return (F.silu(g).clamp(max=self.limit) * u.clamp(min=-self.limit, max=self.limit)).to(x.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        shared = self.shared_experts(x)
        idx, w = self.gate(x)
        for h in self.hooks:
            if hasattr(h, "routed"):
                h.routed(self, x, idx)
        k = idx.shape[1]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, tokens in order within each
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start:start + n]
            start += n
            tokens = slots // k
            weights = self.experts.expert(e)
            xe = x[tokens]
            for h in self.hooks:
                if hasattr(h, "expert_input"):
                    xe = h.expert_input(e, xe)
            act = self.expert_activation(e, xe, weights)
            for h in self.hooks:
                if hasattr(h, "down_input"):
                    act = h.down_input(e, act)
            y = gemm(act, weights[2], self.compute, torch.float32)
            out.index_add_(0, tokens, y * w.flatten()[slots, None])
        out = (out * self.routed_scaling_factor).to(x.dtype) + shared
        return out.reshape(shape)


class StackExperts:
    """`ExpertWeights` over the three [E, ., .] stacks of a checkpoint (or artifact) layer: `read_expert(name, e)`
    gives one expert (a view of the memory map for a BF16 source, a decode of its own bytes for an artifact), moved to
    the device as needed. `preloaded` stacks (already on the device) are sliced instead."""

    def __init__(self, source, names: tuple[str, str, str], num_experts: int, compute: Compute,
                 preloaded: tuple[torch.Tensor, ...] | None = None):
        self.source, self.names, self.num_experts = source, names, num_experts
        self.compute, self.preloaded = compute, preloaded

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.preloaded is not None:
            return tuple(s[e] for s in self.preloaded)
        return tuple(on_device(self.source.read_expert(n, e), self.compute) for n in self.names)

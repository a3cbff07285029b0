"""One decoder layer of the layer-streamed forward, built over the checkpoint's own tensors, and the background
thread that builds the next layer while the current one runs.

A layer is transformers' `Step3p7DecoderLayer` (or `calib.reference.MtpLayer` for an MTP layer) built on the meta
device and given the checkpoint's tensors with `load_state_dict(assign=True)`, named by
`calib.reference.from_checkpoint_names`: on CPU they are views of the memory-mapped shards (no copy, not widened; a
layer costs no anonymous memory), on a GPU copies. Its MoE block is `calib.moe.GroupedMoE` over the expert stacks;
its linears run through `calib.compute.gemm`; attention and MLPs see bounded blocks of tokens.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from transformers.models.step3p7.modeling_step3p7 import Step3p7Attention, Step3p7DecoderLayer, Step3p7MLP

from calib.compute import ATTENTION_IMPL, Compute, in_token_blocks, on_device, register_attention, use_gemm_linears
from calib.moe import GroupedMoE, Router, StackExperts
from calib.reference import MtpLayer, from_checkpoint_names, text_config
from convert.checkpoint import Checkpoint
from quant.roles import EXPERT_ROLES, Role

BLOCK_TOKENS = 4096  # attention and dense MLPs run on at most this many tokens at a time


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _grouped_moe(config, layer: int, normalize: bool) -> GroupedMoE:
    limits = config.swiglu_limits
    router = Router(config.hidden_size, config.num_local_experts, config.num_experts_per_tok, normalize)
    return GroupedMoE(router, Step3p7MLP(config, layer, is_shared_expert=True),
                      (limits[layer] or None) if limits else None, config.moe_router_scaling_factor, layer)


def build_layer(ckpt: Checkpoint, layer: int, compute: Compute, heads: bool = False) -> tuple[nn.Module, str]:
    """One decoder layer (trunk) or MtpLayer (MTP head) over the checkpoint's tensors -> (module, name prefix).

    Weights are the checkpoint's own tensors (memory-map views on CPU; copies on a GPU), not widened; the router in
    fp32. Routed experts are read one at a time when the layer runs (`StackExperts`). `heads`: also load the MTP
    head's output projection (a vocabulary-sized matrix; only eval computes MTP logits)."""
    cfg = ckpt.config
    names = _layer_names(ckpt, layer, heads)
    experts = {ckpt.tensors[n].info.role: n for n in names if ckpt.tensors[n].info.role in EXPERT_ROLES}
    plain = {n: ckpt.read(n) for n in names if n not in experts.values()}
    tensors = from_checkpoint_names(plain, cfg.raw)
    register_attention()
    if cfg.is_mtp(layer):
        prefix = f"mtp.{layer - cfg.num_trunk_layers}."
        config = text_config(cfg.raw, with_mtp=True)
    else:
        prefix = f"model.layers.{layer}."
        config = text_config(cfg.raw)
    config._attn_implementation = ATTENTION_IMPL
    with torch.device("meta"):
        module = MtpLayer(config, layer) if cfg.is_mtp(layer) else Step3p7DecoderLayer(config, layer)
        block = module.mtp_block if cfg.is_mtp(layer) else module
        if experts:
            block.mlp = _grouped_moe(config, layer, bool(cfg.raw.get("norm_expert_weight", True)))
    state = _strip(tensors, prefix)
    for name, w in state.items():
        router = name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
        state[name] = on_device(w.float() if router else w, compute)  # engines route in fp32
    if cfg.is_mtp(layer) and not heads:
        module.transformer.shared_head.output = None
    module.load_state_dict(state, strict=True, assign=True)
    use_gemm_linears(module, compute)
    for m in module.modules():
        if isinstance(m, (Step3p7Attention, GroupedMoE)):
            m.compute = compute
        if isinstance(m, (Step3p7Attention, Step3p7MLP)):
            in_token_blocks(m, BLOCK_TOKENS)
    if experts:
        block.mlp.experts = StackExperts(
            ckpt, (experts[Role.EXPERTS_GATE], experts[Role.EXPERTS_UP], experts[Role.EXPERTS_DOWN]),
            cfg.num_experts, compute)
        if compute.device.type != "cpu":  # a GPU holds the layer's stacks (9 GB on the real model) while it runs
            block.mlp.experts.preloaded = tuple(on_device(ckpt.read(n), compute) for n in block.mlp.experts.names)
    return module.eval(), prefix


def _layer_names(ckpt: Checkpoint, layer: int, heads: bool) -> list[str]:
    """The layer's tensors, without an MTP head's output projection unless logits are wanted."""
    return [n for n, t in ckpt.tensors.items() if t.info.layer == layer and (heads or t.info.role != Role.MTP_HEAD)]


def prefetch(ckpt: Checkpoint, layer: int, heads: bool) -> None:
    """Ask the kernel to read `layer`'s bytes ahead (a memory-mapped source; other weight sources read on use)."""
    if hasattr(ckpt, "shards"):
        for n in _layer_names(ckpt, layer, heads):
            ckpt.shards[ckpt.tensors[n].shard].will_need(n)


class LayerPipeline:
    """Builds layers on one background thread, one ahead of the layer that runs: its bytes are read (CPU: read ahead
    by the kernel; GPU: copied to the device) while the current layer computes."""

    def __init__(self, ckpt, order: list[int], compute: Compute, heads: bool):
        self.ckpt, self.order, self.compute, self.heads = ckpt, order, compute, heads
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepq-layer")
        self.pending: dict[int, object] = {}
        self._ahead(0)

    def _ahead(self, pos: int) -> None:
        if pos < len(self.order):
            i = self.order[pos]
            self.pending[i] = self.pool.submit(self._build, i)

    def _build(self, i: int):
        prefetch(self.ckpt, i, self.heads)
        return build_layer(self.ckpt, i, self.compute, self.heads)

    def get(self, i: int) -> tuple[nn.Module, str]:
        built = self.pending.pop(i).result()
        self._ahead(self.order.index(i) + 1)
        return built

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pool.shutdown(wait=True)

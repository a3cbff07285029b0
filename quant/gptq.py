"""GPTQ with llm-compressor's own implementation, on the grids stepq's formats store.

llm-compressor 0.14 splits GPTQ into pure pieces this module calls unchanged: `accumulate_hessian` (2 X^T X summed
over calls; `prepare_batch` divides by the call count), `quantize_weight` (damping, Cholesky of the inverse Hessian,
activation ordering, the block-wise error propagation) on a batch of same-shape weights `[B, rows, cols]` with
their scales fixed beforehand. stepq fixes those scales itself (`Grid`): round-to-nearest's (bit-identical to
compressed-tensors' observers) or the scale search's, with the formats' ties (one NVFP4 global scale per fused
group and per expert, FP8 128x128 blocks), so what GPTQ chooses lies exactly on the grid the layout stores.
Tensors in, tensors out.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import asdict, dataclass
from functools import cache

import torch

from quant.constants import FP8_BLOCK, NVFP4_GROUP

# llm-compressor configures loguru when it is imported: it removes every loguru handler, adds its own on stdout and
# logs "No accelerator available! ..." (a CPU machine) and one INFO/METRIC line per module. Its own switch, read at
# that import, keeps it off stepq's output and leaves other handlers alone; `logger.disable("llmcompressor")` is not
# enough (the import calls `logger.enable("llmcompressor")`). LLM_COMPRESSOR_LOG_DISABLED=false brings it back.
# Switched off, it registers no "METRIC" level, which only its modifiers' CompressionLogger logs at (loguru then
# raises "Level 'METRIC' does not exist"); stepq calls `quantize_weight` directly, tests/quant/test_gptq.py adds it.
os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")

GRID_KINDS = ("nvfp4", "fp8_block", "fp8_channel", "fp8_tensor")


@dataclass(frozen=True)
class GptqSettings:
    """llm-compressor's `GPTQModifier` defaults: 128-column blocks, 1 % damping of the mean diagonal, columns in
    descending Hessian-diagonal order ("static"/"weight" activation ordering: no runtime cost, same format)."""

    block_size: int = 128
    dampening: float = 0.01
    actorder: str | None = "weight"

    def to_dict(self) -> dict:
        return {**asdict(self), "implementation": f"llmcompressor {library_version()} "
                "modifiers.gptq.gptq_quantize.quantize_weight"}


DEFAULT_SETTINGS = GptqSettings()


@dataclass
class Grid:
    """Where one weight's quantized values may lie, fixed before GPTQ runs. `kind`:
    nvfp4: `scale` FP8 [rows, cols/16], `global_scale` [1] (a divisor): value = code * scale / global_scale;
    fp8_block: `scale` f32 [ceil(rows/128), ceil(cols/128)] (vLLM's weight_scale_inv): value = code * scale;
    fp8_channel: `scale` [rows, 1]; fp8_tensor: `scale` [1]."""

    kind: str
    scale: torch.Tensor
    global_scale: torch.Tensor | None = None


def library_version() -> str:
    return importlib.metadata.version("llmcompressor")


@cache
def _shape_token(columns: int) -> torch.nn.Linear:
    """`accumulate_hessian` dispatches on the module's type only: a weightless stand-in with the input width."""
    return torch.nn.Linear(columns, 1, bias=False, device="meta")


def empty_hessian(columns: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H [cols, cols] fp32 zeros, sample count 0): what llm-compressor allocates per module."""
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION

    return torch.zeros(columns, columns, dtype=GPTQ_PRECISION, device=device), torch.zeros((), device=device)


def add_to_hessian(h: torch.Tensor, count: torch.Tensor, x: torch.Tensor) -> None:
    """Accumulate one batch of inputs `x [tokens, cols]` (one call = one sample, as llm-compressor's hook counts a
    2-D input) in place."""
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian

    if x.shape[0]:
        accumulate_hessian(x, _shape_token(x.shape[-1]), h, count)


def normalized(h: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """H / samples, as llm-compressor's `prepare_batch` hands it to `quantize_weight`."""
    return h / count.to(h.device)


def _quant_args(kind: str, actorder: str | None):
    from compressed_tensors.quantization import QuantizationArgs

    common = {"type": "float", "symmetric": True, "actorder": actorder}
    if kind == "nvfp4":
        return QuantizationArgs(num_bits=4, strategy="tensor_group", group_size=NVFP4_GROUP, **common)
    if kind == "fp8_block":
        return QuantizationArgs(num_bits=8, strategy="block", block_structure=[FP8_BLOCK, FP8_BLOCK], **common)
    if kind == "fp8_channel":
        return QuantizationArgs(num_bits=8, strategy="channel", **common)
    if kind == "fp8_tensor":
        return QuantizationArgs(num_bits=8, strategy="tensor", **common)
    raise ValueError(f"no GPTQ grid {kind!r} (known: {GRID_KINDS})")


def gptq(weights: list[torch.Tensor], hessians: list[torch.Tensor], grids: list[Grid],
         settings: GptqSettings = DEFAULT_SETTINGS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of same-shape weights `[rows, cols]` (one batch call of llm-compressor's `quantize_weight`), each with
    its normalized Hessian `[cols, cols]` and its grid (all of one kind).

    -> (quantized weights [B, rows, cols] float32, every value on its grid; losses [B]; rtn_fallback [B] bool:
    the Hessian could not be factorized even after damping and llm-compressor fell back to round-to-nearest)."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    kinds = {g.kind for g in grids}
    if len(kinds) != 1:
        raise ValueError(f"one GPTQ batch needs one grid kind, got {sorted(kinds)}")
    (kind,) = kinds
    w = torch.stack([x.to(torch.float32) for x in weights])
    h = torch.stack([x.to(torch.float32) for x in hessians])
    scale = torch.stack([g.scale.to(torch.float32) for g in grids])
    gs = torch.stack([g.global_scale.to(torch.float32).reshape(()) for g in grids]) if kind == "nvfp4" else None
    args = _quant_args(kind, settings.actorder)
    return quantize_weight(w, h, scale, torch.zeros_like(scale), gs, args, blocksize=settings.block_size,
                           percdamp=settings.dampening)


def _stacked_grid(grids: list[Grid], rows: list[int]) -> Grid | None:
    """One grid for the members' rows stacked, when their grids stack: NVFP4 and FP8 per-tensor members with one
    (tied) global / tensor scale, FP8 per-channel always, FP8 blocks when no block straddles two members."""
    kind = grids[0].kind
    if kind == "nvfp4" and all(torch.equal(g.global_scale, grids[0].global_scale) for g in grids):
        return Grid(kind, torch.cat([g.scale for g in grids]), grids[0].global_scale)
    if kind == "fp8_channel" or (kind == "fp8_block" and all(r % FP8_BLOCK == 0 for r in rows[:-1])):
        return Grid(kind, torch.cat([g.scale for g in grids]))
    if kind == "fp8_tensor" and all(torch.equal(g.scale, grids[0].scale) for g in grids):
        return grids[0]
    return None


def gptq_shared(weights: list[torch.Tensor], hessian: torch.Tensor, grids: list[Grid],
                settings: GptqSettings = DEFAULT_SETTINGS) -> tuple[list[torch.Tensor], float, bool]:
    """GPTQ of a fused group's members, which share one input and so one Hessian (q/k/v, gate/up), in ONE call of
    `quantize_weight` on their rows stacked: GPTQ updates each row on its own given the Hessian, so the result is
    the members' separate results, for one factorization and one pass over the columns instead of one per member.
    -> (quantized members, the sum of losses, whether llm-compressor fell back to round-to-nearest)."""
    rows = [w.shape[0] for w in weights]
    grid = _stacked_grid(grids, rows) if len(weights) > 1 else grids[0]
    if grid is None:  # members whose grids do not stack: one call each
        parts = [gptq([w], [hessian], [g], settings) for w, g in zip(weights, grids)]
        losses = sum(float(loss.sum()) for _, loss, _ in parts)
        return [q[0] for q, _, _ in parts], losses, any(bool(f.any()) for *_, f in parts)
    q, losses, fallback = gptq([torch.cat([w.to(torch.float32) for w in weights])], [hessian], [grid], settings)
    return list(q[0].split(rows)), float(losses.sum()), bool(fallback.any())

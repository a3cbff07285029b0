"""Where the layer-streamed forward runs and in what precision: one code path for CPU and GPU.

`Compute` holds the device, the activation dtype (bf16 by default: the rounding points of the engines) and the GEMM
dtype: the dtype both GEMM operands are cast to. On a GPU, and on CPUs with bf16 units (AMX, AVX512-BF16), that is
bf16 itself (fp32 accumulation inside the kernel). On other CPUs torch's bf16 GEMM is an emulation ~8x slower than
its fp32 GEMM (measured: 22 vs 180 GFLOP/s on a 2-core AVX2 EPYC), so the operands are widened to fp32, which gives
the same products (bf16 -> fp32 is exact) with fp32 accumulation: the numerics of a bf16 GEMM, at fp32 speed.

Weights are never widened as a whole: `GemmLinear` casts its weight per call, in row blocks, and the MoE widens one
expert at a time, so the memory-mapped BF16 checkpoint stays the only copy of the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from convert.errors import BadInput

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHT_BLOCK_BYTES = 256 << 20   # a weight is widened at most this many bytes at a time
SCORE_BYTES = 128 << 20          # attention scores of one query block (per sequence) stay below this
ATTENTION_IMPL = "stepq_chunked"


@lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16 (Linux /proc/cpuinfo): where torch's CPU bf16 GEMM runs natively."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype       # activations between operations
    gemm_dtype: torch.dtype  # GEMM operands

    @property
    def label(self) -> dict:
        return {"device": str(self.device), "dtype": _name(self.dtype), "gemm_dtype": _name(self.gemm_dtype)}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists here; BadInput (one line) otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device or "")
    if m is None:
        raise BadInput(f"--device {device}: unknown device (use auto, cpu, cuda or cuda:N)")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA GPU is available on this machine (torch {torch.__version__})")
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device("cuda", index)


def resolve(device: str = "auto", dtype: str = "bfloat16") -> Compute:
    """The `--device` / `--dtype` flags -> Compute; BadInput for a device or dtype that cannot run here."""
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise BadInput(f"--dtype {dtype}: use bfloat16 (default) or float32")
    act = DTYPES[dtype]
    if act == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadInput(f"--dtype bfloat16: {torch.cuda.get_device_name(dev)} has no bf16 support; use --dtype float32")
    native = dev.type == "cuda" or cpu_has_bf16_units()
    return Compute(dev, act, act if native else torch.float32)


def on_device(w: torch.Tensor, compute: Compute) -> torch.Tensor:
    """`w` on the device in its own dtype (a CPU view stays the view); GEMMs cast it as they need."""
    return w if w.device == compute.device else w.to(compute.device, non_blocking=True)


def widen(w: torch.Tensor, compute: Compute) -> torch.Tensor:
    """`w` on the device in the GEMM dtype (a view when it already is)."""
    return w.to(compute.device, compute.gemm_dtype, non_blocking=True)


def gemm(x: torch.Tensor, w: torch.Tensor, compute: Compute, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ w.T with operands in the GEMM dtype and fp32 accumulation; the weight is widened in row blocks (a whole
    lm_head widened at once would be 2 GB) -> [.., out] in `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or x.dtype
    xg = x.to(compute.gemm_dtype)
    if w.dtype == compute.gemm_dtype and w.device == x.device:
        return F.linear(xg, w).to(out_dtype)
    rows = max(1, WEIGHT_BLOCK_BYTES // (w.shape[1] * compute.gemm_dtype.itemsize))
    if rows >= w.shape[0]:
        return F.linear(xg, widen(w, compute)).to(out_dtype)
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=out_dtype, device=x.device)
    for r in range(0, w.shape[0], rows):
        out[..., r:r + rows] = F.linear(xg, widen(w[r:r + rows], compute))
    return out


class GemmLinear(nn.Linear):
    """nn.Linear running its GEMM through `gemm`: the weight stays as loaded (a view of the memory-mapped
    checkpoint on CPU). Observers hook it as any nn.Linear. `out_dtype` float32 keeps logits unrounded."""

    compute: Compute
    out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemm(x, self.weight, self.compute, self.out_dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def use_gemm_linears(module: nn.Module, compute: Compute) -> None:
    """Every plain nn.Linear of `module` runs through `gemm` (in place; the class changes, not the parameters)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = GemmLinear
            m.compute = compute


def in_token_blocks(module: nn.Module, max_tokens: int) -> None:
    """Run `module` (a Step3p7Attention: whole sequences; an MLP: any tokens) on at most `max_tokens` tokens per call,
    so its intermediates (a [tokens, 12288] fp32 query, a [tokens, 11264] dense-MLP activation on the real model)
    stay bounded while the micro-batch is sized for the expert GEMMs."""
    forward = module.forward

    def attention(hidden_states, *args, **kwargs):
        b, t = hidden_states.shape[:2]
        per = max(1, max_tokens // t)
        if b <= per:
            return forward(hidden_states, *args, **kwargs)
        return torch.cat([forward(hidden_states[i:i + per], *args, **kwargs)[0] for i in range(0, b, per)]), None

    def mlp(x):
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= max_tokens:
            return forward(x)
        return torch.cat([forward(flat[i:i + max_tokens]) for i in range(0, flat.shape[0], max_tokens)]).reshape(
            *x.shape[:-1], -1)

    module.forward = attention if hasattr(module, "q_proj") else mlp


def chunked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (registered as `stepq_chunked`): SDPA one sequence and one block of queries
    at a time, so the score memory stays below SCORE_BYTES whatever the micro-batch, in the GEMM dtype; a sliding
    window's block only reads the keys it can see. query [B, Hq, T, D], key/value [B, Hkv, T, D], attention_mask
    bool [1|B, 1, T, T] (True = attend) -> ([B, T, Hq, D], None)."""
    compute: Compute = module.compute
    b, hq, t, d = query.shape
    window = getattr(module, "sliding_window", None)
    block = max(1, SCORE_BYTES // (hq * t * 4))
    out = torch.empty(b, t, hq, d, dtype=query.dtype, device=query.device)
    g = compute.gemm_dtype
    for s in range(b):
        mask_s = attention_mask[min(s, attention_mask.shape[0] - 1), 0]
        for q0 in range(0, t, block):
            q1 = min(t, q0 + block)
            k0 = max(0, q0 - window + 1) if window else 0
            o = F.scaled_dot_product_attention(
                query[s:s + 1, :, q0:q1].to(g), key[s:s + 1, :, k0:q1].to(g), value[s:s + 1, :, k0:q1].to(g),
                attn_mask=mask_s[None, None, q0:q1, k0:q1], scale=scaling, enable_gqa=True)
            out[s, q0:q1] = o[0].transpose(0, 1).to(query.dtype)
    return out, None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPL, chunked_attention)

"""Shared pieces of the fast (numba) kernels: bit casts, BF16 and FP8 E4M3 rounding, and the row-chunk runner.

Why numba and not vectorized torch: the reference functions in quant/fp8.py and quant/nvfp4.py (and
compressed-tensors' own quantize + pack, which they reproduce) run a dozen full-tensor torch ops, each reading and
writing a float32 temporary of the whole matrix: memory-bound at ~15-60 Mparam/s per 2 cores (measured in
bench/convert_real.py), well below disk speed. A fused kernel reads each bf16 element once, keeps a 16-group or a
128-row band in cache, and writes only the packed output.

Why serial `nogil` kernels on a thread pool instead of `prange`: numba's default `workqueue` threading layer aborts
when two Python threads launch parallel kernels at once (an executor with prefetch threads, pytest-xdist); splitting
rows into chunks on our own pool has no such constraint and needs no TBB/OpenMP.

Exactness: no fastmath (IEEE division, no reassociation), `error_model="numpy"` (x/0 is inf as in torch, not a
Python exception), and every rounding step spelled out as torch performs it (see each kernel's docstring).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # numba is a declared dependency; without it every call takes the reference path
    import numba
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover
    numba = None

JIT = dict(nogil=True, cache=True, error_model="numpy", fastmath=False)

# Below this many elements a call runs inline: thread hand-off costs more than it saves.
MIN_CHUNK_ELEMENTS = 1 << 18


def available() -> bool:
    """Fast kernels usable: numba importable and not disabled with STEPQ_FAST=0 (a switch for bisecting)."""
    return numba is not None and os.environ.get("STEPQ_FAST", "1") != "0"


def eligible(*tensors: torch.Tensor) -> bool:
    """The fast path handles real (non-meta) CPU bf16 weights; anything else goes to the reference functions."""
    return available() and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and not t.requires_grad
                               for t in tensors)


def threads() -> int:
    env = os.environ.get("STEPQ_THREADS")
    if env:
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:  # two threads' first calls must not each build a pool
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="stepq-kernel")
        return _pool


def run_chunks(fn, n_items: int, elements_per_item: int, *args) -> int:
    """Run `fn(start, stop, *args) -> flag` over `[0, n_items)` split in contiguous chunks on all cores.

    Returns the OR of the chunks' flags (kernels report non-finite inputs that way). Chunks never wait on the pool,
    so calls from several threads at once cannot deadlock; more chunks than threads evens out a core shared with
    other processes.
    """
    n_threads = threads()
    total = n_items * elements_per_item
    if n_threads == 1 or total < 2 * MIN_CHUNK_ELEMENTS or n_items < 2:
        return int(fn(0, n_items, *args))
    n_chunks = min(n_items, 4 * n_threads, max(2, total // MIN_CHUNK_ELEMENTS))
    bounds = np.linspace(0, n_items, n_chunks + 1).astype(np.int64)
    futures = [_get_pool().submit(fn, int(a), int(b), *args) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    flag = 0
    for f in futures:
        flag |= int(f.result())
    return flag


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous bf16 tensor as a uint16 numpy array of its bits (zero-copy when already contiguous)."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


if numba is not None:

    @intrinsic
    def f32_as_u32(typingctx, x):
        """Reinterpret float32 bits as uint32 (an LLVM bitcast: free, vectorizable)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def u32_as_f32(typingctx, x):
        """Reinterpret the low 32 bits of an integer as float32 (numba widens uint32 arithmetic to 64 bits)."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            v = args[0]
            i32 = context.get_value_type(types.uint32)
            if x.bitwidth > 32:
                v = builder.trunc(v, i32)
            elif x.bitwidth < 32:
                v = builder.zext(v, i32)
            return builder.bitcast(v, context.get_value_type(types.float32))

        return types.float32(x), codegen

    _U16_MASK_HI = np.uint32(0xFFFF0000)
    _BF16_BIAS = np.uint32(0x7FFF)
    _ONE = np.uint32(1)

    @numba.njit(inline="always", **JIT)
    def bf16_to_f32(b):
        """uint16 bf16 bits -> float32 value (exact)."""
        return u32_as_f32(np.uint32(b) << np.uint32(16))

    @numba.njit(inline="always", **JIT)
    def round_bf16(v):
        """float32 -> nearest bf16, ties to even, returned as float32: c10::BFloat16's round_to_nearest_even for
        finite values (callers only pass finite values)."""
        u = f32_as_u32(v)
        u = u + _BF16_BIAS + ((u >> np.uint32(16)) & _ONE)
        return u32_as_f32(u & _U16_MASK_HI)

    _FP8_MIN_NORMAL_BITS = np.uint32(121 << 23)  # 2**-6 as float32 bits
    _FP8_DENORM_MAGIC = np.float32(16384.0)  # 2**14: adding it rounds to a multiple of 2**-9 (RNE)
    _FP8_DENORM_MAGIC_BITS = np.uint32(141 << 23)
    _FP8_EXP_REBIAS = np.uint32(120 << 23)  # (127 - 7) << 23
    _FP8_ROUND = np.uint32(0x7FFFF)
    _FP8_KEEP = np.uint32(0xFFF00000)
    _TWENTY = np.uint32(20)

    @numba.njit(inline="always", **JIT)
    def fp8_code_nonneg(v):
        """float32 v in [0, 448] -> (float8_e4m3fn code 0x00..0x7E, its float32 value), round to nearest even.

        The same steps as c10's fp8e4m3fn_from_fp32_value (what torch's `.to(float8_e4m3fn)` runs): subnormals
        by the magic-number addition, normals by adding half an ULP of the 3-bit mantissa plus the odd bit.
        Both are computed and one selected, so loops over elements stay branch-free and vectorize.
        """
        u = f32_as_u32(v)
        f = v + _FP8_DENORM_MAGIC
        sub_code = f32_as_u32(f) - _FP8_DENORM_MAGIC_BITS
        r = u + _FP8_ROUND + ((u >> _TWENTY) & _ONE)
        normal = u >= _FP8_MIN_NORMAL_BITS
        code = np.uint8((r - _FP8_EXP_REBIAS) >> _TWENTY) if normal else np.uint8(sub_code)
        value = u32_as_f32(r & _FP8_KEEP) if normal else f - _FP8_DENORM_MAGIC
        return code, value

    _FP8_MAX = np.float32(448.0)
    _ZERO = np.float32(0.0)
    _SEVEN = np.uint8(7)

    @numba.njit(inline="always", **JIT)
    def fp8_code(x):
        """float32 -> float8_e4m3fn code of clamp(x + 0.0, -448, 448), the quantizers' saturating `to_fp8(x + 0.0)`
        for non-NaN x. Sign bit iff x < 0: -0.0 gives 0x00 (the + 0.0), a negative value rounding to zero 0x80."""
        code, _ = fp8_code_nonneg(min(abs(x), _FP8_MAX))
        return code | (np.uint8(x < _ZERO) << _SEVEN)


    _EXP16 = np.uint16(0x7F80)

    @numba.njit(**JIT)
    def _nonfinite_rows(r0, r1, w):
        """1 if any bf16 in rows [r0, r1) of `w` (uint16 [R, C]) is Inf or NaN (exponent bits all ones)."""
        bad = np.uint16(0)
        for r in range(r0, r1):
            m = np.uint16(0)
            for c in range(w.shape[1]):
                m = max(m, w[r, c] & _EXP16)
            bad = max(bad, m)
        return 1 if bad == _EXP16 else 0


# NaN and Inf are the floats whose exponent bits are all ones: testing the bits is ~20x faster than torch.isfinite,
# which converts every element (minutes instead of hours over the real model's 197B weights).
_EXPONENT_BITS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                  torch.float32: (torch.int32, 0x7F800000)}


def all_finite(t: torch.Tensor) -> bool:
    """`bool(torch.isfinite(t).all())`, the project's one finiteness check of weights: one fused pass on all cores
    for bf16 CPU tensors (torch's version makes a bool temporary, the largest cost of an input check), an
    exponent-bits test for other CPU floats."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if eligible(t):
        x = bf16_bits(t).reshape(-1, t.shape[-1]) if t.dim() else bf16_bits(t).reshape(1, 1)
        return not run_chunks(_nonfinite_rows, x.shape[0], x.shape[1], x)
    if t.dtype not in _EXPONENT_BITS or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT_BITS[t.dtype]
    bits = t.detach().contiguous().view(int_dtype).numpy()
    return int((bits & mask).max()) != mask

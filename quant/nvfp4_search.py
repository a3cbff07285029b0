"""NVFP4 with searched group scales: the same on-disk format as round-to-nearest, lower weighted error.

For every 16-group, the FP8 scale round-to-nearest picks (amax mapped to 6) is one candidate among its
neighbouring FP8 codes; the codes above it reach the "map the max to 4 instead of 6" choice (x1.5 = about four
E4M3 steps) and the codes below trade clipping of the largest element for a finer grid. Each candidate is scored
by the group's squared reconstruction error weighted by input-channel importance (mean squared calibration input
per channel, the diagonal of the layer's Hessian proxy that llama.cpp's imatrix also uses) and the best one wins.
The global scale is untouched, so fused groups stay tied.

llm-compressor's `nvfp4_expanded_mse` / `memoryless_mse` observers search a continuous shrink factor on whole
rows and need its module/observer machinery; a per-group search over FP8 codes with external importance is not
offered as a function there, hence written here.
"""

import torch

from quant.constants import FP8_DTYPE, NVFP4_GROUP
from quant.nvfp4 import _gs_view, encode_nvfp4, fp4_codes, fp4_values, quantize_nvfp4

# FP8 E4M3 codes are monotonic in value for positive numbers (0x01 .. 0x7E; 0x7F is NaN).
SCALE_CODE_OFFSETS = (-2, -1, 1, 2, 3, 4, 5)
_MAX_POSITIVE_CODE = 0x7E


def _weighted_error(groups, scale, gsv, importance):
    eff = (scale.to(torch.float32) / gsv)[..., None]
    deq = fp4_values(fp4_codes(torch.clamp(groups / eff, -6.0, 6.0))) * eff
    return (((deq - groups) ** 2) * importance).sum(-1)


def quantize_nvfp4_search(w: torch.Tensor, gs: torch.Tensor, importance: torch.Tensor | None = None,
                          offsets: tuple[int, ...] = SCALE_CODE_OFFSETS) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `quantize_nvfp4(w, gs)` (same outputs, same format), with each group's FP8 scale chosen among the
    round-to-nearest code and its neighbours `offsets` to minimise the importance-weighted squared error.

    `importance`: per input channel `[in]` (or `[..., in]` matching `w`'s leading dims), non-negative; None = plain
    squared error. Ties keep the round-to-nearest scale, so a flat error surface changes nothing.
    """
    _, rtn_scale = quantize_nvfp4(w, gs)
    groups = w.to(torch.float32).unflatten(-1, (-1, NVFP4_GROUP))
    gsv = _gs_view(gs, tuple(w.shape[:-2]))
    if importance is None:
        imp = torch.ones(groups.shape[-2:], dtype=torch.float32, device=w.device)
    else:
        imp = importance.to(torch.float32).unflatten(-1, (-1, NVFP4_GROUP))
        if imp.dim() > 2:  # per leading index (one vector per expert): broadcast over rows
            imp = imp.unsqueeze(-3)
    best = rtn_scale
    best_err = _weighted_error(groups, rtn_scale, gsv, imp)
    base = rtn_scale.view(torch.uint8).to(torch.int16)
    for k in offsets:
        cand = torch.clamp(base + k, 1, _MAX_POSITIVE_CODE).to(torch.uint8).view(FP8_DTYPE)
        err = _weighted_error(groups, cand, gsv, imp)
        better = (err < best_err) & (base > 0)  # keep all-zero groups at round-to-nearest
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return encode_nvfp4(w, gs, best), best

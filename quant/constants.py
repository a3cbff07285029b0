"""Format facts for FP8 E4M3 and NVFP4, stated once.

References: OCP FP8 / NVIDIA NVFP4 specs as implemented by compressed-tensors 0.19.0
(`quant_args.FP8_E4M3_DATA`, `FP4_E2M1_DATA`, `compressors/nvfp4/helpers.kE2M1ToFloat`).
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn; 0x7F / 0xFF are NaN, there is no inf
FP8_E4M3_EPS = 0.125  # finfo(float8_e4m3fn).eps; CT's replacement for a zero FP8 group scale

FP4_E2M1_MAX = 6.0
# Magnitudes indexed by the low 3 bits of an E2M1 code; bit 3 is the sign.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_SIGN_BIT = 0b1000
FP4_MAG_MASK = 0b0111

# Rounding thresholds on |x| for E2M1 round-to-nearest-even (compressed-tensors `cast_to_fp4`):
# the index grows by one past each threshold. "gt" thresholds are ties that round down to the
# even code (0.25->0, 1.25->1, 2.5->2, 5->4), "ge" ties round up (0.75->1, 1.75->2, 3.5->4).
FP4_THRESHOLDS_GT = (0.25, 1.25, 2.5, 5.0)
FP4_THRESHOLDS_GE = (0.75, 1.75, 3.5)

NVFP4_GROUP = 16  # elements sharing one FP8 scale
NVFP4_GLOBAL_NUMERATOR = FP8_E4M3_MAX * FP4_E2M1_MAX  # 2688: global scale = 2688 / amax(W)

FP8_BLOCK = 128  # DeepSeek-V3 / vLLM `weight_block_size: [128, 128]`

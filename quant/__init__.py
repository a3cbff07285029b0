"""Pure FP8 (E4M3) and NVFP4 (E2M1 + FP8 group scales) numerics: tensors in, tensors out."""

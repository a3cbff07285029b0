"""`torchvision.transforms.functional.InterpolationMode`, the one name vLLM's Step-3 VL processor imports from
here (an enum of strings, as in torchvision)."""

from enum import Enum


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

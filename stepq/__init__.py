"""stepq: Step-3.5-Flash to FP8 / NVFP4 / GGUF with the MTP head intact, gated by evals."""

__version__ = "0.1.0"

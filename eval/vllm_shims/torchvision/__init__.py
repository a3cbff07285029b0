"""Import shim (see eval/vllm_shims/README.md): just enough of torchvision's names for vLLM's Step-3.7 modules to
import; using any of them raises."""

__version__ = "0.0.0+stepq-shim"
STEPQ_SHIM = True

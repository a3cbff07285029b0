"""`torchvision.transforms` names vLLM's Step-3 VL image processor builds; calling one raises (no image is ever
preprocessed by the load check)."""

from torchvision.transforms import functional  # noqa: F401


def _unavailable(name):
    def call(*args, **kwargs):
        raise NotImplementedError(f"torchvision.transforms.{name}: import shim of the vLLM load check, "
                                  "images cannot be preprocessed here")

    call.__name__ = name
    return call


Compose = _unavailable("Compose")
ToTensor = _unavailable("ToTensor")
Normalize = _unavailable("Normalize")
Resize = _unavailable("Resize")
CenterCrop = _unavailable("CenterCrop")
Lambda = _unavailable("Lambda")

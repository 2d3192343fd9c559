"""Make `torchvision` importable next to a torch build it was not compiled for.

PyPI's Linux torchvision wheels are linked against CUDA torch. Beside a CPU-only torch their C++
extension cannot load, which torchvision tolerates, except that some releases then register fake
kernels for `torchvision::nms` / `torchvision::qnms` unconditionally and raise "operator
torchvision::nms does not exist" at import. transformers (and so diffusers' AutoencoderKL) and lpips
import torchvision, so that one error would take the whole autoencoder down. Only when that exact
failure happens do we define the two operator schemas and import again; the pure-PyTorch parts we use
(VGG / AlexNet in lpips) then work, and calling the C++ ops themselves still fails loudly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys

import torch

logger = logging.getLogger(__name__)

# Schemas as torchvision's csrc/ops/nms.cpp and quantized/qnms_kernel.cpp declare them.
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable() -> None:
    """Import torchvision, working around a C++ extension that cannot load (a no-op when all is well)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return  # already imported, or not installed (whoever needs it will say so)
    try:
        importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        logger.warning("torchvision's C++ ops do not load with torch %s; importing it without them", torch.__version__)
        for name, schema in _SCHEMAS.items():
            with contextlib.suppress(RuntimeError):  # already defined: nothing to do
                torch.library.define(f"torchvision::{name}", schema)
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]  # drop the half-initialized package before importing it again
        importlib.import_module("torchvision")

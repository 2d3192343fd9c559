"""Make `torchvision` importable next to a torch build it was not compiled for.

PyPI's Linux torchvision wheels are linked against CUDA torch. Beside a CPU-only torch their C++
extension (`_C`) cannot load, which torchvision tolerates, except that it then registers fake kernels
for `torchvision::nms` / `torchvision::qnms` unconditionally and raises "operator torchvision::nms
does not exist" at import. transformers (and so diffusers' AutoencoderKL) and lpips import
torchvision, so that one error would take the whole autoencoder down. Defining the two operator
schemas first lets the import finish; the pure-PyTorch parts we use (VGG / AlexNet in lpips) work,
and calling the C++ ops themselves still fails loudly, as it should.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Schemas as torchvision's csrc/ops/nms.cpp and quantized/qnms_kernel.cpp declare them.
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_patched = False


def ensure_torchvision_importable() -> None:
    """Define torchvision's operator schemas when its C++ extension cannot load (no-op otherwise)."""
    global _patched
    if _patched or "torchvision" in sys.modules:
        return
    _patched = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: whoever needs it will say so
    if _extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return
    for name, schema in _SCHEMAS.items():
        with contextlib.suppress(RuntimeError):  # already defined by someone else: nothing to do
            torch.library.define(f"torchvision::{name}", schema)
    logger.debug("torchvision's C++ ops are unavailable for this torch build; defined their schemas only")


def _extension_loads(package_dir: Path) -> bool:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        library = package_dir / f"_C{suffix}"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
            except (ImportError, OSError):
                return False
            return True
    return False

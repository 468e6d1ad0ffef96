"""The one place where ddpo_rl works around a broken install.

PyPI's torchvision wheels are CUDA builds. Next to a CPU-only torch their ``_C.so``
does not load, and ``import torchvision`` then dies with
``RuntimeError: operator torchvision::nms does not exist`` (an unguarded
``register_fake``). transformers, diffusers, timm and open_clip all import torchvision
when it is installed, so a CPU machine could not import any of them.

:func:`patch_torchvision` checks whether torchvision's extension loads; only when it does
not does it declare the schemas of the two ops that torchvision registers fakes for
(``nms``, ``qnms``), which lets the Python package import. Those ops stay unusable
(ddpo_rl never calls them). On a CUDA torch the extension loads and nothing is done.
"""

from __future__ import annotations

import importlib.util
import os

_PATCHED = False
_LIB = None  # keep the Library alive: dropping it unregisters the schemas


def patch_torchvision() -> bool:
    """Make ``import torchvision`` work when its C++ extension cannot load.

    Returns True when the schemas had to be declared. Idempotent; must run before the first
    torchvision import (``import ddpo_rl`` does it).
    """
    global _PATCHED, _LIB
    if _PATCHED:
        return False
    _PATCHED = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import glob

    import torch

    candidates = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")) + glob.glob(
        os.path.join(os.path.dirname(spec.origin), "_C*.pyd")
    )
    if candidates:
        try:
            torch.ops.load_library(candidates[0])
            return False
        except (OSError, ImportError, RuntimeError):
            pass
    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered by some other means
        return False
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    return True

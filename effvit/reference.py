"""Access to the PyTorch reference (timm) for parity tests and benchmarks only.

timm imports torchvision at import time, and no CPU torchvision build installs next to
torch 2.13 here. When the real torchvision is missing, `import_timm()` registers a minimal
stand-in (FrozenBatchNorm2d, InterpolationMode and empty submodules) that is enough to build
timm models; timm's data transforms and `features_only` do not work with it.
"""
from __future__ import annotations

import enum
import importlib
import sys
import types


def _install_torchvision_stub() -> None:
  import torch

  class FrozenBatchNorm2d(torch.nn.Module):
    def __init__(self, num_features, eps=1e-5):
      super().__init__()
      self.eps = eps
      for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                         ("running_var", 1.0)):
        self.register_buffer(name, torch.full((num_features,), fill))

    def forward(self, x):
      scale = self.weight * (self.running_var + self.eps).rsqrt()
      shift = self.bias - self.running_mean * scale
      return x * scale[None, :, None, None] + shift[None, :, None, None]

  class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

  names = ["torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
           "torchvision.transforms.functional", "torchvision.transforms.v2",
           "torchvision.datasets", "torchvision.utils", "torchvision.models",
           "torchvision.models.feature_extraction", "torchvision.io"]
  def placeholder(module_name):
    def getattr_(attr):   # PEP 562: any other name is a class that fails only when used
      if attr.startswith("__"):
        raise AttributeError(attr)
      def unavailable(*args, **kwargs):
        raise RuntimeError(f"{module_name}.{attr} is unavailable: torchvision is not installed "
                           "(effvit's stand-in only supports building models)")
      return type(attr, (), {"__init__": unavailable, "__call__": unavailable})
    return getattr_

  mods = {n: types.ModuleType(n) for n in names}
  for n, m in mods.items():
    m.__path__ = []  # a package, so submodule imports resolve
    m.__getattr__ = placeholder(n)
    parent, _, child = n.rpartition(".")
    if parent:
      setattr(mods[parent], child, m)
  mods["torchvision"].__version__ = "0.0.0+effvit-stub"
  mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
  mods["torchvision.transforms"].InterpolationMode = InterpolationMode
  mods["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
  sys.modules.update(mods)


def import_timm():
  """Import timm, with the torchvision stand-in when the real one cannot be imported.

  Raises ModuleNotFoundError when torch or timm is not installed (the `reference` extra).
  """
  importlib.import_module("torch")
  try:
    importlib.import_module("torchvision")
  except Exception:  # missing, or a broken build that fails at import
    for n in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[n]
    _install_torchvision_stub()
  return importlib.import_module("timm")


def timm_model(name: str, **kwargs):
  """A timm model in eval mode with random weights (no download)."""
  timm = import_timm()
  return timm.create_model(name, pretrained=False, **kwargs).eval()

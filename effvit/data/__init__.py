"""Input pipelines (TFDS + tf.data on the host), Mixup/CutMix, and the offline digits dataset.

Mixup/CutMix is pure JAX and imported at once: the train step needs it, and a process that only
steps a model (benchmarks, a GPU image without TensorFlow) must not pay for TensorFlow. The
pipeline's names load `effvit.data.pipeline` on first use, which hides GPUs from TensorFlow and
registers the `sklearn_digits` builder. See `effvit.data.pipeline` for the API and the config
fields.
"""
import importlib

from effvit.data.mixup import mixup_cutmix, smooth_one_hot

_PIPELINE = ("dataset_info", "default_eval_config", "default_input_config", "eval_batches",
             "load_builder", "train_iterator")
__all__ = ["mixup_cutmix", "smooth_one_hot", *_PIPELINE]


def __getattr__(name):
  if name in _PIPELINE:
    return getattr(importlib.import_module("effvit.data.pipeline"), name)
  try:  # a submodule not imported yet: `data.digits`, `data.transforms`, ...
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

"""Input pipelines (TFDS + tf.data on the host), Mixup/CutMix, and the offline digits dataset.

Importing this package hides GPUs from TensorFlow and registers the `sklearn_digits` builder.
See `effvit.data.pipeline` for the API and the config fields.
"""
from effvit.data.pipeline import (dataset_info, default_eval_config, default_input_config,
                                  eval_batches, load_builder, train_iterator)
from effvit.data.mixup import mixup_cutmix, smooth_one_hot
from effvit.data import digits  # noqa: F401  (registers sklearn_digits)

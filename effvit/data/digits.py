"""`sklearn_digits`: scikit-learn's bundled handwritten digits as a TFDS dataset, built offline.

Source: `sklearn.datasets.load_digits()` (the UCI optdigits test set, BSD-3): 1797 grey 8x8
images with values 0..16, 10 classes. Nothing is downloaded; preparing takes about a second.

- Splits (fixed, by position in scikit-learn's order): `train` = the first 1500 images,
  `test` = the last 297 (27-33 per class, so both splits are class-balanced).
- `image`: 32x32x3 uint8. Values 0..16 are scaled to 0..255 (rounded), upsampled 8x8 -> 32x32
  with PIL's bilinear filter, and the grey channel is repeated three times (models expect RGB).
- `label`: ClassLabel with 10 classes ("0".."9"). Supervised keys: ("image", "label").

Importing this module registers the builder, so `tfds.builder("sklearn_digits")` works;
effvit's pipeline prepares it automatically on first use (`effvit.data.pipeline`).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "sklearn_digits"
NUM_TRAIN = 1500
NUM_TEST = 297
IMAGE_SIZE = 32


def to_rgb32(image8: np.ndarray) -> np.ndarray:
  """One 8x8 digit with values 0..16 -> 32x32x3 uint8, as stored in the dataset."""
  grey = np.round(np.asarray(image8, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  big = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
  return np.repeat(np.asarray(big)[:, :, None], 3, axis=2)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits, upsampled to 32x32 RGB; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 1500 train / 297 test, 32x32x3 uint8."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/api/sklearn.datasets.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside scikit-learn
    from sklearn.datasets import load_digits  # only needed while preparing
    digits = load_digits()
    images, labels = digits.images, digits.target
    assert len(images) == NUM_TRAIN + NUM_TEST, len(images)
    return {
        "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN]),
        "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": to_rgb32(image), "label": int(label)}

"""Per-example image transforms (TensorFlow ops, run inside tf.data).

Images arrive as encoded bytes (TFDS `SkipDecoding`) so training can decode only the crop.
JPEGs are decoded with `dct_method="INTEGER_ACCURATE"` (libjpeg's ISLOW DCT, what PIL uses), so
decoded pixels match PIL's. Resizing is antialiased (`tf.image.resize(antialias=True)`), which
filters like PIL when shrinking; results are rounded and clipped to 0..255 as PIL's uint8 are.

Evaluation (`eval_image`) is timm's: resize the shorter side to floor(size / crop_pct)
(the longer one to int(that * long / short), as torchvision does), centre-crop size x size
(offsets rounded half to even, as Python's `round`), scale to 0..1, normalise with mean/std.

Training (`train_image`) is the DeiT recipe minus random erasing: Inception-style random resized
crop (`stateless_sample_distorted_bounding_box`: area in `crop_scale` of the image, aspect ratio
uniform in [3/4, 4/3], whole image after 10 failed tries; timm samples the ratio log-uniformly
and falls back to a centre crop), resize to size x size, horizontal flip, RandAugment,
normalise. Every random draw derives from the example's key, so the output is a pure function
of (bytes, key).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP -> uint8 [H, W, 3]."""
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


def decode_random_crop(image_bytes: tf.Tensor, key: tf.Tensor, scale: Sequence[float],
                       ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception crop, decoding only the crop window for JPEGs. uint8 [h, w, 3]."""

  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=key, min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    begin, size = window(tf.io.extract_jpeg_shape(image_bytes))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.io.decode_and_crop_jpeg(image_bytes, crop, channels=3,
                                      dct_method="INTEGER_ACCURATE")

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other), [None, None, 3])


def resize(image: tf.Tensor, height, width, method: str) -> tf.Tensor:
  """Antialiased resize -> float32 in 0..255, rounded like PIL's uint8 output."""
  out = tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def resize_shorter_side(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """torchvision's `Resize(size)`: shorter side -> size, longer -> int(size * long / short)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  new_h = tf.where(h <= w, size, size * h // w)
  new_w = tf.where(h <= w, size * w // h, size)
  return resize(image, new_h, new_w, method)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision's `CenterCrop(size)` for an image at least size x size."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # tf.round rounds half to even, like Python's round() in torchvision.
  top = tf.cast(tf.round(tf.cast(h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(w - size, tf.float32) / 2), tf.int32)
  return image[top:top + size, left:left + size]


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """0..255 -> (x / 255 - mean) / std, float32."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def eval_image(image_bytes: tf.Tensor, *, image_size: int, crop_pct: float, interpolation: str,
               mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """timm's evaluation transform; float32 [image_size, image_size, 3]."""
  scale_size = math.floor(image_size / crop_pct)
  image = resize_shorter_side(decode(image_bytes), scale_size, interpolation)
  image = center_crop(image, image_size)
  return tf.ensure_shape(normalize(image, mean, std), [image_size, image_size, 3])


def train_image(image_bytes: tf.Tensor, key: tf.Tensor, *, image_size: int, inception_crop: bool,
                crop_scale: Sequence[float], flip: bool, interpolation: str,
                randaugment: Optional[Callable[[tf.Tensor, tf.Tensor], tf.Tensor]],
                mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Training transform; float32 [image_size, image_size, 3]; a pure function of (bytes, key).

  Without `inception_crop` the whole image is resized to image_size x image_size.
  """
  crop_key, flip_key, aug_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  if inception_crop:
    image = decode_random_crop(image_bytes, crop_key, crop_scale)
  else:
    image = decode(image_bytes)
  image = resize(image, image_size, image_size, interpolation)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  if randaugment is not None:
    image = randaugment(image, aug_key)
  return tf.ensure_shape(normalize(image, mean, std), [image_size, image_size, 3])

"""Per-example image transforms (TensorFlow ops, run inside tf.data).

Images arrive as encoded bytes (TFDS `SkipDecoding`) so training can decode only the crop.
JPEGs are decoded with `dct_method="INTEGER_ACCURATE"` (libjpeg's ISLOW DCT, what PIL uses), so
decoded pixels match PIL's. Resizing is antialiased (`tf.image.resize(antialias=True)`), which
filters like PIL when shrinking; results are rounded and clipped to 0..255 as PIL's uint8 are.

Evaluation (`eval_image`) is timm's: resize the shorter side to floor(size / crop_pct)
(the longer one to int(that * long / short), as torchvision does), centre-crop size x size
(offsets rounded half to even, as Python's `round`), scale to 0..1, normalise with mean/std.
Its resize is Pillow's own algorithm (`resize_like_pil`: the same filter taps, 22-bit fixed-point
weights, two passes in Pillow 13's order, each rounded and clipped to 0..255), so evaluation
images equal, pixel for pixel, what timm's torchvision transform makes of the decoded JPEG.

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


# Pillow's 8-bit resampling (libImaging/Resample.c), re-derived for TensorFlow: per output
# pixel, the filter's taps over [center - support, center + support) of the input, normalised to
# sum 1, stored as integers scaled by 2**22 (rounded half away from zero); each pass adds 2**21,
# shifts right by 22 (floor) and clips to 0..255.
_PIL_BITS = 22


def _pil_bicubic(x):
  a = -0.5   # Pillow's cubic convolution constant
  x = tf.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _pil_bilinear(x):
  x = tf.abs(x)
  return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))


_PIL_FILTERS = {"bicubic": (_pil_bicubic, 2.0), "bilinear": (_pil_bilinear, 1.0)}


def _pil_taps(in_size, out_size, method: str):
  """(input index [out, k] int32, fixed-point weight [out, k] int32) for one axis."""
  kernel, support = _PIL_FILTERS[method]
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  filterscale = tf.maximum(scale, 1.0)   # widen the filter when shrinking (antialiasing)
  support = support * filterscale
  k = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
  first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)   # casts truncate, as C's
  count = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - first
  offset = tf.range(k)
  index = first[:, None] + offset[None, :]
  w = kernel((tf.cast(index, tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
  w = tf.where(offset[None, :] < count[:, None], w, 0.0)
  total = tf.reduce_sum(w, axis=1, keepdims=True)
  w = tf.where(total != 0.0, w / total, w)
  one = float(1 << _PIL_BITS)
  fixed = tf.cast(tf.where(w < 0.0, w * one - 0.5, w * one + 0.5), tf.int32)
  return tf.minimum(index, in_size - 1), fixed   # clamped taps carry weight 0


def _pil_pass(image: tf.Tensor, axis: int, out_size, method: str) -> tf.Tensor:
  """Resample int32 [H, W, C] along `axis` (0 or 1) to out_size, as Pillow does."""
  index, weight = _pil_taps(tf.shape(image)[axis], out_size, method)
  shape = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [out_size])
  acc = tf.fill(shape, tf.constant(1 << (_PIL_BITS - 1), tf.int32))

  def add_tap(j, acc):   # one tap at a time: memory stays at the output's size
    taps = tf.gather(image, index[:, j], axis=axis)
    w = weight[:, j][:, None, None] if axis == 0 else weight[:, j][None, :, None]
    return j + 1, acc + taps * w   # int32 as in Pillow: |sum| < 2**31 for 8-bit input

  _, acc = tf.while_loop(lambda j, _: j < tf.shape(index)[1], add_tap, (0, acc))
  return tf.clip_by_value(tf.math.floordiv(acc, 1 << _PIL_BITS), 0, 255)


def resize_like_pil(image: tf.Tensor, height, width, method: str) -> tf.Tensor:
  """uint8 [h, w, 3] -> float32 [height, width, 3] equal to PIL's `Image.resize`."""
  image = tf.cast(image, tf.int32)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # Pillow (13) resamples vertically first when the height shrinks by more than twice as many
  # pixels as the width, else horizontally first; the order changes the rounded result.
  vertical_first = (h - height > 0) & (h - height > 2 * (w - width))
  out = tf.cond(
      vertical_first,
      lambda: _pil_pass(_pil_pass(image, 0, height, method), 1, width, method),
      lambda: _pil_pass(_pil_pass(image, 1, width, method), 0, height, method))
  return tf.cast(out, tf.float32)


def resize_shorter_side(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """torchvision's `Resize(size)` on a PIL image: shorter side -> size, longer -> int(size *
  long / short), resampled as Pillow does. float32 in 0..255."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  new_h = tf.where(h <= w, size, size * h // w)
  new_w = tf.where(h <= w, size * w // h, size)
  return resize_like_pil(image, new_h, new_w, method)


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

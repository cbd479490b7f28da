"""RandAugment for tf.data: keras 3's `keras.layers.RandAugment`, made stateless per example.

Why keras: it is the maintained RandAugment among our dependencies and runs inside tf.data
with plain TF ops. (timm's is PIL-based, would need `tf.py_function` and draws from Python's
global `random`, so it can be neither parallel nor reproducible per example.)

Determinism. Out of the box every keras random layer draws from a `SeedGenerator`, a
variable advanced on each call, so an image's augmentation depends on how many images went
through before it (and on thread timing under a parallel `map`). `RandAugment` below sends every
draw of the layer and of its sub-layers (op choice and op strengths) through `_KeySeed`, which
derives the seed of the n-th draw in the traced graph from the example's own key
(`stateless_fold_in(key, n)`). The output is then a pure function of (image, key): parallel
maps, restarts and skips reproduce it exactly.

Magnitude. keras draws each op's strength uniformly in [0, factor] and reads it in the op's own
units (fractions of a full turn, of the image size, of the value range), so the same factor that
is mild for colour ops rotates by up to 324 degrees at factor 0.9. We keep keras' op set and
implementations but give each op the range the RandAugment paper / timm use at magnitude
m in 0..10 (f = m / 10, strength drawn uniformly within the range, both directions):

  rotation ±30f degrees; shear ±0.3f (x and y together); translation ±0.45f of the size;
  contrast x[1-0.9f, 1+0.9f]; sharpness x[1-0.9f, 1+0.9f]; colour: blend towards grey by
  [0, 0.9f]; brightness ±0.45f of the range (additive; about PIL's x(1±0.9f) at mid-grey);
  posterize to [8-4f, 7] bits; solarize with threshold uniform in [0, 255] (keras scales only
  the upper end of that range, so the magnitude cannot narrow it); autocontrast; equalize.

Geometric ops fill with grey 128, like timm. keras applies `num_ops` ops always (no identity op,
no per-op probability) and has no invert op.
"""
from __future__ import annotations

import types

import keras
import tensorflow as tf

_FILL = dict(fill_mode="constant", fill_value=128.0)


class _KeySeed(keras.random.SeedGenerator):
  """A stateless stand-in for a `SeedGenerator`: draw n gets `stateless_fold_in(key, n)`.

  `__init__` deliberately skips the parent's, which would create a state variable.
  """

  def __init__(self, key: tf.Tensor):  # pylint: disable=super-init-not-called
    self._key = key
    self._count = 0

  def next(self, ordered=True):
    del ordered
    self._count += 1  # runs at trace time: every draw site gets its own constant
    return tf.cast(tf.random.experimental.stateless_fold_in(self._key, self._count) % (2**31 - 1),
                   tf.int32)


class _KeyedRandAugment(keras.layers.RandAugment):
  """keras RandAugment whose draws all come from `self._key_holder.seed`."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    # A plain namespace: keras does not track it, so it can change after the layer is built.
    self._key_holder = types.SimpleNamespace(seed=None)

  def _get_seed_generator(self, backend=None):
    if self._key_holder.seed is None:
      raise RuntimeError("RandAugment must be called through effvit.data.randaugment.RandAugment")
    return self._key_holder.seed

  def transform_images(self, images, transformation, training=True):
    """keras' own result, but only the chosen op runs.

    keras computes all 11 ops for each of the `num_ops` slots and keeps one with `where`;
    dispatching with `tf.switch_case` on the same draws gives the same image >10x faster.
    """
    if not training:
      return super().transform_images(images, transformation, training)
    images = tf.cast(images, self.compute_dtype)
    ops = [(getattr(self, name), t) for name, t in transformation["transforms"].items()]
    for i in range(self.num_ops):
      x = images
      branches = [lambda op=op, t=t: tf.cast(op.transform_images(x, t), x.dtype) for op, t in ops]
      images = tf.ensure_shape(tf.switch_case(transformation["layer_idxes"][i], branches), x.shape)
    return images


class RandAugment:
  """`RandAugment(num_ops, magnitude)(image, key)`; image float32 [H, W, 3] in 0..255, key [2]."""

  def __init__(self, num_ops: int = 2, magnitude: float = 9.0):
    if not 0 < magnitude <= 10:
      raise ValueError(f"RandAugment magnitude must be in (0, 10], got {magnitude}")
    f = magnitude / 10.0
    rgb = dict(value_range=(0, 255))
    layer = _KeyedRandAugment(num_ops=num_ops, factor=f, name="rand_augment", **rgb)
    # Replace keras' defaults with the paper's ranges (module docstring); ops, order and
    # implementations stay keras'.
    layer.random_rotation = keras.layers.RandomRotation(
        factor=(-30 * f / 360, 30 * f / 360), **_FILL)
    layer.random_shear = keras.layers.RandomShear(x_factor=0.3 * f, y_factor=0.3 * f, **_FILL)
    layer.random_translation = keras.layers.RandomTranslation(
        height_factor=(-0.45 * f, 0.45 * f), width_factor=(-0.45 * f, 0.45 * f), **_FILL)
    # A (lower, upper) tuple: RandomContrast reads it as x[1 - lower, 1 + upper].
    layer.random_contrast = keras.layers.RandomContrast(factor=(0.9 * f, 0.9 * f), **rgb)
    # keras sharpens by 2 * factor, so factor 0.5 is the identity.
    layer.random_sharpness = keras.layers.RandomSharpness(
        factor=(0.5 - 0.45 * f, 0.5 + 0.45 * f), **rgb)
    layer.random_color_degeneration = keras.layers.RandomColorDegeneration(
        factor=(0.0, 0.9 * f), **rgb)
    layer.random_brightness = keras.layers.RandomBrightness(factor=(-0.45 * f, 0.45 * f), **rgb)
    layer.random_posterization = keras.layers.RandomPosterization(
        factor=(max(1, round(8 - 4 * f)), 8), **rgb)
    layer.solarization = keras.layers.Solarization(
        addition_factor=0.0, threshold_factor=(0.0, 1.0), **rgb)
    self.num_ops, self.magnitude, self._layer = num_ops, magnitude, layer

  def __call__(self, image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    # Bound while tracing: the traced graph reads only `key`, no shared state.
    self._layer._key_holder.seed = _KeySeed(key)
    try:
      out = self._layer(image, training=True)
    finally:
      self._layer._key_holder.seed = None
    return tf.clip_by_value(tf.cast(out, tf.float32), 0.0, 255.0)

"""Mixup / CutMix with label smoothing, in JAX, on the (sharded) global batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """One-hot with `label_smoothing` spread uniformly: on = 1 - s + s/K, off = s/K."""
  off = label_smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + off


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch as timm's `Mixup(mode="batch", correct_lam=True)`; returns (images, targets).

  images: [N, H, W, C]; labels: int [N]; targets: float32 [N, num_classes], rows sum to 1.
  Sample i is paired with sample N-1-i (the batch flipped). One λ serves the whole batch:
  - both alphas > 0: CutMix with probability `switch_prob`, else Mixup;
    only one > 0: that one; both 0: images unchanged, targets = smoothed one-hot.
  - Mixup: λ ~ Beta(mixup_alpha, mixup_alpha); image = λ·x + (1-λ)·x_flipped.
  - CutMix: λ ~ Beta(cutmix_alpha, cutmix_alpha); a box of int(H·√(1-λ)) x int(W·√(1-λ))
    centred on a uniform random pixel, clipped to the image, is pasted from x_flipped; λ is
    then recomputed as 1 - (clipped box area) / (H·W), so it is the exact kept fraction.
  - targets = λ·smooth(onehot(y)) + (1-λ)·smooth(onehot(y_flipped)), where smooth puts
    1 - s + s/K on the label and s/K elsewhere (s = label_smoothing, K = num_classes).
  num_classes and the keyword arguments are Python numbers (static under `jax.jit`). Works on a
  batch sharded over devices: the flip and the box mask are ordinary array ops.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 5)
  partner = jnp.flip(images, axis=0)

  if mixup_alpha > 0:
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    mixed = lam_mix.astype(images.dtype) * images + (1 - lam_mix).astype(images.dtype) * partner
  if cutmix_alpha > 0:
    _, h, w, _ = images.shape
    lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    cut_h = (h * jnp.sqrt(1.0 - lam)).astype(jnp.int32)  # int() truncates, as timm's
    cut_w = (w * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    cut = jnp.where(box[None, :, :, None], partner, images)
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    images = jnp.where(use_cutmix, cut, mixed)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
  elif cutmix_alpha > 0:
    images, lam = cut, lam_cut
  else:
    images, lam = mixed, lam_mix
  targets = lam * targets + (1.0 - lam) * jnp.flip(targets, axis=0)
  return images, targets

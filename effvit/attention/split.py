"""Split Attention (ResNeSt, Zhang et al. 2020).

The gw input channels feed K cardinal groups, each cut into R splits (radix); one grouped
3×3 conv (K·R groups) computes every split U_{r,k} ∈ R^{H×W×gw/K}. Per cardinal group k:

    Û_k = Σ_r U_{r,k}                                        (fuse the splits)
    s_k = (1/HW) Σ_{i,j} Û_k(i, j)                            (global context, gw/K channels)
    z   = ReLU(BN(W1 s))                                      (W1: 1×1 conv, K groups, A chans)
    G   = W2 z                                                (W2: 1×1 conv, K groups, R·gw)
    a_{r,k}(c) = exp G_{r,k}(c) / Σ_r' exp G_{r',k}(c)        (R > 1: softmax over the radix)
    a_{1,k}(c) = σ(G_{1,k}(c))                                (R = 1: an SE-style gate)
    V_k = Σ_r a_{r,k} ⊙ U_{r,k} ,   V = concat_k V_k          (gw output channels)

with A = make_divisible(gw·R/4, divisor 8, min 32) attention channels (timm's rule; the
original repo's max(gw·R/4, 32) agrees on every released config).

Code symbols: `x` is (B, H, W, R·gw) after conv -> BN -> ReLU, radix-major, so U_{r,k} is
x[..., r·gw + k·gw/K : ...] and `splits` = x.reshape(B, H, W, R, gw) holds all U; `gap` is s
(B, gw, k-major); `z` is z; `logits` is G from fc2, whose K groups lay channels out as
(k, r, c), so it is reshaped to (B, K, R, gw/K), softmaxed over R and moved to (R, K, gw/K)
= (R, gw) as `attn` (a) to weight the splits; no Python loop over r or k.
Module names (`conv`, `bn0`, `fc1`, `bn1`, `fc2`) are timm's, so checkpoints load unchanged.
BatchNorm and the softmax run in float32 under bfloat16 compute (ResNeSt#48: fp16 NaNs).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit.errors import ConfigError
from effvit.layers import BatchNorm, GroupedConv

Dtype = Any


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Round v to the nearest multiple of divisor (at least min_value), never losing > 10%."""
  min_value = min_value or divisor
  out = max(min_value, int(v + divisor / 2) // divisor * divisor)
  return out + divisor if out < 0.9 * v else out


def attention_width(width: int, radix: int, cardinality: int = 1,
                  override: int | None = None) -> int:
  """A, the attention MLP's width (timm's rule unless `override`), after checking the split.

  Raises ConfigError, saying what to change, for settings no grouped conv can realise.
  """
  r, k = radix, cardinality
  if r < 1 or k < 1:
    raise ConfigError(f"radix={r} and cardinality={k} must both be >= 1")
  if width % (k * r):
    raise ConfigError(f"group width {width} must be divisible by cardinality*radix = {k}*{r} "
                      "(every split of every cardinal group needs whole input channels): "
                      "change radix, cardinality or base_width")
  a = override or make_divisible(width * r * 0.25, divisor=8, min_value=32)
  if a % k:
    raise ConfigError(f"attention channels {a} must be divisible by cardinality={k}: change "
                      "cardinality or attn_channels")
  return a


class SplitAttention(nn.Module):
  """Split-attention 3×3 conv on NHWC maps: `width` channels in and out (see module docstring).

  `train=True` normalises with batch statistics (the caller makes "batch_stats" mutable).
  """
  width: int
  radix: int = 2
  cardinality: int = 1
  stride: int = 1
  attn_channels: int | None = None   # None: timm's rule (see attention_width)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    r, k, gw = self.radix, self.cardinality, self.width
    a = attention_width(gw, r, k, self.attn_channels)
    if x.shape[-1] != gw:
      raise ConfigError(f"split attention of width {gw} got {x.shape[-1]} input channels")
    conv = lambda f, kernel, groups, name, **kw: GroupedConv(
        f, kernel, groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    norm = lambda name: BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    x = conv(r * gw, 3, k * r, "conv", strides=self.stride, padding=1, use_bias=False)(x)
    x = nn.relu(norm("bn0")(x, train))
    b, h, w, _ = x.shape
    splits = x.reshape(b, h, w, r, gw)                  # U_{r,k}: radix-major channels
    # s: mean of Û over H, W, accumulated in float32.
    gap = splits.astype(jnp.float32).sum(axis=3).mean(axis=(1, 2), keepdims=True)
    z = nn.relu(norm("bn1")(conv(a, 1, k, "fc1")(gap.astype(self.dtype)), train))
    logits = conv(r * gw, 1, k, "fc2")(z).astype(jnp.float32).reshape(b, k, r, gw // k)
    if r > 1:
      attn = jax.nn.softmax(logits, axis=2).transpose(0, 2, 1, 3)   # (B, R, K, gw/K)
    else:
      attn = jax.nn.sigmoid(logits)
    attn = attn.reshape(b, 1, 1, r, gw).astype(x.dtype)
    return (splits * attn).sum(axis=3)                   # V = Σ_r a_r ⊙ U_r

"""Locally-grouped self-attention (LSA, Twins-SVT).

The H×W token map is zero-padded on the right/bottom to H_p×W_p (multiples of the window k)
and cut into (H_p/k)·(W_p/k) non-overlapping k×k windows w. Attention runs inside each window:

    [Q_w | K_w | V_w] = X_w Wqkv                            (one Linear, q rows first, then k, v)
    LSA(X)_w = concat_i softmax(Q_w,i K_w,iᵀ · d^-½) V_w,i   (k² × k² attention per window)
    LSA(X) = crop_{H×W}(windows) · Wo

Cost: N·k²·C multiply-adds for the attention products instead of N²·C, linear in N.
Twins' other half, global sub-sampled attention (GSA), is SRA (spatial_reduction.py).

Padding follows timm and Twins' detection code: padded tokens are zero vectors *after* norm1,
so (because Wqkv has a bias) they enter the softmax with k = b_k. `masked=True` instead excludes
padded keys from every softmax (what Twins' segmentation code intended).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit.attention import core
from effvit.errors import ConfigError
from effvit.layers import Dense, tokens_to_map

Dtype = Any


def window_partition(m: jax.Array, k: int) -> jax.Array:
  """(B, Hp, Wp, C) -> (B·nh·nw, k·k, C), windows in row-major order."""
  b, hp, wp, c = m.shape
  m = m.reshape(b, hp // k, k, wp // k, k, c).transpose(0, 1, 3, 2, 4, 5)
  return m.reshape(b * (hp // k) * (wp // k), k * k, c)


def window_merge(w: jax.Array, b: int, hp: int, wp: int, k: int) -> jax.Array:
  """Inverse of window_partition: (B·nh·nw, k·k, C) -> (B, Hp, Wp, C)."""
  c = w.shape[-1]
  w = w.reshape(b, hp // k, wp // k, k, k, c).transpose(0, 1, 3, 2, 4, 5)
  return w.reshape(b, hp, wp, c)


def padded_key_mask(h: int, w: int, k: int) -> np.ndarray:
  """(nh·nw, k·k) True where a window position holds a real (unpadded) token."""
  hp, wp = -(-h // k) * k, -(-w // k) * k
  valid = np.zeros((1, hp, wp, 1), bool)
  valid[:, :h, :w] = True
  return np.asarray(window_partition(valid, k))[..., 0]


class LocallyGroupedAttention(nn.Module):
  num_heads: int
  window: int = 7
  masked: bool = False
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int], *, deterministic: bool = True,
               carry: Any = None):
    b, n, c = x.shape
    k = self.window
    if k <= 0:
      raise ConfigError(f"LSA window must be positive, got {k}")
    if c % self.num_heads:
      raise ConfigError(f"dim {c} is not divisible by num_heads={self.num_heads}")
    if n != hw[0] * hw[1]:
      raise ConfigError("LSA needs a pure token map; a cls token is not supported")
    h, w = hw
    pad_b, pad_r = (-h) % k, (-w) % k
    m = jnp.pad(tokens_to_map(x, hw), ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    windows = window_partition(m, k)
    qkv = Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                name="qkv")(windows)
    q, kk, v = (core.split_heads(qkv[..., i * c:(i + 1) * c], self.num_heads) for i in range(3))
    mask = None
    if self.masked and (pad_b or pad_r):
      valid = jnp.asarray(padded_key_mask(h, w, k))                     # (nwin, k²)
      mask = jnp.tile(valid, (b, 1))[:, None, None, :]                  # (B·nwin, 1, 1, k²)
    if self.attn_drop_rate and not deterministic:
      probs = core.attention_probs(q, kk, mask)
      probs = nn.Dropout(self.attn_drop_rate)(probs, deterministic=False)
      out = core.apply_attention(probs, v)
    else:
      out = core.attend(self, q, kk, v, mask)
    out = window_merge(core.merge_heads(out), b, hp, wp, k)[:, :h, :w]
    out = Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(
        out.reshape(b, n, c))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic), None

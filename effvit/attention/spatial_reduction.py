"""Spatial-Reduction Attention (PVT, PVTv2) and its linear variant (PVTv2-li).

Queries come from all N = H·W tokens; keys and values from a reduced map X_r:

    SRA:        X_r = LN_1e-5( Conv_{k=s=R}(X) )                  M = ⌊H/R⌋·⌊W/R⌋ tokens
    linear SRA: X_r = GELU( LN_1e-5( Conv_1×1( AvgPool_{P×P}(X) ) ) )  M = P² tokens (P = 7)

    Q = X Wq,   [K | V] = X_r Wkv,   SRA(X) = concat_i softmax(Q_i K_iᵀ · d^-½) V_i · Wo

With R = 1 there is no reduction and no SR parameters: plain global multi-head attention
(PVT stage 4, Twins GSA in stage 4). Cost per layer: N·M·C multiply-adds for the two attention
products instead of N²·C; the R² saving is what lets PVT run attention at stride 4.
The pool uses PyTorch's adaptive bins [⌊i·H/P⌋, ⌈(i+1)·H/P⌉), which overlap when P ∤ H.
Twins' Global Sub-sampled Attention (GSA) is exactly SRA; it lives here too.

Names: `q`, `kv` (K rows first, then V), `proj` (Wo), `sr` (reduction conv), `norm`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit.attention import core
from effvit.errors import ConfigError
from effvit.layers import Dense, PatchConv, gelu, layer_norm, map_to_tokens, tokens_to_map

Dtype = Any


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
  """(out, size) averaging matrix with PyTorch's AdaptiveAvgPool bin edges."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """AdaptiveAvgPool2d(out) on an NHWC map, as two small matmuls (exact for any H, W)."""
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out), x.dtype)
  return jnp.einsum("ph,qw,bhwc->bpqc", ph, pw, x)


class SpatialReductionAttention(nn.Module):
  """SRA with reduction ratio `sr_ratio`, or linear SRA (`linear=True`, pool to `pool_size`²)."""
  num_heads: int
  sr_ratio: int = 1
  linear: bool = False
  pool_size: int = 7
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def reduce(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Tokens from which keys and values are computed."""
    c = x.shape[-1]
    if not self.linear and self.sr_ratio == 1:
      return x
    if x.shape[1] != hw[0] * hw[1]:
      raise ConfigError("spatial reduction needs a pure token map; a stage with a cls token "
                        "must use sr_ratio=1 (global attention)")
    m = tokens_to_map(x, hw)
    conv = lambda k: PatchConv(c, k, dtype=self.dtype, param_dtype=self.param_dtype, name="sr")
    if self.linear:
      m = conv(1)(adaptive_avg_pool(m, self.pool_size))
      return gelu(layer_norm(1e-5, "norm")(map_to_tokens(m)))
    if hw[0] < self.sr_ratio or hw[1] < self.sr_ratio:
      raise ConfigError(f"a {hw[0]}x{hw[1]} token map is smaller than sr_ratio={self.sr_ratio}: "
                        "use a larger input or a smaller sr_ratio for this stage")
    m = conv(self.sr_ratio)(m)
    return layer_norm(1e-5, "norm")(map_to_tokens(m))

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int], *, deterministic: bool = True,
               carry: Any = None):
    c = x.shape[-1]
    if c % self.num_heads:
      raise ConfigError(f"dim {c} is not divisible by num_heads={self.num_heads}")
    dense = lambda f, name, bias=True: Dense(f, use_bias=bias, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
    q = core.split_heads(dense(c, "q", self.qkv_bias)(x), self.num_heads)
    kv = dense(2 * c, "kv", self.qkv_bias)(self.reduce(x, hw))
    k = core.split_heads(kv[..., :c], self.num_heads)
    v = core.split_heads(kv[..., c:], self.num_heads)
    if self.attn_drop_rate and not deterministic:
      probs = nn.Dropout(self.attn_drop_rate)(core.attention_probs(q, k), deterministic=False)
      out = core.apply_attention(probs, v)
    else:
      out = core.attend(self, q, k, v)
    out = dense(c, "proj")(core.merge_heads(out))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic), None

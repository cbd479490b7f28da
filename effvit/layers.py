"""Building blocks shared by the pyramid backbones.

Token tensors are (B, N, C) with row-major token order n = y·W + x, which is exactly an NHWC
map reshaped, so going between tokens and maps is a free reshape. Norm layers compute in
float32 whatever the compute dtype; their eps follow the references (1e-6 in blocks and final
norms, 1e-5 after patch embedding and after the SR conv).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# Reference initialisation (PVT/Twins/timm): trunc-normal(.02) linears with zero bias, and
# convs with normal(0, sqrt(2 / fan_out)), fan_out = k·k·out / groups.
dense_init = nn.initializers.truncated_normal(stddev=0.02)


def conv_init(groups: int = 1):
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    fan_out = kh * kw * out // groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)
  return init


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, PyTorch's nn.GELU() default."""
  return jax.nn.gelu(x, approximate=False)


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def tokens_to_map(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])


def map_to_tokens(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


class Dense(nn.Dense):
  """nn.Dense with the reference init."""
  kernel_init: Any = dense_init
  bias_init: Any = nn.initializers.zeros


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Mlp(nn.Module):
  """fc1 -> [ReLU] -> [depthwise 3×3 conv] -> GELU -> dropout -> fc2 -> dropout.

  `dwconv=False`: the plain transformer MLP (PVTv1, Twins). `dwconv=True`: PVTv2's ConvFFN,
  whose zero-padded depthwise conv is the model's only position encoding; `relu=True` adds the
  ReLU that PVTv2-li places before that conv.
  """
  hidden_dim: int
  dwconv: bool = False
  relu: bool = False
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int], deterministic: bool = True):
    dense = lambda f, name: Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    out_dim = x.shape[-1]
    h = dense(self.hidden_dim, "fc1")(x)
    if self.relu:
      h = nn.relu(h)
    if self.dwconv:
      h = tokens_to_map(h, hw)
      h = nn.Conv(self.hidden_dim, (3, 3), padding=1, feature_group_count=self.hidden_dim,
                  kernel_init=conv_init(self.hidden_dim), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="dwconv")(h)
      h = map_to_tokens(h)
    h = gelu(h)
    h = nn.Dropout(self.drop_rate)(h, deterministic=deterministic)
    h = dense(out_dim, "fc2")(h)
    return nn.Dropout(self.drop_rate)(h, deterministic=deterministic)


class PatchEmbed(nn.Module):
  """Conv patch embedding -> LayerNorm(eps 1e-5), returning tokens and the new (H, W).

  Non-overlapping (PVTv1, Twins): kernel = stride = p, no padding (floor sizes).
  Overlapping (PVTv2): kernel k, stride s, padding k // 2, output ceil(H / s) for odd k.
  """
  dim: int
  kernel: int
  stride: int
  overlap: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    pad = self.kernel // 2 if self.overlap else 0
    x = nn.Conv(self.dim, (self.kernel, self.kernel), strides=self.stride, padding=pad,
                kernel_init=conv_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                name="proj")(x)
    hw = (x.shape[1], x.shape[2])
    return layer_norm(1e-5, "norm")(map_to_tokens(x)), hw


class PEG(nn.Module):
  """Twins' positional encoding generator: x + depthwise3×3(x) on the token map."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    c = x.shape[-1]
    m = tokens_to_map(x, hw)
    y = nn.Conv(c, (3, 3), padding=1, feature_group_count=c, kernel_init=conv_init(c),
                dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(m)
    return x + map_to_tokens(y)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's semantics (ResNeSt).

  Eval normalises with the running statistics; `train=True` with the biased batch statistics
  and, outside init, updates r <- momentum·r + (1 - momentum)·stat (flax convention: 0.9 is
  PyTorch's momentum 0.1). The running variance takes the unbiased batch variance, as PyTorch
  does (flax's nn.BatchNorm stores the biased one), so a training step matches torch exactly.
  Statistics and normalisation run in float32; the output is cast to `dtype`.
  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (nn.BatchNorm's names).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)   # two-pass: no cancellation on large means
      if not self.is_initializing():
        n = x.size // c
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * var * (n / max(n - 1, 1)))
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    return ((x32 - mean) * mul + bias.astype(jnp.float32)).astype(self.dtype)

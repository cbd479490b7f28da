"""Building blocks shared by the pyramid backbones.

Token tensors are (B, N, C) with row-major token order n = y·W + x, which is exactly an NHWC
map reshaped, so going between tokens and maps is a free reshape. Norm layers compute in
float32 whatever the compute dtype; their eps follow the references (1e-6 in blocks and final
norms, 1e-5 after patch embedding and after the SR conv).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit import cpu_kernels

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
  """Exact (erf) GELU, PyTorch's nn.GELU() default, in PyTorch's form x/2 · (1 + erf(x/√2)).

  jax.nn.gelu(approximate=False) goes through erfc, whose XLA:CPU expansion is branchy and
  ~6x slower than erf's polynomial; the two agree to float32 round-off (~1e-6).
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """x @ w + b for 2-D x, in x's dtype (w and b are cast to it). bfloat16 on XLA:CPU goes
  through `_bf16_linear`."""
  if x.ndim == 2 and x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    return _bf16_linear(x, w, b)
  if x.ndim == 2 and x.dtype == w.dtype == jnp.float32 and cpu_kernels.usable(x, w):
    return _linear_cpu(x, w, b)
  y = x @ w.astype(x.dtype)
  return y if b is None else y + b.astype(x.dtype)


def _dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _bf16_linear(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  """bfloat16 x @ w + b with the dot accumulated and returned in float32, the bias added in
  float32, then one rounding to bfloat16; the gradient's dots likewise, and dw, db in w's and
  b's own dtype (float32 parameters get float32 gradients, never rounded to bfloat16).

  XLA:CPU widens a dot with a bfloat16 result to float32 operands and runs it at float32
  speed; with a float32 result it keeps the operands in bfloat16 and YNNPACK uses the CPU's
  bfloat16 dot instructions (AVX512-BF16 here): (6272, 1024) @ (1024, 128) at 335 instead of
  155 GFLOP/s. Autodiff of that dot would hand its transposes a float32 cotangent, and it
  reduced the bias gradient through a float32 copy, so the gradient is written out.
  """
  y = _dot_f32(x, w.astype(jnp.bfloat16), (1, 0))
  return (y if b is None else y + b.astype(jnp.float32)).astype(jnp.bfloat16)


def _bf16_linear_fwd(x, w, b):
  return _bf16_linear(x, w, b), (x, w, b)


def _bf16_linear_bwd(res, g):
  x, w, b = res
  dx = _dot_f32(g, w.astype(jnp.bfloat16), (1, 1)).astype(x.dtype)
  grads = cpu_kernels.dense_grads(x, g)   # on float32 copies: see _linear_cpu
  if grads is not None:
    dw, db = grads
    return dx, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)
  dw = _dot_f32(x, g, (0, 0)).astype(w.dtype)
  db = None if b is None else jnp.sum(g, axis=0, dtype=jnp.float32).astype(b.dtype)
  return dx, dw, db


_bf16_linear.defvjp(_bf16_linear_fwd, _bf16_linear_bwd)


@jax.custom_vjp
def _linear_cpu(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  """float32 x @ w + b whose parameter gradient is the `dense_grads` kernel: XLA:CPU's own
  (x^T g, contracting the P rows) ran 1.3-3.5x slower, on one thread where C x F is small."""
  y = x @ w
  return y if b is None else y + b


def _linear_cpu_fwd(x, w, b):
  return _linear_cpu(x, w, b), (x, w, b is None)


def _linear_cpu_bwd(res, g):
  x, w, no_bias = res
  dw, db = cpu_kernels.dense_grads(x, g)
  return _dot_f32(g, w, (1, 1)), dw, None if no_bias else db


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm of float32 `x` over its last axis: (x - mean)·rsqrt(var + eps)·scale + bias,
  the variance two-pass. On XLA:CPU with one device it is `_layer_norm_cpu`."""
  if cpu_kernels.usable(x, scale, bias):
    return _layer_norm_cpu(x.reshape(-1, x.shape[-1]), scale, bias, eps).reshape(x.shape)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x, scale, bias, eps):
  """`normalize` of (N, C) rows and its gradient as C++ kernels (effvit/cpu_kernels/
  layer_norm.cc), each one pass over the rows. XLA:CPU's row reductions over a short minor
  axis and the passes of the differentiated statistics took 2-3x PyTorch's LayerNorm."""
  return cpu_kernels.layer_norm(x, scale, bias, eps)[0]


def _layer_norm_cpu_fwd(x, scale, bias, eps):
  y, mean, rstd = cpu_kernels.layer_norm(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _layer_norm_cpu_bwd(eps, res, g):
  return cpu_kernels.layer_norm_grads(*res, g)


_layer_norm_cpu.defvjp(_layer_norm_cpu_fwd, _layer_norm_cpu_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed and returned in float32 whatever the input dtype
  (nn.LayerNorm(dtype=float32)'s parameters: `scale`, `bias`)."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return normalize(x.astype(jnp.float32), scale, bias, self.epsilon)


def layer_norm(eps: float, name: str | None = None) -> LayerNorm:
  return LayerNorm(epsilon=eps, name=name)


def native_convs() -> bool:
  """Whether convs are XLA's own grouped and strided convolutions (cuDNN's on a GPU) rather
  than the rewrites that XLA:CPU needs (depthwise convs as shifted adds, groups as separate
  convs, strided patches as matmuls). Parameters and results are the same both ways.

  Native on a GPU, rewrites elsewhere; EFFVIT_NATIVE_CONVS=1 or 0 forces either (on the CPU
  the C++ ConvFFN, where it applies, still comes first). On an H100 (bfloat16 train steps,
  benchmarks/compile_time.py) native convs were never slower and compiled faster, pvt_v2_b0
  and b2 trained 1.27x and 1.19x faster, and resnest50d's rewritten step failed there with an
  illegal memory access (benchmarks/README.md)."""
  setting = os.environ.get("EFFVIT_NATIVE_CONVS", "")
  if setting in ("0", "1"):
    return setting == "1"
  return jax.default_backend() == "gpu"


def _grouped_conv(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int):
  """lax's conv of NHWC x with an HWIO kernel of I = C / groups input channels per group."""
  pad = padding if isinstance(padding, str) else ((padding, padding),) * 2
  return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride, stride), pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def tokens_to_map(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])


def map_to_tokens(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])


def _tap_sum(x: jax.Array, kernel: jax.Array, sign: int = 1) -> jax.Array:
  """Σ_ij shift(x, sign·(i - ph), sign·(j - pw)) · kernel[i, j] in float32, where
  shift(x, dy, dx)[:, y, x] = x[:, y + dy, x + dx], zero outside the map.

  x is zero-padded once and the kh·kw taps are slices of that, which XLA:CPU fuses into one
  elementwise loop (grouped convs, feature_group_count = C, run on a generic path 20-40x
  slower). A pad per tap measured 25% slower in pvt_v2_b2's forward and train step: XLA then
  writes more of the shifted copies to memory.
  """
  kh, kw = kernel.shape[:2]
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"depthwise_conv needs an odd kernel, got {kernel.shape[:2]}")
  (h, w), ph, pw = x.shape[1:3], kh // 2, kw // 2
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  k = kernel.astype(jnp.float32)
  out = None
  for i in range(kh):
    for j in range(kw):
      a, b = (i, j) if sign == 1 else (kh - 1 - i, kw - 1 - j)
      t = xp[:, a:a + h, b:b + w].astype(jnp.float32) * k[i, j]
      out = t if out is None else out + t
  return out


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Zero-padded ("same"), stride-1 depthwise conv of NHWC `x` with an odd (kh, kw, C) kernel.

  Equals lax.conv_general_dilated(..., feature_group_count=C) up to float32 round-off;
  accumulates in float32 and returns x.dtype. The gradient is written out (custom_vjp)
  because autodiff of the shifted adds, and XLA's grouped-conv gradients, are both slow:
    dx = Σ_ij shift(g, ph - i, pw - j) · k[i, j]   (the same sum, taps mirrored),
    dk[i, j] = Σ_{b,y,x} x[y, x] · g[y + ph - i, x + pw - j]   (kh·kw reductions).
  On XLA:CPU (3×3, one device) both come from one C++ pass, effvit.cpu_kernels.
  effvit.profile counts it as kh·kw MACs per output element, like the conv it replaces.
  """
  return _tap_sum(x, kernel).astype(x.dtype)


def _depthwise_conv_fwd(x, kernel):
  return depthwise_conv(x, kernel), (x, kernel)


def _depthwise_conv_bwd(res, g):
  x, kernel = res
  fast = cpu_kernels.depthwise_conv3x3_grads(x, kernel, g)
  if fast is not None:
    return fast
  kh, kw = kernel.shape[:2]
  ph, pw = kh // 2, kw // 2
  dx = _tap_sum(g, kernel, sign=-1).astype(x.dtype)
  # Each tap is the product of two zero-paddings, of x and of g, on the (H+kh-1, W+kw-1) grid:
  # XLA:CPU hands pad, product and sum to one YNNPACK reduction, where a slice of g would be
  # copied to memory first (measured 25-40% faster per dk, 5-8% of a PVTv2 train step).
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  g32 = g.astype(jnp.float32)
  tap = lambda i, j: (xp * jnp.pad(g32, ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
                      ).sum((0, 1, 2))
  dk = jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])
  return dx, dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def _conv_bias_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  return gelu(depthwise_conv(x, kernel) + bias.astype(x.dtype))


@jax.custom_vjp
def depthwise_conv_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """gelu(depthwise_conv(x, kernel) + bias), the ConvFFN's conv, bias and activation.

  On XLA:CPU (3×3, one device) both directions are C++ (effvit.cpu_kernels). Without
  a gradient (inference) the forward is one pass where XLA pads in a pass of its own first:
  pvt_v2_b0's batch-32 forward 219 → 205 ms. Under a gradient the forward stays XLA's (its
  conv is shared with nothing else) and the backward recomputes h = conv + bias in cache and
  gives dx, dk and db in one pass, where XLA recomputed h, wrote gy·gelu'(h) and reduced it in
  passes of their own: pvt_v2_b0's batch-32 training step 1019 → 841 ms. Elsewhere it is the
  three ops as XLA differentiates them.
  """
  fast = cpu_kernels.depthwise_conv3x3_bias_gelu(x, kernel, bias)
  return _conv_bias_gelu(x, kernel, bias) if fast is None else fast


def _depthwise_conv_gelu_fwd(x, kernel, bias):
  if cpu_kernels.applies(x, kernel, bias):   # the C++ gradient recomputes h from these
    return _conv_bias_gelu(x, kernel, bias), (x, kernel, bias)
  return jax.vjp(_conv_bias_gelu, x, kernel, bias)   # the vjp function is the residual


def _depthwise_conv_gelu_bwd(res, g):
  if isinstance(res, tuple):
    return cpu_kernels.depthwise_conv3x3_bias_gelu_grads(*res, g)
  return res(g)


depthwise_conv_gelu.defvjp(_depthwise_conv_gelu_fwd, _depthwise_conv_gelu_bwd)


@jax.custom_vjp
def biased_conv_gelu(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                     in_bias: jax.Array) -> jax.Array:
  """depthwise_conv_gelu(x + in_bias, kernel, bias): the ConvFFN with fc1's bias added inside
  the conv kernel's pass (inference on XLA:CPU), where XLA adds it in a pass of its own over
  the largest activation (5% of pvt_v2_b0's forward). Under a gradient it is that add, then
  depthwise_conv_gelu."""
  fast = cpu_kernels.depthwise_conv3x3_bias_gelu(x, kernel, bias, in_bias)
  return depthwise_conv_gelu(x + in_bias.astype(x.dtype), kernel, bias) if fast is None else fast


def _biased_conv_gelu_fwd(x, kernel, bias, in_bias):
  return _depthwise_conv_gelu_fwd(x + in_bias.astype(x.dtype), kernel, bias)


def _biased_conv_gelu_bwd(res, g):
  dx, dk, db = _depthwise_conv_gelu_bwd(res, g)
  return dx, dk, db, dx.astype(jnp.float32).sum((0, 1, 2)).astype(db.dtype)


biased_conv_gelu.defvjp(_biased_conv_gelu_fwd, _biased_conv_gelu_bwd)


class DepthwiseConv(nn.Module):
  """Drop-in for nn.Conv(C, (k, k), padding=k // 2, feature_group_count=C): the same
  parameters (`kernel` (k, k, 1, C), `bias` (C,)) and init, computed by `depthwise_conv`;
  `gelu=True` applies the exact GELU to the output (`depthwise_conv_gelu`, one fused op).
  With `native_convs()` it is XLA's grouped conv, bias and GELU as autodiff sees them."""
  kernel_size: int = 3
  use_bias: bool = True
  gelu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, in_bias: jax.Array | None = None) -> jax.Array:
    """in_bias (C,), with gelu=True only: added to x first (fused into the conv's pass)."""
    c, k = x.shape[-1], self.kernel_size
    kernel = self.param("kernel", conv_init(c), (k, k, 1, c), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            if self.use_bias else None)
    x = x.astype(self.dtype)
    if in_bias is not None and not self.gelu:
      raise ValueError("DepthwiseConv: in_bias is fused with gelu=True only")
    if native_convs():
      x = x if in_bias is None else x + in_bias.astype(x.dtype)
      y = _grouped_conv(x, kernel, 1, k // 2, groups=c)
      y = y if bias is None else y + bias.astype(self.dtype)
      return gelu(y) if self.gelu else y
    if self.gelu:
      bias = jnp.zeros((c,)) if bias is None else bias
      if in_bias is not None:
        return biased_conv_gelu(x, kernel[:, :, 0], bias, in_bias)
      return depthwise_conv_gelu(x, kernel[:, :, 0], bias)
    y = depthwise_conv(x, kernel[:, :, 0])
    return y if bias is None else y + bias.astype(self.dtype)


class PatchConv(nn.Module):
  """nn.Conv(features, (k, k), strides=k, padding="VALID") as a reshape and one matmul.

  The same parameters (`kernel` (k, k, C, F), `bias` unless use_bias=False) and init, the same
  floor output size (trailing rows/columns that fill no patch are dropped). XLA:CPU's gradient
  of a strided conv is several times slower than the matmul's (6x for PVT's 8×8/8 spatial
  reduction); with k = 1 (a pointwise conv, as in ResNeSt) the matmul is 1.4-2.5x faster
  forward and ~2x in the gradient. With `native_convs()`, k > 1 is XLA's strided conv.
  """
  features: int
  patch: int
  use_bias: bool = True
  kernel_init: Any = conv_init()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    k = self.patch
    kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features), self.param_dtype)
    x = x[:, :h // k * k, :w // k * k].astype(self.dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    if k == 1:   # a 2-D matmul, for the kernel gradient's sake (see Dense)
      return linear(x.reshape(-1, c), kernel.reshape(c, -1), bias).reshape(b, h, w, -1)
    if native_convs():
      y = _grouped_conv(x, kernel, k, "VALID", groups=1)
    else:   # patches are strided views: a copy to 2-D costs what it saves
      x = x.reshape(b, h // k, k, w // k, k, c)
      y = jnp.einsum("bhiwjc,ijcf->bhwf", x, kernel.astype(self.dtype))
    return y if bias is None else y + bias.astype(self.dtype)


def _conv_same(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 1):
  return _grouped_conv(x, kernel, stride, padding, groups=1)


# The C++ filter gradient wins on large maps with few channels, XLA's where maps are small
# (float32, batch 8, alone: 1.4-1.9x faster at 112 and 56 px; even at 28; 0.7-0.8x at 14, 7).
FILTER_GRAD_KERNEL_MIN_WIDTH = 56


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The 3×3 conv (stride 1, zero padding 1) of NHWC x with an HWIO kernel, whose filter
  gradient is a C++ kernel (effvit.cpu_kernels.conv3x3_filter_grads) where it applies: XLA:CPU
  transposes x and the output gradient to put the batch innermost and runs a convolution with
  a window the size of the map, at 70-120 GFLOP/s on these shapes."""
  return _conv_same(x, kernel)


def _conv3x3_fwd(x, kernel):
  return _conv_same(x, kernel), (x, kernel)


def _conv3x3_bwd(res, g):
  x, kernel = res
  dx = jax.vjp(lambda a: _conv_same(a, kernel), x)[1](g)[0]
  dk = cpu_kernels.conv3x3_filter_grads(x, g)
  if dk is None:
    dk = jax.vjp(lambda k: _conv_same(x, k), kernel)[1](g)[0]
  return dx, dk.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class GroupedConv(nn.Module):
  """nn.Conv(features, (k, k), strides, padding, feature_group_count=groups) as `groups` dense
  convs on channel slices, concatenated.

  The same parameters (`kernel` (k, k, C / groups, F), `bias`) and init as nn.Conv. XLA:CPU runs
  grouped convs on a slow generic path: for ResNeSt's radix-2 3×3 conv the dense convs of the
  groups are 4-9x faster forward and ~9x faster in the gradient. 3×3 convs with stride 1 on
  maps at least FILTER_GRAD_KERNEL_MIN_WIDTH wide go through `conv3x3`. With `native_convs()`
  it is one grouped conv (feature_group_count=groups).
  """
  features: int
  kernel_size: int
  groups: int = 1
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  kernel_init: Any = conv_init()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g, k = x.shape[-1], self.groups, self.kernel_size
    if c % g or self.features % g:
      raise ValueError(f"{c} input and {self.features} output channels must both be divisible "
                       f"by groups={g}")
    kernel = self.param("kernel", self.kernel_init, (k, k, c // g, self.features),
                        self.param_dtype).astype(self.dtype)
    x = x.astype(self.dtype)
    if native_convs():
      y = _grouped_conv(x, kernel, self.strides, self.padding, groups=g)
    else:
      y = _split_grouped_conv(x, kernel, g, self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y


def _split_grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, stride: int,
                        padding: int) -> jax.Array:
  """GroupedConv on XLA:CPU: a dense conv per group of channels, concatenated."""
  conv = functools.partial(_conv_same, stride=stride, padding=padding)
  if ((kernel.shape[0], stride, padding) == (3, 1, 1)
      and x.shape[2] >= FILTER_GRAD_KERNEL_MIN_WIDTH and cpu_kernels.usable(x)):
    conv = conv3x3
  ci, co = x.shape[-1] // groups, kernel.shape[-1] // groups
  return jnp.concatenate([conv(x[..., i * ci:(i + 1) * ci], kernel[..., i * co:(i + 1) * co])
                          for i in range(groups)], axis=-1)


class Dense(nn.Dense):
  """nn.Dense with the reference init, applied to (..., C) inputs as one (P, C) @ (C, F) matmul.

  Flattening the leading axes keeps the kernel gradient a plain matmul over P. Left as
  (B, N, C), the gradient contracts B and N, and XLA:CPU first transposes the (B, N, F) output
  gradient to (F, B, N) in memory, inside whatever fusion produced it (that and PatchConv's
  equivalent were 15% of a resnest50d train step and 17% of pvt_v2_b0's). The matmul is
  `linear` (bfloat16 on the CPU: float32 accumulation); `precision` and `dot_general` are
  not used.
  """
  kernel_init: Any = dense_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs: jax.Array, add_bias: bool = True):
    """`add_bias=False`: (x @ kernel, bias) for the caller to fuse the bias into what follows."""
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(inputs, self.param_dtype)
    y = linear(inputs.reshape(-1, inputs.shape[-1]).astype(dtype), kernel,
               bias if add_bias else None)
    y = y.reshape(*inputs.shape[:-1], self.features)
    return y if add_bias else (y, bias)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return x
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


# The fused ConvFFN kernel wins where a map's rows are long enough to keep its matmul tiles busy
# and its weights in cache (float32, batch 8 and 32, alone: 1.1-1.3x faster than the three
# ops at 56, 28 and 14 px; 0.8-1.05x at 7 px, where XLA's matmuls reuse the weights across
# the batch).
CONVFFN_KERNEL_MIN_WIDTH = 14


def _convffn_layers(x, w1, b1, kernel, bias, w2, b2):
  """The ConvFFN on an NHWC map as its three ops (fc1, the conv + bias + GELU, fc2)."""
  h = linear(x.reshape(-1, x.shape[-1]), w1, b1).reshape(*x.shape[:3], -1)
  u = depthwise_conv_gelu(h, kernel, bias)
  return linear(u.reshape(-1, u.shape[-1]), w2, b2).reshape(*x.shape[:3], -1)


def _with_layers_gradient(kernel, layers_fn):
  """`kernel` (a C++ call with no gradient rule) made differentiable: its gradient, for a
  gradient of the inference path (saliency, attacks), runs layers_fn's forward again and its
  VJP."""
  fn = jax.custom_vjp(kernel)
  fn.defvjp(lambda *args: (kernel(*args), args),
            lambda args, g: jax.vjp(layers_fn, *args)[1](g))
  return fn


_convffn = _with_layers_gradient(cpu_kernels.convffn, _convffn_layers)


@jax.custom_vjp
def _convffn_trained(x, w1, b1, kernel, bias, w2, b2):
  """cpu_kernels.convffn with the one-pass gradient of cpu_kernels.convffn_grads, which
  recomputes the hidden maps from x: nothing but x is kept for the backward."""
  return cpu_kernels.convffn(x, w1, b1, kernel, bias, w2, b2)


_convffn_trained.defvjp(lambda *args: (cpu_kernels.convffn(*args), args[:6]),
                        lambda args, g: cpu_kernels.convffn_grads(*args, g))

# The training gradient adds each group of rows' x^T dh and u^T gy into dW1 and dW2 in place:
# it wins while those stay in L2 (float32, forward + gradient, alone, against the three ops
# with their kernels: 1.23-1.34x at pvt_v2_b0's 56 and 28 px and pvt_v2_b2's 56 px, 64-256K
# floats; 1.0x at 1M floats, 0.66-0.9x beyond).
CONVFFN_GRAD_KERNEL_MAX_WEIGHTS = 1 << 17


# In bfloat16 models the fused kernels still run in float32 (their tokens are float32), where
# XLA's dots would run on the CPU's bfloat16 units: they win only while the weights are small.
# bfloat16 inference, alone, XLA's bfloat16 ops / the float32 kernel, batch 8 and 32: ConvFFN
# 1.7x and 1.2x faster with the kernel at 2 x 8K and 2 x 32K weights, 0.67-0.96x from 2 x 100K
# on; the plain MLP alike.
BFLOAT16_KERNEL_MAX_WEIGHTS = 1 << 17


def _kernel_weights_fit(fc1: nn.Module, p1: dict, p2: dict, max_weights: int | None) -> bool:
  """Whether the two weight matrices are small enough for a fused kernel: at most max_weights
  floats (None: any), and at most BFLOAT16_KERNEL_MAX_WEIGHTS in a bfloat16 model."""
  limits = [max_weights] if max_weights is not None else []
  if fc1.dtype is not None and jnp.dtype(fc1.dtype) == jnp.bfloat16:
    limits.append(BFLOAT16_KERNEL_MAX_WEIGHTS)
  return p1["kernel"].size + p2["kernel"].size <= min(limits, default=float("inf"))


def fused_convffn(x: jax.Array, hw: tuple[int, int], fc1: nn.Module, conv: nn.Module,
                  fc2: nn.Module, train: bool = False) -> jax.Array | None:
  """The ConvFFN fc2(gelu(conv(fc1(x)))) on tokens x in one C++ pass (cpu_kernels.convffn), from
  the bound layers' parameters; None where it does not apply (maps narrower than
  CONVFFN_KERNEL_MIN_WIDTH, not float32, kernels unusable, weights above
  BFLOAT16_KERNEL_MAX_WEIGHTS in a bfloat16 model, and with `train` weights above
  CONVFFN_GRAD_KERNEL_MAX_WEIGHTS floats): the caller runs the layers. Differentiable: with
  `train` by the one-pass gradient kernel, otherwise by recomputing the three ops."""
  if hw[1] < CONVFFN_KERNEL_MIN_WIDTH:
    return None
  p1, pc, p2 = (m.variables["params"] for m in (fc1, conv, fc2))
  if not _kernel_weights_fit(fc1, p1, p2, CONVFFN_GRAD_KERNEL_MAX_WEIGHTS if train else None):
    return None
  args = (tokens_to_map(x, hw), p1["kernel"], p1["bias"], pc["kernel"][:, :, 0], pc["bias"],
          p2["kernel"], p2["bias"])
  if not cpu_kernels.float32_usable(*args):
    return None
  return map_to_tokens((_convffn_trained if train else _convffn)(*args))


# The fused MLP keeps its weights in cache across a task's rows: it wins while they are small
# (float32, alone: 1.2-1.4x faster than XLA's two dots at Twins' first three stages) and is
# even at 2 x 512 x 2048 (8 MB).
MLP_KERNEL_MAX_WEIGHTS = 1 << 20


def _mlp_layers(x, w1, b1, w2, b2):
  return linear(gelu(linear(x, w1, b1)), w2, b2)


_mlp = _with_layers_gradient(cpu_kernels.mlp, _mlp_layers)


def fused_mlp(x: jax.Array, fc1: nn.Module, fc2: nn.Module) -> jax.Array | None:
  """The transformer MLP fc2(gelu(fc1(x))) on tokens x in one C++ pass (cpu_kernels.mlp), from
  the bound layers' parameters; None where it does not apply (weights above
  MLP_KERNEL_MAX_WEIGHTS floats, or BFLOAT16_KERNEL_MAX_WEIGHTS in a bfloat16 model, not
  float32, kernels unusable). Differentiable, as fused_convffn."""
  p1, p2 = (m.variables["params"] for m in (fc1, fc2))
  if not _kernel_weights_fit(fc1, p1, p2, MLP_KERNEL_MAX_WEIGHTS):
    return None
  args = (x.reshape(-1, x.shape[-1]), p1["kernel"], p1["bias"], p2["kernel"], p2["bias"])
  if not cpu_kernels.float32_usable(*args):
    return None
  return _mlp(*args).reshape(*x.shape[:-1], -1)


class Mlp(nn.Module):
  """fc1 -> [ReLU] -> [depthwise 3×3 conv] -> GELU -> dropout -> fc2 -> dropout.

  `dwconv=False`: the plain transformer MLP (PVTv1, Twins). `dwconv=True`: PVTv2's ConvFFN,
  whose zero-padded depthwise conv is the model's only position encoding; `relu=True` adds the
  ReLU that PVTv2-li places before that conv. In inference on XLA:CPU (float32 tokens, also
  in bfloat16 models) either is one C++ pass where it applies (`fused_convffn`, `fused_mlp`);
  in training without dropout inside it, so is the ConvFFN, forward and gradient
  (`fused_convffn(..., train=True)`).
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
    fc1, fc2 = dense(self.hidden_dim, "fc1"), dense(x.shape[-1], "fc2")
    conv = DepthwiseConv(3, gelu=True, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="dwconv")
    if not self.relu and not self.is_initializing():
      if deterministic:
        fused = (fused_convffn(x, hw, fc1, conv, fc2) if self.dwconv
                 else fused_mlp(x, fc1, fc2))
      else:   # training: the ConvFFN without dropout inside (PVTv2's and LaViT's recipes)
        fused = (fused_convffn(x, hw, fc1, conv, fc2, train=True)
                 if self.dwconv and self.drop_rate == 0 else None)
      if fused is not None:
        return fused
    if self.dwconv and not self.relu and deterministic:
      # Otherwise fc1's bias, the conv, its bias and GELU in one pass. Not in training, where
      # the add costs nothing extra and its gradient would cost a reduction of its own.
      h, fc1_bias = fc1(x, add_bias=False)
      h = map_to_tokens(conv(tokens_to_map(h, hw), in_bias=fc1_bias))
    else:
      h = fc1(x)
      if self.relu:
        h = nn.relu(h)
      # the conv, its bias and GELU as one op
      h = map_to_tokens(conv(tokens_to_map(h, hw))) if self.dwconv else gelu(h)
    h = nn.Dropout(self.drop_rate)(h, deterministic=deterministic)
    h = fc2(h)
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
    if self.overlap or self.kernel != self.stride:
      pad = self.kernel // 2 if self.overlap else 0
      x = nn.Conv(self.dim, (self.kernel, self.kernel), strides=self.stride, padding=pad,
                  kernel_init=conv_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="proj")(x)
    else:
      x = PatchConv(self.dim, self.kernel, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(x)
    hw = (x.shape[1], x.shape[2])
    return layer_norm(1e-5, "norm")(map_to_tokens(x)), hw


class PEG(nn.Module):
  """Twins' positional encoding generator: x + depthwise3×3(x) on the token map."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    m = tokens_to_map(x, hw)
    y = DepthwiseConv(3, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(m)
    return x + map_to_tokens(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, scale, bias, eps):
  """(y, mean, var) of BatchNorm in training: the batch statistics over all axes but the last
  and y = (x - mean)·rsqrt(var + eps)·scale + bias, with a hand-written gradient. On XLA:CPU
  with one device both are C++ kernels (effvit/cpu_kernels/batch_norm.cc), two passes each.

  As XLA differentiates the two-pass statistics, the backward reads x and gy in several
  reductions and elementwise passes; this one takes sum(gy) and sum(gy·x̂) and then dx in one
  elementwise pass. resnest50d's train step (interleaved A/Bs, effvit alone, 2-core CPU): batch
  8 2637 -> 2404, 2841 -> 2593 and 2705 -> 2586 ms; batch 32 10938 -> 10847 ms (noise).
  """
  return _batch_norm_train_fwd(x, scale, bias, eps)[0]


def _batch_norm_train_fwd(x, scale, bias, eps):
  rows = x.reshape(-1, x.shape[-1])
  out = cpu_kernels.batch_norm(rows, scale, bias, eps)
  if out is not None:
    y, mean, var = out
    return (y.reshape(x.shape), mean, var), (x, mean, var, scale)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)   # two-pass: no cancellation on large means
  return ((x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var), (x, mean, var,
                                                                               scale)


def _batch_norm_train_bwd(eps, res, cts):
  x, mean, var, scale = res
  gy, gmean, gvar = cts
  out = cpu_kernels.batch_norm_grads(x.reshape(-1, x.shape[-1]), scale, mean, var,
                                     gy.reshape(-1, x.shape[-1]), gmean, gvar, eps)
  if out is not None:
    dx, dscale, dbias = out
    return dx.reshape(x.shape), dscale, dbias
  axes, n = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
  inv = jax.lax.rsqrt(var + eps)
  xhat = (x - mean) * inv
  dbias, dscale = gy.sum(axes), (gy * xhat).sum(axes)
  # dx = inv·scale·(gy - mean(gy) - xhat·mean(gy·xhat)) + the statistics' own cotangents.
  a = inv * scale
  dx = (a * gy + (gvar * 2 / n / inv - a * dscale / n) * xhat
        + (gmean / n - a * dbias / n))
  return dx, dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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
    x32, scale32, bias32 = (a.astype(jnp.float32) for a in (x, scale, bias))
    if not train:
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale32
      return ((x32 - ra_mean.value) * mul + bias32).astype(self.dtype)
    y, mean, var = _batch_norm_train(x32, scale32, bias32, self.epsilon)
    if not self.is_initializing():
      n = x.size // c
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = (self.momentum * ra_var.value
                      + (1 - self.momentum) * var * (n / max(n - 1, 1)))
    return y.astype(self.dtype)

"""Multi-head scaled dot-product attention, shared by every mechanism in effvit.

For an input of N query tokens and M key/value tokens, with h heads of width d = C / h:

    Q = X Wq,  K = X' Wk,  V = X' Wv                 (X' = X, or a reduced/windowed X)
    A_i = softmax(Q_i K_iᵀ · d^-½)                   (i = 1..h, A_i ∈ R^{N×M})
    Attention(X) = concat_i(A_i V_i) Wo               (heads concatenated head-major)

Heads are split head-major (channel c = i·d + j), as every reference does. Tensors keep the
layout (batch, tokens, heads, head_dim) that `jax.nn.dot_product_attention` takes, so the fast
path needs no transposes. Softmax always runs in float32.

When a caller makes the `"attention"` collection mutable (visualisation, analysis), the
probabilities are computed explicitly and sown there; otherwise a fused path is used: on a
GPU `jax.nn.dot_product_attention` (`fused_attention`: cuDNN's kernel for bfloat16 / float16
and head widths it takes, XLA's otherwise), on CPU a C++ kernel for few keys
(`few_keys_attention`: spatial reduction's 49 keys, Twins' 7x7 windows) and elsewhere a
keys-major layout.
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit import cpu_kernels

ATTENTION_COLLECTION = "attention"


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(..., N, C) -> (..., N, h, C/h), head-major channels."""
  *lead, n, c = x.shape
  return x.reshape(*lead, n, num_heads, c // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """(..., N, h, d) -> (..., N, h·d)."""
  *lead, n, h, d = x.shape
  return x.reshape(*lead, n, h * d)


def softmax_scale(q: jax.Array) -> float:
  """d^-½ for queries (..., d)."""
  return q.shape[-1] ** -0.5


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Scaled logits Q Kᵀ · d^-½ in float32, as (B, h, N, M)."""
  logits = jnp.einsum("...nhd,...mhd->...hnm", q, k, preferred_element_type=jnp.float32)
  return logits * softmax_scale(q)


def apply_attention(probs: jax.Array, v: jax.Array) -> jax.Array:
  """(B, h, N, M) probabilities times (B, M, h, d) values -> (B, N, h, d) in v's dtype."""
  return jnp.einsum("...hnm,...mhd->...nhd", probs.astype(v.dtype), v)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(Q Kᵀ · d^-½) in float32; `mask` (broadcastable to B,h,N,M) is True where allowed."""
  logits = attention_logits(q, k)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def attend(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | None = None) -> jax.Array:
  """Attention output (B, N, h, d) for q (B,N,h,d), k/v (B,M,h,d).

  `module` is the calling Flax module: when its `"attention"` collection is mutable the
  probabilities are sown there (key "probs") for inspection.
  """
  if module.is_mutable_collection(ATTENTION_COLLECTION) and not module.is_initializing():
    probs = attention_probs(q, k, mask)
    module.sow(ATTENTION_COLLECTION, "probs", probs)
    return apply_attention(probs, v)
  if jax.default_backend() == "cpu":
    fused = few_keys_attention(q, k, v) if mask is None else None
    return keys_major_attention(q, k, v, mask) if fused is None else fused
  return fused_attention(q, k, v, mask)


# cuDNN's fused attention takes head widths that are multiples of 8 up to 128 (256 from Hopper
# on) in float16 / bfloat16, on compute capability 8.0 and later; effvit's heads are 32-64 wide.
CUDNN_MAX_HEAD_DIM = 128
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)


def cudnn_supported(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                    device=None) -> bool:
  """Whether `fused_attention` asks cuDNN for these operands on `device` (default: the first).

  Query and key counts must be even: jax 0.11.2 on an H100 refused every odd count, so
  spatial reduction's 49 keys and 7x7 windows keep XLA's attention (jax 0.10 refused odd
  counts only with a mask, which becomes a bias). `EFFVIT_CUDNN_ATTENTION=0` turns cuDNN off."""
  if os.environ.get("EFFVIT_CUDNN_ATTENTION", "1") == "0":
    return False
  device = jax.devices()[0] if device is None else device
  if device.platform != "gpu":
    return False
  try:
    capability = tuple(int(p) for p in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):   # not a CUDA device (ROCm reports gfx names)
    return False
  d = q.shape[-1]
  return (capability >= CUDNN_MIN_COMPUTE_CAPABILITY
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype
          and d % 8 == 0 and d <= CUDNN_MAX_HEAD_DIM and k.shape[-1] == v.shape[-1] == d
          and q.shape[1] % 2 == k.shape[1] % 2 == 0)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` (B, N, h, d), with cuDNN's fused kernel where
  `cudnn_supported` says so and XLA's otherwise.

  jax's default (implementation=None) is XLA's, which writes the (N, M) logits and
  probabilities to memory, so cuDNN has to be asked for. Where jax still finds, while
  tracing, that cuDNN cannot take the call (no cuDNN found, an unsupported pattern), it warns
  and uses XLA's, which gives the same attention."""
  if mask is not None and mask.ndim == 4 and mask.shape[1] == 1:
    mask = jnp.broadcast_to(mask, mask.shape[:1] + (q.shape[2],) + mask.shape[2:])
  scale = softmax_scale(q)
  if cudnn_supported(q, k, v, mask):
    try:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                         implementation="cudnn")
      return out.astype(v.dtype)
    except (NotImplementedError, RuntimeError, ValueError) as err:
      warnings.warn(f"effvit: cuDNN attention unavailable for q {q.shape} {q.dtype}, "
                    f"{k.shape[1]} keys ({err}); using XLA's", stacklevel=2)
  # XLA's implementation upcasts the logits to float32 before the softmax.
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  return out.astype(v.dtype)


def keys_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array | None = None) -> jax.Array:
  """`attend` for XLA:CPU: logits laid out (B, h, M, N), normalised after the second product.

  With few keys (M = 49 under spatial reduction) a softmax over a minor axis of 49 is split by
  XLA:CPU into windowed reductions; over the major key axis it is an elementwise max/sum across
  contiguous queries. Dividing the (N, d) output instead of the (M, N) probabilities saves
  work when d < M. Measured: pvt_v2_b0 inference at batch 32 6% faster, b2 and Twins 2-3%,
  training unchanged.
  """
  s = jnp.einsum("...mhd,...nhd->...hmn", k, q, preferred_element_type=jnp.float32)
  s = s * softmax_scale(q)
  if mask is not None:
    s = jnp.where(jnp.swapaxes(mask, -1, -2), s, jnp.finfo(jnp.float32).min)
  p = jnp.exp(s - s.max(axis=-2, keepdims=True))
  out = jnp.einsum("...hmn,...mhd->...nhd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / jnp.swapaxes(p.sum(axis=-2), -1, -2)[..., None]).astype(v.dtype)


# Above this many keys, or with head widths not a multiple of 16, XLA's ops are kept.
FUSED_MAX_KEYS = 256
# bfloat16 q, k, v go to the kernel widened to float32 (output rounded once), where XLA:CPU
# widened them op by op: bfloat16 train steps, batch 8, interleaved medians: pvt_v2_b0 348 ->
# 287 ms, twins_svt_small 1048 -> 911, pvt_v2_b2 1454 -> 1359; inference even.
BFLOAT16_IN_FLOAT32 = True


def few_keys_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array | None:
  """`attend` without a mask in one C++ pass per direction (effvit.cpu_kernels, attention.cc),
  None where it does not apply: float32 (or bfloat16, widened) on XLA:CPU with one device, at
  most FUSED_MAX_KEYS keys, head width a multiple of 16, q, k and v with the same leading
  dimensions. The logits and probabilities stay in cache, where XLA writes and rereads them in
  a dozen passes.
  Alone, against keys_major_attention (benchmarks/attention_kernel.py, 2-core Zen 4, batch
  32): pvt_v2_b0's first stage (3136 queries, 49 keys) 2.1x forward and 2.9x forward +
  gradient, its last (49 and 49) 1.1x and 1.3x, Twins' 7x7 windows 1.7x and 2.0x. Training
  steps: pvt_v2_b0 (batch 32) 1147 -> 1042 ms, twins_pcpvt_small (batch 8) 1463 -> 1286 ms;
  inference about 1% faster (the keys-major forward was already cheap).
  """
  lead, d = q.shape[:-3], q.shape[-1]
  if k.shape[:-3] != lead or v.shape != k.shape or k.shape[-3] > FUSED_MAX_KEYS or d % 16:
    return None
  q4, k4, v4 = (a.reshape((-1,) + a.shape[-3:]) for a in (q, k, v))
  if BFLOAT16_IN_FLOAT32 and q.dtype == k.dtype == v.dtype == jnp.bfloat16:
    q4, k4, v4 = (a.astype(jnp.float32) for a in (q4, k4, v4))
  if not cpu_kernels.float32_usable(q4, k4, v4):
    return None
  return _fused_attention(q4, k4, v4).reshape(q.shape).astype(q.dtype)


@jax.custom_vjp
def _fused_attention(q, k, v):
  return cpu_kernels.attention(q, k, v, softmax_scale(q))[0]


def _fused_attention_fwd(q, k, v):
  o, lse = cpu_kernels.attention(q, k, v, softmax_scale(q))
  return o, (q, k, v, o, lse)


def _fused_attention_bwd(res, g):
  return cpu_kernels.attention_grads(*res, g, softmax_scale(res[0]))


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)

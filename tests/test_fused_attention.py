"""The GPU attention path (effvit.attention.core.fused_attention): when it asks
jax.nn.dot_product_attention for cuDNN's kernel, and that it falls back to XLA's with a warning
where jax refuses. The selection runs on fake devices; the calls run on this CPU, where cuDNN
is absent, against float64 softmax attention."""
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit.attention import core

HOPPER = types.SimpleNamespace(platform="gpu", compute_capability="9.0")


def operands(dtype=jnp.bfloat16, n=16, m=8, d=64):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(kk, (2, s, 2, d)).astype(dtype)
               for kk, s in zip(keys, (n, m, m)))


def attention_float64(q, k, v, mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("device, dtype, n, m, d, masked, expected", [
    (HOPPER, jnp.bfloat16, 16, 8, 64, False, True),
    (HOPPER, jnp.float16, 16, 8, 32, False, True),
    (HOPPER, jnp.float32, 16, 8, 64, False, False),      # cuDNN: half precision only
    (HOPPER, jnp.bfloat16, 16, 8, 12, False, False),     # head width not a multiple of 8
    (HOPPER, jnp.bfloat16, 16, 8, 136, False, False),    # wider than 128
    (HOPPER, jnp.bfloat16, 16, 8, 64, True, True),       # mask with even lengths
    (HOPPER, jnp.bfloat16, 49, 49, 64, True, False),     # odd lengths: 7x7 windows
    (HOPPER, jnp.bfloat16, 3136, 49, 64, False, False),  # odd lengths: 49 keys (SRA at 224)
    (HOPPER, jnp.bfloat16, 4096, 64, 64, False, True),   # 64 keys (SRA at 256 px)
    (types.SimpleNamespace(platform="gpu", compute_capability="7.5"), jnp.bfloat16, 16, 8, 64,
     False, False),                                      # Turing: no flash attention
    (types.SimpleNamespace(platform="gpu", compute_capability="gfx90a"), jnp.bfloat16, 16, 8,
     64, False, False),                                  # ROCm
    (types.SimpleNamespace(platform="cpu"), jnp.bfloat16, 16, 8, 64, False, False),
])
def test_cudnn_supported(device, dtype, n, m, d, masked, expected):
  q, k, v = operands(dtype, n, m, d)
  mask = jnp.ones((2, 1, n, m), bool) if masked else None
  assert core.cudnn_supported(q, k, v, mask, device=device) is expected


def test_cudnn_can_be_turned_off(monkeypatch):
  q, k, v = operands()
  monkeypatch.setenv("EFFVIT_CUDNN_ATTENTION", "0")
  assert not core.cudnn_supported(q, k, v, device=HOPPER)


def test_asks_for_cudnn_where_supported(monkeypatch):
  """The call names implementation="cudnn" (jax's default would be XLA's); stood in for by
  XLA's here, the result is softmax attention with the mask broadcast over heads."""
  real, asked = jax.nn.dot_product_attention, []

  def recording(*args, implementation=None, **kwargs):
    asked.append(implementation)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(core, "cudnn_supported", lambda *a, **kw: True)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  q, k, v = operands(jnp.float32)
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (2, 1, 16, 8)).at[..., 0].set(True)
  out = core.fused_attention(q, k, v, mask)
  assert asked == ["cudnn"]
  np.testing.assert_allclose(out, attention_float64(q, k, v, mask), rtol=1e-5, atol=1e-5)
  monkeypatch.setattr(core, "cudnn_supported", lambda *a, **kw: False)
  core.fused_attention(q, k, v)
  assert asked == ["cudnn", "xla"]


def test_falls_back_to_xla_when_jax_refuses(monkeypatch):
  """Here jax refuses cuDNN (none on this machine) while tracing: a warning, then XLA's
  attention, whose values and gradients are softmax attention's, also under jit and grad."""
  monkeypatch.setattr(core, "cudnn_supported", lambda *a, **kw: True)
  q, k, v = operands(jnp.float32)
  with pytest.warns(UserWarning, match="cuDNN attention unavailable"):
    out = core.fused_attention(q, k, v)
  np.testing.assert_allclose(out, attention_float64(q, k, v), rtol=1e-5, atol=1e-5)

  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
  reference = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    grads = jax.jit(jax.grad(loss(core.fused_attention), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads, jax.grad(reference, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""The few-keys attention kernel (effvit/cpu_kernels/attention.cc) against float64 softmax
attention and its closed-form gradient, and the attention modules with and without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit.attention import core
from effvit.attention.locally_grouped import LocallyGroupedAttention
from effvit.attention.spatial_reduction import SpatialReductionAttention
from effvit.profile import count_macs

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")
TARGET = "effvit_attention_f32"


def attention_float64(q, k, v, g):
  """o, lse and (dq, dk, dv) given g = dL/do, in float64 from the closed form:
  dV = Pᵀ g, dS = P ⊙ (g Vᵀ − rowsum(g ⊙ O)), dQ = s dS K, dK = s dSᵀ Q."""
  q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
  s = q.shape[-1] ** -0.5
  logits = s * np.einsum("bnhd,bmhd->bhnm", q, k)
  mx = logits.max(-1, keepdims=True)
  lse = mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True))
  p = np.exp(logits - lse)
  o = np.einsum("bhnm,bmhd->bnhd", p, v)
  dv = np.einsum("bhnm,bnhd->bmhd", p, g)
  dp = np.einsum("bnhd,bmhd->bhnm", g, v)
  ds = p * (dp - np.einsum("bnhd,bnhd->bhn", g, o)[..., None])
  dq = s * np.einsum("bhnm,bmhd->bnhd", ds, k)
  dk = s * np.einsum("bhnm,bnhd->bmhd", ds, q)
  return o, lse[..., 0].transpose(0, 2, 1), (dq, dk, dv)


def operands(rng, b, n, m, h, d):
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
  # keys scaled up so that the softmax is far from uniform
  return normal(b, n, h, d), normal(b, m, h, d, scale=3.0), normal(b, m, h, d), normal(b, n, h, d)


# (B, N, M, H, d). Query rows go in blocks of 64 and chunks of 512 per (batch element, head),
# tasks take several chunks when N is small: one key; PVTv2's 49 keys over a partial block and
# two chunks (N = 600); Twins' 7x7 windows (N = M = 49, tasks of several windows); keys below,
# at and past the 16-lane vectors (17, 64, 65) and the largest count used (256); heads of 16
# and 64 channels.
@needs_compiler
@pytest.mark.parametrize("shape", [(1, 5, 1, 1, 16), (2, 600, 49, 1, 32), (20, 49, 49, 2, 32),
                                   (3, 130, 17, 2, 64), (1, 70, 64, 3, 16),
                                   (2, 33, 65, 1, 32), (1, 40, 256, 2, 16)])
def test_kernel_matches_float64(shape, single_device):
  q, k, v, g = operands(np.random.default_rng(0), *shape)
  scale = shape[-1] ** -0.5
  o, lse = jax.jit(cpu_kernels.attention, static_argnums=3)(q, k, v, scale)
  grads = jax.jit(cpu_kernels.attention_grads, static_argnums=6)(q, k, v, o, lse, g, scale)
  ref_o, ref_lse, ref_grads = attention_float64(q, k, v, g)
  np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=2e-6 * np.abs(ref_o).max())
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-5)
  for ours, ref in zip(grads, ref_grads):   # with one key dk is 0 up to round-off
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-5 * max(np.abs(ref).max(), 1))


@needs_compiler
def test_results_do_not_depend_on_the_batch(single_device):
  # 600 query rows: two chunks per image, whose dK and dV partials are added in chunk order;
  # three images of one head share tasks differently from one image alone.
  q, k, v, g = operands(np.random.default_rng(1), 3, 600, 49, 1, 32)
  fwd = jax.jit(cpu_kernels.attention, static_argnums=3)
  bwd = jax.jit(cpu_kernels.attention_grads, static_argnums=6)
  o, lse = fwd(q, k, v, 32 ** -0.5)
  grads = bwd(q, k, v, o, lse, g, 32 ** -0.5)
  for i in range(3):
    one = lambda a: a[i:i + 1]
    o1, lse1 = fwd(one(q), one(k), one(v), 32 ** -0.5)
    np.testing.assert_array_equal(np.asarray(o1)[0], np.asarray(o)[i])
    np.testing.assert_array_equal(np.asarray(lse1)[0], np.asarray(lse)[i])
    for a, b in zip(bwd(one(q), one(k), one(v), o1, lse1, one(g), 32 ** -0.5), grads):
      np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[i])


@needs_compiler
def test_on_only_where_it_applies(monkeypatch):
  q, k, v, _ = operands(np.random.default_rng(2), 2, 10, 7, 2, 16)
  assert jax.device_count() == 8   # conftest: no sharding rule for an FFI call
  assert core.few_keys_attention(q, k, v) is None
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)
  assert core.few_keys_attention(q, k, v) is not None
  assert core.few_keys_attention(q[None], k[None], v[None]).shape == (1,) + q.shape
  wide = jnp.zeros((2, core.FUSED_MAX_KEYS + 1, 2, 16))
  assert core.few_keys_attention(q, wide, wide) is None
  assert core.few_keys_attention(q[..., :12], k[..., :12], v[..., :12]) is None   # d % 16


@needs_compiler
def test_bfloat16_runs_the_kernel_in_float32(monkeypatch):
  """bfloat16 q, k, v are widened for the kernel and its output rounded once: the result is
  the float32 kernel's on the rounded operands, within bfloat16's rounding of float64
  attention, and the gradients come back in bfloat16."""
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)
  q, k, v, g = operands(np.random.default_rng(5), 2, 40, 7, 2, 16)
  bf16 = lambda a: a.astype(jnp.bfloat16)
  qb, kb, vb = bf16(q), bf16(k), bf16(v)
  out = core.few_keys_attention(qb, kb, vb)
  assert out is not None and out.dtype == jnp.bfloat16
  f32 = lambda a: a.astype(jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(f32(out)), np.asarray(f32(bf16(core.few_keys_attention(f32(qb), f32(kb),
                                                                          f32(vb))))))
  want = attention_float64(f32(qb), f32(kb), f32(vb), g)[0]
  np.testing.assert_allclose(np.asarray(f32(out)), want, rtol=8e-3, atol=8e-3)
  grads = jax.grad(lambda q, k, v: jnp.sum(f32(core.few_keys_attention(q, k, v)) * g),
                   argnums=(0, 1, 2))(qb, kb, vb)
  assert all(a.dtype == jnp.bfloat16 for a in grads)
  monkeypatch.setattr(core, "BFLOAT16_IN_FLOAT32", False)
  assert core.few_keys_attention(qb, kb, vb) is None


MODULES = {
    "spatial reduction": (SpatialReductionAttention(num_heads=2, sr_ratio=2), (8, 8), 64),
    "7x7 windows": (LocallyGroupedAttention(num_heads=2, window=7), (14, 7), 64),
}


@needs_compiler
@pytest.mark.parametrize("name", MODULES)
def test_modules_use_the_kernel_with_xla_results_and_gradients(name, monkeypatch,
                                                               single_device):
  module, hw, c = MODULES[name]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, hw[0] * hw[1], c)), jnp.float32)
  variables = module.init(jax.random.key(0), x, hw)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype),
                           variables)
  apply = lambda v, x: module.apply(v, x, hw)[0]
  loss = lambda v, x: jnp.sum(jnp.sin(apply(v, x)))
  results, macs = [], []
  for kernels in ("1", "0"):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", kernels)
    fwd = jax.jit(lambda v, x: apply(v, x)).lower(variables, x)   # a new trace each time
    grad = jax.jit(jax.grad(lambda v, x: loss(v, x), (0, 1))).lower(variables, x)
    assert (TARGET in fwd.as_text()) == (TARGET in grad.as_text()) == (kernels == "1")
    results.append((fwd.compile()(variables, x), grad.compile()(variables, x)))
    macs.append(count_macs(lambda v, x: apply(v, x), variables, x))
  assert macs[0] == macs[1]   # the GFLOP/s of the benchmarks see through the fused call
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  jax.tree.map(close, *results)

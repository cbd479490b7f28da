"""The dense-layer parameter gradient kernel (effvit/cpu_kernels/dense_grads.cc) against float64
x^T g and sum(g), and effvit.layers.linear / Dense with and without it; the 3×3 conv filter
gradient built on it against a float64 sum over the nine shifted maps, and GroupedConv with and
without it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit import layers
from effvit.layers import Dense, GroupedConv, linear

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")


# P: one row, fewer rows than a chunk, many chunks; C: below one 6-row tile, tails after it,
# several 48-channel blocks; F: below 16, tails after the 64-, 32- and 16-wide tiles.
@needs_compiler
@pytest.mark.parametrize("p,c,f", [(1, 1, 1), (5, 7, 3), (700, 37, 70), (3000, 64, 32),
                                   (1100, 100, 1000), (40, 300, 112)])
def test_kernel_matches_float64(p, c, f, single_device):
  rng = np.random.default_rng(p + c + f)
  x = rng.standard_normal((p, c)) + rng.uniform(-2, 2, c)   # off-centre columns
  g = rng.standard_normal((p, f))
  dw, db = jax.jit(cpu_kernels.dense_grads)(jnp.asarray(x, jnp.float32),
                                            jnp.asarray(g, jnp.float32))
  assert dw.shape == (c, f) and db.shape == (f,) and dw.dtype == db.dtype == jnp.float32
  for ours, ref in ((dw, x.T @ g), (db, g.sum(0))):
    # float32 inputs rounded once, sums of p products: error ~ sqrt(p) ulps of the terms
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * np.sqrt(p) * (np.abs(x).max() + 1)
                               * np.abs(g).max() * 4)


@needs_compiler
def test_kernel_result_does_not_depend_on_timing(single_device):
  """Partials are added in chunk order: repeated calls agree bit for bit."""
  rng = np.random.default_rng(0)
  x, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((5000, 40), (5000, 96)))
  fn = jax.jit(cpu_kernels.dense_grads)
  first = fn(x, g)
  for _ in range(5):
    for a, b in zip(fn(x, g), first):
      np.testing.assert_array_equal(a, b)


@needs_compiler
@pytest.mark.parametrize("use_bias,dtype", [(True, jnp.float32), (False, jnp.float32),
                                            (True, jnp.bfloat16)])
def test_dense_gradients_same_with_and_without_the_kernel(use_bias, dtype, monkeypatch,
                                                         single_device):
  """float32, and bfloat16 activations with float32 parameters (the kernel on float32 copies,
  against YNNPACK's bfloat16 dot accumulated in float32): parameter gradients stay float32."""
  module = Dense(24, use_bias=use_bias, dtype=dtype)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 50, 20)), dtype)
  g = jnp.asarray(rng.standard_normal((3, 50, 24)), dtype)
  variables = module.init(jax.random.key(0), x)
  if use_bias:
    variables["params"]["bias"] = jnp.asarray(rng.standard_normal(24), jnp.float32)
  assert_same_with_and_without_kernels(module, variables, x, g, "effvit_dense_grads_f32",
                                       monkeypatch, tol=1e-5)


def assert_same_with_and_without_kernels(module, variables, x, g, target, monkeypatch, tol):
  """module's output and gradients (given output gradient g) with the C++ kernels on, whose
  backward then calls `target`, and off (XLA's path): equal within tol, in the same dtypes,
  and the kernel's gradient float32."""
  results = []
  for kernels in ("1", "0"):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", kernels)
    fn = jax.jit(lambda v, x: module.apply(v, x))   # traced again for each setting
    backward = jax.jit(lambda v, x: jax.vjp(fn, v, x)[1](g))
    assert (target in backward.lower(variables, x).as_text()) == (kernels == "1")
    y, vjp = jax.vjp(fn, variables, x)
    results.append((y, *vjp(g)))
  assert jax.tree.structure(results[0]) == jax.tree.structure(results[1])
  assert results[0][1]["params"]["kernel"].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol)


def test_kernel_is_off_for_bfloat16_and_on_several_devices():
  assert jax.device_count() == 8   # conftest
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  assert cpu_kernels.dense_grads(x, jnp.ones((4, 3))) is None
  grad = jax.grad(lambda w: linear(x, w).sum())
  assert "effvit_dense_grads" not in jax.jit(grad).lower(w).as_text()
  np.testing.assert_array_equal(grad(w), np.full((8, 3), 4.0))


def conv3x3_filter_grads_float64(x, g):
  """dK[dy, dx] = sum over pixels of x shifted by the tap (zero padding 1) times g."""
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return np.stack([np.stack([np.einsum("bhwc,bhwf->cf", xp[:, dy:dy + h, dx:dx + w], g)
                             for dx in range(3)]) for dy in range(3)])


# Maps of one pixel, narrower than the 3 taps, odd; channel tails and several 48-channel
# blocks; F below 16 and with tails; chunks of rows that span several images.
@needs_compiler
@pytest.mark.parametrize("b,h,w,c,f", [(1, 1, 1, 1, 1), (2, 1, 2, 3, 5), (3, 5, 7, 7, 70),
                                       (2, 9, 4, 100, 17), (4, 16, 16, 32, 64),
                                       (2, 23, 56, 13, 32)])
def test_conv3x3_filter_grads_match_float64(b, h, w, c, f, single_device):
  rng = np.random.default_rng(b + h + w + c + f)
  x = rng.standard_normal((b, h, w, c)) + rng.uniform(-2, 2, c)
  g = rng.standard_normal((b, h, w, f))
  dk = jax.jit(cpu_kernels.conv3x3_filter_grads)(jnp.asarray(x, jnp.float32),
                                                 jnp.asarray(g, jnp.float32))
  assert dk.shape == (3, 3, c, f) and dk.dtype == jnp.float32
  p = b * h * w
  np.testing.assert_allclose(dk, conv3x3_filter_grads_float64(x, g), rtol=0,
                             atol=1e-6 * np.sqrt(p) * (np.abs(x).max() + 1) * np.abs(g).max() * 4)


@needs_compiler
def test_conv3x3_filter_grads_do_not_depend_on_timing(single_device):
  rng = np.random.default_rng(1)
  x, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 20, 30, 40),
                                                                     (4, 20, 30, 24)))
  fn = jax.jit(cpu_kernels.conv3x3_filter_grads)
  first = fn(x, g)
  for _ in range(5):
    np.testing.assert_array_equal(fn(x, g), first)


@needs_compiler
@pytest.mark.parametrize("groups,dtype", [(1, jnp.float32), (2, jnp.float32),
                                          (2, jnp.bfloat16)])
def test_grouped_conv_gradients_same_with_and_without_the_filter_kernel(
    groups, dtype, monkeypatch, single_device):
  monkeypatch.setattr(layers, "FILTER_GRAD_KERNEL_MIN_WIDTH", 8)   # the test's small maps
  module = GroupedConv(12, 3, groups, padding=1, dtype=dtype)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 6, 9, 8)), dtype)
  g = jnp.asarray(rng.standard_normal((2, 6, 9, 12)), dtype)
  variables = module.init(jax.random.key(0), x)
  assert_same_with_and_without_kernels(module, variables, x, g,
                                       "effvit_conv3x3_filter_grads_f32", monkeypatch,
                                       tol=1e-5 if dtype == jnp.float32 else 2e-2)

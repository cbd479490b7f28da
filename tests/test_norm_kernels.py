"""The LayerNorm and BatchNorm C++ kernels and their gradients (effvit/cpu_kernels/layer_norm.cc,
batch_norm.cc) against float64 closed forms, and the modules that use them (effvit.layers
LayerNorm against flax's nn.LayerNorm, BatchNorm) with and without the kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit.layers import BatchNorm, LayerNorm, layer_norm

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")


def layer_norm_reference(x, scale, bias, g, eps):
  """y, dx, dscale, dbias in float64, from the closed form of the LayerNorm gradient."""
  x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
  mean = x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  xh = (x - mean) * rstd
  gs = g * scale
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - xh * (gs * xh).mean(-1, keepdims=True))
  return xh * scale + bias, dx, (g * xh).sum(0), g.sum(0)


def close(ours, ref, rtol):
  ours = np.asarray(ours, np.float64)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * np.abs(ref).max())


# rows fewer than, equal to and many more than the kernel's 16 chunks; channel counts with a
# tail after the 16-wide blocks, without one, and shorter than one block.
@needs_compiler
@pytest.mark.parametrize("n,c,eps", [(1, 3, 1e-6), (7, 37, 1e-5), (16, 32, 1e-6),
                                     (1000, 64, 1e-6), (33, 320, 1e-5)])
def test_layer_norm_kernel_and_gradient_match_float64(n, c, eps, single_device):
  rng = np.random.default_rng(n + c)
  # rows of different spreads, off centre
  x = jnp.asarray(rng.standard_normal((n, c)) * rng.uniform(0.3, 3, (n, 1)) + 3, jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (c, (n, c)))
  y, mean, rstd = jax.jit(cpu_kernels.layer_norm, static_argnums=3)(x, scale, bias, eps)
  dx, dscale, dbias = jax.jit(cpu_kernels.layer_norm_grads)(x, scale, mean, rstd, g)
  ref_y, ref_dx, ref_dscale, ref_dbias = layer_norm_reference(x, scale, bias, g, eps)
  close(y, ref_y, 5e-6)
  close(dx, ref_dx, 2e-5)
  close(dscale, ref_dscale, 2e-5)
  close(dbias, ref_dbias, 1e-6)
  np.testing.assert_allclose(mean, np.asarray(x, np.float64).mean(-1), rtol=1e-6)


@needs_compiler
@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_module_matches_flax_layer_norm(kernels, dtype, monkeypatch, single_device):
  monkeypatch.setenv("EFFVIT_CPU_KERNELS", kernels)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 40)) * 2 + 1, dtype)
  g = jnp.asarray(rng.standard_normal((2, 9, 40)), jnp.float32)
  ours, flax_ln = layer_norm(1e-5), nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
  variables = flax_ln.init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(np.shape,
                                                                                 variables)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 40), jnp.float32),
                          "bias": jnp.asarray(rng.standard_normal(40), jnp.float32)}}
  results = []
  for module in (ours, flax_ln):
    fn = jax.jit(lambda v, x: module.apply(v, x))
    assert ("effvit_layer_norm_f32" in fn.lower(variables, x).as_text()) == (
        module is ours and kernels == "1")
    y, vjp = jax.vjp(fn, variables, x)
    results.append((y, *vjp(g)))
  tol = 1e-5 if dtype == jnp.float32 else 2 ** -7   # bfloat16 dx: one rounding apart
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                               atol=tol)
  assert results[0][0].dtype == jnp.float32 and results[0][2].dtype == dtype


def test_layer_norm_kernel_is_off_on_several_devices():
  assert jax.device_count() == 8   # conftest
  x = jnp.ones((4, 8))
  assert cpu_kernels.layer_norm(x, jnp.ones(8), jnp.zeros(8), 1e-6) is None
  variables = jax.jit(LayerNorm().init)(jax.random.key(0), x)
  assert jax.tree.map(np.shape, variables) == {"params": {"scale": (8,), "bias": (8,)}}
  text = jax.jit(lambda x: LayerNorm().apply(variables, x)).lower(x).as_text()
  assert "effvit_layer_norm" not in text


def batch_norm_reference(x, scale, bias, gy, gmean, gvar, eps):
  """y, mean, var and the gradient of sum(gy·y) + sum(gmean·mean) + sum(gvar·var) w.r.t. x,
  scale and bias, in float64."""
  x, scale, bias, gy, gmean, gvar = (np.asarray(a, np.float64)
                                     for a in (x, scale, bias, gy, gmean, gvar))
  n = x.shape[0]
  mean = x.mean(0)
  var = ((x - mean) ** 2).mean(0)
  xh = (x - mean) / np.sqrt(var + eps)
  a = scale / np.sqrt(var + eps)
  dx = (a * (gy - gy.mean(0) - xh * (gy * xh).mean(0)) + gmean / n
        + gvar * 2 * (x - mean) / n)
  return xh * scale + bias, mean, var, dx, (gy * xh).sum(0), gy.sum(0)


@needs_compiler
@pytest.mark.parametrize("r,c", [(1, 5), (9, 37), (16, 16), (3000, 64), (50, 300)])
def test_batch_norm_kernel_and_gradient_match_float64(r, c, single_device):
  rng = np.random.default_rng(r * c)
  # channels of different spreads and means, far from the first row's values in some
  x = jnp.asarray(rng.standard_normal((r, c)) * rng.uniform(0.3, 3, c)
                  + rng.uniform(-20, 20, c), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias, gmean, gvar = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(3))
  gy = jnp.asarray(rng.standard_normal((r, c)), jnp.float32)
  y, mean, var = jax.jit(cpu_kernels.batch_norm, static_argnums=3)(x, scale, bias, 1e-5)
  grads = jax.jit(cpu_kernels.batch_norm_grads, static_argnums=7)(x, scale, mean, var, gy,
                                                                  gmean, gvar, 1e-5)
  ref = batch_norm_reference(x, scale, bias, gy, gmean, gvar, 1e-5)
  for ours, want, tol in zip((y, mean, var, *grads), ref, (1e-5, 1e-6, 1e-5, 1e-4, 1e-4, 1e-5)):
    close(ours, want, tol)


@needs_compiler
def test_batch_norm_module_same_with_and_without_the_kernel(monkeypatch, single_device):
  """Training output, running statistics and gradients of effvit.layers.BatchNorm (checked
  against torch in test_resnest.py, where the suite's 8 devices keep the kernel off)."""
  module = BatchNorm(momentum=0.9)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((4, 6, 5, 24)) * 2 + 1, jnp.float32)
  variables = module.init(jax.random.key(0), x, train=True)
  variables = {**variables, "params": {"scale": jnp.asarray(rng.uniform(0.5, 2, 24), jnp.float32),
                                       "bias": jnp.asarray(rng.standard_normal(24), jnp.float32)}}

  def step(params, x):
    y, updates = module.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y)), (y, updates)

  results = []
  for on in ("1", "0"):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", on)
    fn = jax.jit(jax.grad(step, argnums=(0, 1), has_aux=True))
    assert ("effvit_batch_norm_bwd_f32" in fn.lower(variables["params"], x).as_text()) == (
        on == "1")
    results.append(fn(variables["params"], x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)

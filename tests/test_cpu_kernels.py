"""The C++ depthwise-conv kernels (effvit.cpu_kernels) against XLA's grouped conv and GELU, and
their fallback when they cannot be built (the norm kernels: test_norm_kernels.py)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit.layers import DepthwiseConv, Mlp, depthwise_conv
from effvit.models import create_model
from pyramid_helpers import FAST_COMPILE, grouped_conv, random_variables

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")


def grouped_conv_grads(x, kernel, g):
  return jax.vjp(grouped_conv, x, kernel)[1](g)


SHAPES = [(2, 5, 7, 20), (1, 1, 1, 3), (3, 6, 4, 32), (1, 9, 2, 17), (20, 3, 3, 16)]


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_grouped_conv_gradients(shape, single_device):
  # 20 and 17 channels exercise the 16-lane blocks and the scalar tail; 1×1 and 9×2 maps the
  # borders; batch 20 × 3 rows spreads rows over all 16 chunks.
  rng = np.random.default_rng(0)
  x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1])), jnp.float32)
  ours = jax.jit(cpu_kernels.depthwise_conv3x3_grads)(x, kernel, g)
  assert ours is not None, "the kernel should build and apply here"
  for a, b in zip(ours, grouped_conv_grads(x, kernel, g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  # vmap runs the call once per example (vmap_method="sequential").
  per_example = jax.vmap(cpu_kernels.depthwise_conv3x3_grads)(x[:, None], jnp.stack([kernel] *
                                                              shape[0]), g[:, None])
  np.testing.assert_allclose(per_example[1].sum(0), ours[1], rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_forward_matches_grouped_conv_bias_and_gelu(shape, single_device):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(shape) * 2, jnp.float32)   # GELU's input spans ±10
  kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1])), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  ours = jax.jit(cpu_kernels.depthwise_conv3x3_bias_gelu)(x, kernel, bias)
  assert ours is not None, "the kernel should build and apply here"
  ref = jax.nn.gelu(grouped_conv(x, kernel) + bias, approximate=False)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6)
  # fc1's bias fused in: added to x inside the map only (the padding stays zero)
  in_bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  ours = jax.jit(cpu_kernels.depthwise_conv3x3_bias_gelu)(x, kernel, bias, in_bias)
  ref = jax.nn.gelu(grouped_conv(x + in_bias, kernel) + bias, approximate=False)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_conv_mlp_with_fc1_bias_fused_matches_the_unfused_layers(kernels, monkeypatch,
                                                                 single_device):
  """The ConvFFN in inference (fc1's bias inside the conv kernel) against fc1 -> conv -> GELU
  as separate layers, and its gradient (the fused path under jax.grad)."""
  monkeypatch.setenv("EFFVIT_CPU_KERNELS", kernels)
  mlp = Mlp(24, dwconv=True)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 5 * 6, 8)), jnp.float32)
  variables = mlp.init(jax.random.key(0), x, (5, 6))
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32) * 0.5,
                        variables["params"])

  def unfused(p, x):
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = grouped_conv(h.reshape(2, 5, 6, 24), p["dwconv"]["kernel"][:, :, 0])
    h = jax.nn.gelu(h + p["dwconv"]["bias"], approximate=False).reshape(2, 30, 24)
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]

  fused = lambda p, x: mlp.apply({"params": p}, x, (5, 6))
  assert ("effvit_depthwise_conv3x3_bias_gelu_f32" in jax.jit(fused).lower(params, x).as_text()
          ) == (kernels == "1")
  np.testing.assert_allclose(jax.jit(fused)(params, x), unfused(params, x), rtol=1e-5,
                             atol=1e-5)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(fused), (0, 1)))(params, x)),
                  jax.tree.leaves(jax.grad(loss(unfused), (0, 1))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@needs_compiler
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_gradient_matches_xla_gradient_of_grouped_conv_bias_and_gelu(shape, single_device):
  rng = np.random.default_rng(4)
  x, g = (jnp.asarray(rng.standard_normal(shape) * s, jnp.float32) for s in (2, 1))
  kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1])), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  ours = jax.jit(cpu_kernels.depthwise_conv3x3_bias_gelu_grads)(x, kernel, bias, g)
  assert ours is not None, "the kernel should build and apply here"
  ref = lambda x, k, b: jax.nn.gelu(grouped_conv(x, k) + b, approximate=False)
  for a, b in zip(ours, jax.vjp(ref, x, kernel, bias)[1](g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(jnp.abs(b).max()))


def test_kernel_applies_only_to_float32_or_bfloat16_3x3_on_one_device(monkeypatch):
  x = jnp.zeros((1, 4, 4, 2))
  assert jax.device_count() == 8   # conftest
  assert cpu_kernels.depthwise_conv3x3_grads(x, jnp.zeros((3, 3, 2)), x) is None
  assert cpu_kernels.depthwise_conv3x3_bias_gelu(x, jnp.zeros((3, 3, 2)), jnp.zeros(2)) is None
  assert cpu_kernels.depthwise_conv3x3_bias_gelu_grads(x, jnp.zeros((3, 3, 2)), jnp.zeros(2),
                                                       x) is None
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)
  assert cpu_kernels.depthwise_conv3x3_grads(x, jnp.zeros((5, 5, 2)), x) is None
  half = x.astype(jnp.float16)
  assert cpu_kernels.depthwise_conv3x3_grads(half, jnp.zeros((3, 3, 2)), half) is None
  assert cpu_kernels.applies(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 2)), jnp.zeros(2))


@needs_compiler
def test_bfloat16_arrays_run_the_float32_kernels_on_widened_copies(single_device):
  # Under dtype=bfloat16 the activations and their gradients are bfloat16 and the parameters
  # float32: every output is the float32 kernel's, in its argument's dtype.
  rng = np.random.default_rng(9)
  x, g = (jnp.asarray(rng.standard_normal((2, 6, 5, 20)), jnp.bfloat16) for _ in range(2))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 20)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(20), jnp.float32)
  wide = lambda *a: tuple(t.astype(jnp.float32) for t in a)
  for fn, args, like in [
      (cpu_kernels.depthwise_conv3x3_grads, (x, kernel, g), (x, kernel)),
      (cpu_kernels.depthwise_conv3x3_bias_gelu, (x, kernel, bias), (x,)),
      (cpu_kernels.depthwise_conv3x3_bias_gelu_grads, (x, kernel, bias, g), (x, kernel, bias))]:
    ours, ref = jax.jit(fn)(*args), jax.jit(fn)(*wide(*args))
    ours, ref = (t if isinstance(t, tuple) else (t,) for t in (ours, ref))
    assert [o.dtype for o in ours] == [a.dtype for a in like], fn.__name__
    for o, r in zip(ours, ref):
      np.testing.assert_array_equal(np.asarray(o), np.asarray(r.astype(o.dtype)))


@needs_compiler
def test_pvt_v2_logits_and_gradients_use_the_kernels_and_match_xla(monkeypatch, single_device):
  model = create_model("pvt_v2_b0", num_classes=5, depths=(1, 1, 1, 1))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = random_variables(model, x.shape)
  loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2)

  def logits_and_grads(kernels_on):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", "1" if kernels_on else "0")
    results, used = [], []
    for fn, targets in ((lambda p: model.apply({**variables, "params": p}, x),
                         ("effvit_depthwise_conv3x3_bias_gelu_f32", "effvit_layer_norm_f32")),
                        (jax.grad(loss), ("effvit_depthwise_conv3x3_bias_gelu_bwd_f32",
                                          "effvit_layer_norm_bwd_f32",
                                          "effvit_dense_grads_f32"))):
      lowered = jax.jit(fn).lower(variables["params"])   # traced again each time
      used.append([t in lowered.as_text() for t in targets])
      results.append(lowered.compile(compiler_options=FAST_COMPILE)(variables["params"]))
    return results, used

  (fast, used), (slow, unused) = logits_and_grads(True), logits_and_grads(False)
  assert used == [[True, True], [True, True, True]]
  assert unused == [[False, False], [False, False, False]]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fast, slow)


@needs_compiler
def test_depthwise_conv_module_gradient_uses_the_kernel(monkeypatch, single_device):
  """DepthwiseConv without GELU (Twins' PEG) takes the conv-only gradient kernel."""
  module = DepthwiseConv(3)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 5, 20)), jnp.float32)
  variables = module.init(jax.random.key(0), x)
  grad = jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), (0, 1))
  results = []
  for on in ("1", "0"):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", on)
    lowered = jax.jit(lambda v, x: grad(v, x)).lower(variables, x)   # traced again each time
    assert ("effvit_depthwise_conv3x3_bwd_f32" in lowered.as_text()) == (on == "1")
    results.append(lowered.compile()(variables, x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, single_device):
  monkeypatch.setenv("CXX", "false")   # a "compiler" that always fails
  monkeypatch.setenv("EFFVIT_KERNEL_CACHE", str(tmp_path))
  cpu_kernels._registered.cache_clear()
  try:
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 4, 5, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3)), jnp.float32)
    with pytest.warns(UserWarning, match="CPU kernels unavailable .*false exited with 1"):
      assert cpu_kernels.depthwise_conv3x3_grads(x, kernel, x) is None
    with warnings.catch_warnings():
      warnings.simplefilter("error")   # no second build, no second warning
      assert cpu_kernels.depthwise_conv3x3_grads(x, kernel, x) is None
      assert cpu_kernels.depthwise_conv3x3_bias_gelu(x, kernel, kernel[0, 0]) is None
      assert cpu_kernels.depthwise_conv3x3_bias_gelu_grads(x, kernel, kernel[0, 0], x) is None
    assert not list(tmp_path.glob("*.so"))
    ours = jax.vjp(depthwise_conv, x, kernel)[1](x)   # XLA's path, same gradients
    for a, b in zip(ours, grouped_conv_grads(x, kernel, x)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  finally:
    cpu_kernels._registered.cache_clear()

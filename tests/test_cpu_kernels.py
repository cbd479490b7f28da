"""The C++ depthwise-conv gradient (effvit.cpu_kernels) against XLA's grouped conv, and its
fallback when it cannot be built."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit.layers import depthwise_conv
from effvit.models import create_model
from pyramid_helpers import FAST_COMPILE, random_variables

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")


@pytest.fixture
def single_device(monkeypatch):
  """The suite simulates 8 devices, where the kernel is off (it has no sharding rule); these
  tests use unsharded arrays, as a single-device run does."""
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)


def grouped_conv_grads(x, kernel, g):
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k[:, :, None, :], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])
  return jax.vjp(conv, x, kernel)[1](g)


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 5, 7, 20), (1, 1, 1, 3), (3, 6, 4, 32), (1, 9, 2, 17),
                                   (20, 3, 3, 16)])
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


def test_kernel_applies_only_to_float32_3x3_on_one_device(monkeypatch):
  x = jnp.zeros((1, 4, 4, 2))
  assert jax.device_count() == 8   # conftest
  assert cpu_kernels.depthwise_conv3x3_grads(x, jnp.zeros((3, 3, 2)), x) is None
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)
  assert cpu_kernels.depthwise_conv3x3_grads(x, jnp.zeros((5, 5, 2)), x) is None
  half = x.astype(jnp.bfloat16)
  assert cpu_kernels.depthwise_conv3x3_grads(half, jnp.zeros((3, 3, 2)), half) is None


@needs_compiler
def test_pvt_v2_training_gradients_use_the_kernel_and_match_xla(monkeypatch, single_device):
  model = create_model("pvt_v2_b0", num_classes=5, depths=(1, 1, 1, 1))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = random_variables(model, x.shape)
  loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2)

  def grads(kernels_on):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", "1" if kernels_on else "0")
    lowered = jax.jit(jax.grad(loss)).lower(variables["params"])   # traced again each time
    step = lowered.compile(compiler_options=FAST_COMPILE)
    return step(variables["params"]), "effvit_depthwise_conv3x3_bwd_f32" in lowered.as_text()

  (fast, used), (slow, unused) = grads(True), grads(False)
  assert used and not unused
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fast, slow)


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
    assert cpu_kernels.depthwise_conv3x3_grads(x, kernel, x) is None   # no second build
    assert not list(tmp_path.glob("*.so"))
    ours = jax.vjp(depthwise_conv, x, kernel)[1](x)   # XLA's path, same gradients
    for a, b in zip(ours, grouped_conv_grads(x, kernel, x)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  finally:
    cpu_kernels._registered.cache_clear()

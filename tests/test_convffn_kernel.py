"""The fused ConvFFN and MLP kernels (effvit/cpu_kernels/convffn.cc) and the ConvFFN's gradient
kernel (convffn_grads.cc) against a float64 fc1 -> [3×3 depthwise conv ->] exact GELU -> fc2 and
its closed-form gradient, and effvit.layers.Mlp with and without them."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit import cpu_kernels
from effvit import layers
from effvit.layers import Mlp
from effvit.profile import count_macs

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler")
_erf = np.vectorize(math.erf)


TAPS = [(i, j) for i in range(3) for j in range(3)]


def hidden_float64(x, w1, b1, kernel, bias):
  """(h zero-padded, z): fc1, then the depthwise conv and its bias, in float64."""
  x, w1, b1, kernel, bias = (np.asarray(a, np.float64) for a in (x, w1, b1, kernel, bias))
  _, height, width, _ = x.shape
  hp = np.pad(x @ w1 + b1, ((0, 0), (1, 1), (1, 1), (0, 0)))   # zero padding after fc1's bias
  return hp, bias + sum(hp[:, i:i + height, j:j + width] * kernel[i, j] for i, j in TAPS)


def convffn_float64(x, w1, b1, kernel, bias, w2, b2):
  _, z = hidden_float64(x, w1, b1, kernel, bias)
  w2, b2 = np.asarray(w2, np.float64), np.asarray(b2, np.float64)
  return z * 0.5 * (1 + _erf(z / math.sqrt(2))) @ w2 + b2


def random_operands(rng, b, h, w, c, d, f):
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)
  return (normal(b, h, w, c), normal(c, d, scale=c ** -0.5), normal(d, scale=0.5),
          normal(3, 3, d, scale=0.5), normal(d, scale=0.5), normal(d, f, scale=d ** -0.5),
          normal(f, scale=0.5))


# (B, H, W, C, D, F). Rows go in groups of 64 // W rows (at most H), images in bands of groups
# when B < 8: a 1-pixel map; 7 wide (one group per image, 3 bands of 1 row ... 3); 14 wide with
# H = 10 (groups of 4, a partial last one); 56 wide (one row a group, 8 bands: the ring of
# rows and the rows of h that two bands both compute); channels below, at and past the 16-lane
# vectors and the 16-, 32- and 64-wide matmul tiles.
@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 7, 3, 20, 5),
                                   (3, 10, 14, 8, 48, 16), (1, 9, 16, 5, 17, 33),
                                   (9, 4, 3, 16, 32, 16), (1, 20, 56, 4, 96, 70)])
def test_kernel_matches_float64(shape, single_device):
  args = random_operands(np.random.default_rng(0), *shape)
  ours = jax.jit(cpu_kernels.convffn)(*args)
  assert ours is not None, "the kernel should build and apply here"
  ref = convffn_float64(*args)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


@needs_compiler
def test_images_do_not_depend_on_how_the_batch_is_split(single_device):
  # Batch 4 gives each image 2 bands, one image alone 5 (its 5 groups of 4 rows): the rows of h
  # next to a band's edge are computed in different tasks, with the same operations.
  args = random_operands(np.random.default_rng(1), 4, 20, 16, 8, 64, 8)
  fused = jax.jit(cpu_kernels.convffn)
  whole = np.asarray(fused(*args))
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(fused(args[0][i:i + 1], *args[1:]))[0], whole[i])
  np.testing.assert_array_equal(np.asarray(fused(*args)), whole)


def test_kernel_is_off_for_bfloat16_and_on_several_devices(monkeypatch):
  args = random_operands(np.random.default_rng(2), 1, 2, 2, 3, 4, 3)
  assert jax.device_count() == 8   # conftest
  assert cpu_kernels.convffn(*args) is None
  monkeypatch.setattr(cpu_kernels, "_single_device", lambda: True)
  assert cpu_kernels.convffn(args[0].astype(jnp.bfloat16), *args[1:]) is None


@needs_compiler
@pytest.mark.parametrize("hw,dtype,deterministic,drop,used", [
    ((6, 16), jnp.float32, True, 0.0, True),
    ((16, 13), jnp.float32, True, 0.0, False),   # narrower than CONVFFN_KERNEL_MIN_WIDTH
    ((6, 16), jnp.bfloat16, True, 0.0, False),
    ((6, 16), jnp.float32, False, 0.0, True),    # training: the gradient kernel's forward
    ((6, 16), jnp.float32, False, 0.1, False)])  # dropout inside: the layers
def test_mlp_uses_the_kernel_in_float32_without_dropout(hw, dtype, deterministic, drop, used,
                                                        monkeypatch, single_device):
  mlp = Mlp(40, dwconv=True, drop_rate=drop, dtype=dtype)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, hw[0] * hw[1], 24)), dtype)
  variables = mlp.init(jax.random.key(0), x, hw)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype),
                        variables["params"])
  apply = lambda p, x: mlp.apply({"params": p}, x, hw, deterministic=deterministic,
                                 rngs={"dropout": jax.random.key(1)})
  results = []
  for min_width in (layers.CONVFFN_KERNEL_MIN_WIDTH, 10 ** 9):
    monkeypatch.setattr(layers, "CONVFFN_KERNEL_MIN_WIDTH", min_width)
    lowered = jax.jit(lambda p, x: apply(p, x)).lower(params, x)   # a new trace each time
    results.append((lowered.compile()(params, x), "effvit_convffn_f32" in lowered.as_text()))
  (fused, on), (unfused, off) = results
  assert (on, off) == (used, False)
  # the MAC count (GFLOP/s in the benchmarks) sees through the fused call
  macs = []
  for min_width in (layers.CONVFFN_KERNEL_MIN_WIDTH, 10 ** 9):
    monkeypatch.setattr(layers, "CONVFFN_KERNEL_MIN_WIDTH", min_width)
    macs.append(count_macs(lambda p, x: apply(p, x), params, x))
  assert macs[0] == macs[1] == 2 * hw[0] * hw[1] * (24 * 40 + 9 * 40 + 40 * 24)
  tol = 1e-5 if dtype == jnp.float32 else 0
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(unfused, np.float32),
                             rtol=tol, atol=tol)


@needs_compiler
@pytest.mark.parametrize("dwconv,target", [(True, "effvit_convffn_f32"),
                                           (False, "effvit_mlp_f32")])
def test_bfloat16_models_use_the_float32_kernels_only_with_small_weights(
    dwconv, target, monkeypatch, single_device):
  """bfloat16 models feed the fused kernels float32 tokens: they run while the weights are at
  most BFLOAT16_KERNEL_MAX_WEIGHTS (2 x 24 x 40 = 1920 here), XLA's bfloat16 dots beyond."""
  x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 6 * 16, 24)), jnp.float32)
  used = {}
  for dtype, limit in ((jnp.bfloat16, 1920), (jnp.bfloat16, 1919), (jnp.float32, 1919)):
    monkeypatch.setattr(layers, "BFLOAT16_KERNEL_MAX_WEIGHTS", limit)
    mlp = Mlp(40, dwconv=dwconv, dtype=dtype)
    variables = mlp.init(jax.random.key(0), x, (6, 16))
    text = jax.jit(lambda v, x: mlp.apply(v, x, (6, 16))).lower(variables, x).as_text()
    used[jnp.dtype(dtype).name, limit] = target in text
  assert used == {("bfloat16", 1920): True, ("bfloat16", 1919): False, ("float32", 1919): True}


def convffn_grads_float64(x, w1, b1, kernel, bias, w2, b2, g):
  """The ConvFFN's gradients in closed form, float64: (dx, dW1, db1, dkernel, dbias, dW2,
  db2)."""
  hp, z = hidden_float64(x, w1, b1, kernel, bias)
  x, w1, kernel, w2, g = (np.asarray(a, np.float64) for a in (x, w1, kernel, w2, g))
  _, height, width, _ = x.shape
  cdf = 0.5 * (1 + _erf(z / math.sqrt(2)))
  gz = (g @ w2.T) * (cdf + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi))
  dk = np.stack([np.einsum("bhwd,bhwd->d", gz, hp[:, i:i + height, j:j + width])
                 for i, j in TAPS]).reshape(3, 3, -1)
  dhp = np.zeros_like(hp)
  for i, j in TAPS:
    dhp[:, i:i + height, j:j + width] += gz * kernel[i, j]
  dh = dhp[:, 1:-1, 1:-1]
  return (dh @ w1.T, np.einsum("bhwc,bhwd->cd", x, dh), dh.sum((0, 1, 2)), dk,
          gz.sum((0, 1, 2)), np.einsum("bhwd,bhwf->df", z * cdf, g), g.sum((0, 1, 2)))


# As for the forward, and (2, 12, 56, ...): 12 bands of one row each, every band recomputing
# the rows of h and gz above its first row; (3, 10, 14, ...): groups of 4 rows, a partial last
# one, so a row's neighbours are in the ring's other groups.
@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 7, 3, 20, 5),
                                   (3, 10, 14, 8, 48, 16), (1, 9, 16, 5, 17, 33),
                                   (9, 4, 3, 16, 32, 16), (1, 20, 56, 4, 96, 70),
                                   (2, 12, 56, 32, 64, 32)])
def test_gradient_kernel_matches_float64(shape, single_device):
  rng = np.random.default_rng(8)
  args = random_operands(rng, *shape)
  g = jnp.asarray(rng.standard_normal(shape[:3] + shape[5:]), jnp.float32)
  ours = jax.jit(cpu_kernels.convffn_grads)(*args[:6], g)
  assert ours is not None, "the kernel should build and apply here"
  names = ("dx", "dW1", "db1", "dkernel", "dbias", "dW2", "db2")
  for name, a, ref in zip(names, ours, convffn_grads_float64(*args, g)):
    assert a.shape == ref.shape, name
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max(), err_msg=name)


@needs_compiler
def test_gradient_kernel_dx_does_not_depend_on_the_rest_of_the_batch(single_device):
  # Batch 3 gives each image 3 bands, one image alone 5 (its 5 groups of 4 rows).
  rng = np.random.default_rng(9)
  args = random_operands(rng, 3, 20, 16, 8, 64, 8)
  g = jnp.asarray(rng.standard_normal((3, 20, 16, 8)), jnp.float32)
  grads = jax.jit(cpu_kernels.convffn_grads)
  whole = grads(*args[:6], g)
  alone = [grads(args[0][i:i + 1], *args[1:6], g[i:i + 1]) for i in range(3)]
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(alone[i][0])[0], np.asarray(whole[0])[i])
  # the parameter gradients sum the images in another order
  for k in range(1, 7):
    summed = sum(np.asarray(a[k], np.float64) for a in alone)
    np.testing.assert_allclose(whole[k], summed, rtol=1e-5, atol=1e-5 * np.abs(summed).max())
  # and the same call gives the same sums again
  np.testing.assert_array_equal(np.asarray(grads(*args[:6], g)[1]), np.asarray(whole[1]))


@needs_compiler
@pytest.mark.parametrize("hidden,relu,max_weights,used", [
    (40, False, None, True),
    (40, True, None, False),     # PVTv2-li's ReLU before the conv: the layers
    (40, False, 0, False)])      # weights above CONVFFN_GRAD_KERNEL_MAX_WEIGHTS: the layers
def test_training_step_uses_the_gradient_kernel_with_the_layers_gradients(
    hidden, relu, max_weights, used, monkeypatch, single_device):
  mlp = Mlp(hidden, dwconv=True, relu=relu)
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((3, 5 * 16, 24)), jnp.float32)
  variables = mlp.init(jax.random.key(0), x, (5, 16))
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype),
                           variables)
  if max_weights is not None:
    monkeypatch.setattr(layers, "CONVFFN_GRAD_KERNEL_MAX_WEIGHTS", max_weights)
  loss = lambda v, x: jnp.sum(jnp.sin(mlp.apply(v, x, (5, 16), deterministic=False)))
  grads = []
  for kernel in (True, False):
    if not kernel:
      monkeypatch.setattr(layers, "CONVFFN_GRAD_KERNEL_MAX_WEIGHTS", 0)
    lowered = jax.jit(jax.grad(loss, (0, 1))).lower(variables, x)
    assert ("effvit_convffn_bwd_f32" in lowered.as_text()) == (used and kernel)
    grads.append(lowered.compile()(variables, x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), *grads)


@needs_compiler
def test_gradient_through_the_inference_path_is_the_layers_gradient(monkeypatch, single_device):
  """jax.grad of a deterministic forward (saliency maps, attacks) through the fused call."""
  mlp = Mlp(40, dwconv=True)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 4 * 16, 24)), jnp.float32)
  variables = mlp.init(jax.random.key(0), x, (4, 16))
  loss = lambda v, x: jnp.sum(jnp.sin(mlp.apply(v, x, (4, 16))))
  grads = []
  for min_width in (layers.CONVFFN_KERNEL_MIN_WIDTH, 10 ** 9):
    monkeypatch.setattr(layers, "CONVFFN_KERNEL_MIN_WIDTH", min_width)
    lowered = jax.jit(jax.grad(loss, (0, 1))).lower(variables, x)
    assert ("effvit_convffn_f32" in lowered.as_text()) == (min_width < 100)
    grads.append(lowered.compile()(variables, x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


# P: below, at and past a task's block of rows (128 at D <= 512, 24 at D = 4096); channels
# past every tile width.
@needs_compiler
@pytest.mark.parametrize("p,c,d,f", [(1, 1, 1, 1), (130, 5, 17, 33), (300, 24, 96, 70),
                                     (50, 8, 4096, 16)])
def test_mlp_kernel_matches_float64(p, c, d, f, single_device):
  x, w1, b1, _, _, w2, b2 = random_operands(np.random.default_rng(6), 1, 1, p, c, d, f)
  x = x.reshape(p, c)
  ours = jax.jit(cpu_kernels.mlp)(x, w1, b1, w2, b2)
  assert ours is not None, "the kernel should build and apply here"
  h = np.asarray(x, np.float64) @ np.asarray(w1, np.float64) + np.asarray(b1, np.float64)
  ref = h * 0.5 * (1 + _erf(h / math.sqrt(2))) @ np.asarray(w2, np.float64) + np.asarray(b2)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())
  assert cpu_kernels.mlp(x.astype(jnp.bfloat16), w1, b1, w2, b2) is None


@needs_compiler
@pytest.mark.parametrize("hidden,used", [(40, True), (4096, False)])   # the weights' limit
def test_plain_mlp_uses_the_kernel_in_inference_with_the_layers_results(hidden, used,
                                                                        monkeypatch,
                                                                        single_device):
  mlp = Mlp(hidden)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 30, 256)), jnp.float32)
  variables = mlp.init(jax.random.key(0), x, (5, 6))
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.1, a.dtype),
                           variables)
  loss = lambda v, x: jnp.sum(jnp.sin(mlp.apply(v, x, (5, 6))))
  results = []
  for kernels in ("1", "0"):
    monkeypatch.setenv("EFFVIT_CPU_KERNELS", kernels)
    fwd = jax.jit(lambda v, x: mlp.apply(v, x, (5, 6))).lower(variables, x)
    assert ("effvit_mlp_f32" in fwd.as_text()) == (used and kernels == "1")
    macs = count_macs(lambda v, x: mlp.apply(v, x, (5, 6)), variables, x)
    assert macs == 60 * (256 * hidden + hidden * 256)
    results.append((fwd.compile()(variables, x),
                    jax.jit(jax.grad(loss, (0, 1)))(variables, x)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *results)

"""Fast reformulations of slow XLA:CPU ops against the ops they replace: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from effvit.attention.core import keys_major_attention
from effvit.layers import (Dense, DepthwiseConv, GroupedConv, PatchConv, depthwise_conv,
                           depthwise_conv_gelu, linear)
from effvit.layers import native_convs as native_convs_enabled
from effvit.pooling import avg_pool, max_pool
from effvit.xla_cpu import compiler_options
from pyramid_helpers import (FAST_COMPILE, abstract_variables, compile_fast, grouped_conv,
                             random_variables)


@pytest.mark.parametrize("shape,k", [((2, 5, 7, 6), 3), ((1, 1, 1, 4), 3), ((3, 6, 4, 5), 5),
                                     ((2, 3, 8, 3), 1)])
def test_depthwise_conv_matches_grouped_conv(shape, k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, shape[-1])), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ours, ours_vjp = jax.vjp(depthwise_conv, x, kernel)
  ref, ref_vjp = jax.vjp(grouped_conv, x, kernel)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(ours_vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,m,h,d,masked", [(20, 7, 2, 4, False), (9, 9, 3, 8, True),
                                            (1, 5, 1, 3, True)])
def test_keys_major_attention_matches_dot_product_attention(n, m, h, d, masked):
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, t, h, d)) * 2, jnp.float32) for t in (n, m, m))
  mask = None
  if masked:   # per-example key masks, (B, 1, 1, M) as LSA builds them; key 0 always valid
    valid = rng.random((2, 1, 1, m)) < 0.6
    valid[..., 0] = True
    mask = jnp.asarray(valid)
  ref_fn = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, scale=d ** -0.5,
      mask=None if mask is None else jnp.broadcast_to(mask, (2, h, n, m)))
  ours, ours_vjp = jax.vjp(lambda q, k, v: keys_major_attention(q, k, v, mask), q, k, v)
  ref, ref_vjp = jax.vjp(ref_fn, q, k, v)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
  for a, b in zip(ours_vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  half = keys_major_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), mask)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), ref, atol=0.1)


def test_depthwise_conv_second_use_and_jit():
  # Used twice in one jitted loss, the custom gradient must sum both paths.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3)), jnp.float32)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(f(x, k), k)))
  ours = jax.jit(jax.grad(loss(depthwise_conv), argnums=(0, 1)))(x, kernel)
  ref = jax.grad(loss(grouped_conv), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_module_is_a_drop_in_for_nn_conv(native_convs):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 5, 8)), jnp.float32)
  ours = DepthwiseConv(3)
  ref = nn.Conv(8, (3, 3), padding=1, feature_group_count=8)
  variables = ours.init(jax.random.key(0), x)
  shapes = jax.tree.map(jnp.shape, variables)
  assert shapes == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x)), shapes
  variables = jax.tree.map(lambda v: v + 0.3, variables)   # non-zero bias
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  gx = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(variables)
  gr = jax.grad(lambda v: jnp.sum(ref.apply(v, x) ** 2))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), gx, gr)


def test_depthwise_conv_bfloat16_accumulates_in_float32():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4)), jnp.float32)
  out = depthwise_conv(x.astype(jnp.bfloat16), kernel)
  assert out.dtype == jnp.bfloat16
  ref = grouped_conv(x.astype(jnp.bfloat16).astype(jnp.float32), kernel)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=2e-2)
  dx, dk = jax.grad(lambda x, k: jnp.sum(depthwise_conv(x, k).astype(jnp.float32)),
                    argnums=(0, 1))(x.astype(jnp.bfloat16), kernel)
  assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.float32


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_depthwise_conv_gelu_matches_conv_bias_then_gelu(dtype, tol):
  # The suite's 8 devices keep XLA's path here; tests/test_cpu_kernels.py checks the C++ one.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 7)) * 2, jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 7)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(7), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ref_fn = lambda x, k, b: jax.nn.gelu(grouped_conv(x, k) + b, approximate=False)
  ours, ours_vjp = jax.vjp(depthwise_conv_gelu, x.astype(dtype), kernel, bias)
  ref, ref_vjp = jax.vjp(ref_fn, x.astype(dtype).astype(jnp.float32), kernel, bias)
  assert ours.dtype == dtype
  np.testing.assert_allclose(ours.astype(jnp.float32), ref, rtol=tol, atol=tol)
  grads = ours_vjp(g.astype(dtype))
  assert [a.dtype for a in grads] == [dtype, jnp.float32, jnp.float32]
  for a, b in zip(grads, ref_vjp(g.astype(dtype).astype(jnp.float32))):
    np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_native_convs_follow_the_backend_unless_forced(backend, monkeypatch):
  # Native (cuDNN's) convs on a GPU, XLA:CPU's rewrites elsewhere; the variable forces either.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  for setting in (None, ""):
    if setting is None:
      monkeypatch.delenv("EFFVIT_NATIVE_CONVS", raising=False)
    else:
      monkeypatch.setenv("EFFVIT_NATIVE_CONVS", setting)
    assert native_convs_enabled() == (backend == "gpu")
  for forced in ("0", "1"):
    monkeypatch.setenv("EFFVIT_NATIVE_CONVS", forced)
    assert native_convs_enabled() == (forced == "1")


def test_native_convs_are_what_the_jaxpr_runs(monkeypatch):
  # The switch changes the program: one grouped conv for a depthwise conv with its GELU and
  # fc1's bias (in_bias), and none where the CPU rewrite takes its place.
  x = jnp.ones((1, 6, 6, 4))
  module = DepthwiseConv(3, gelu=True)
  variables = module.init(jax.random.key(0), x)
  for forced, convs in (("1", 1), ("0", 0)):
    monkeypatch.setenv("EFFVIT_NATIVE_CONVS", forced)
    text = str(jax.make_jaxpr(lambda v: module.apply(v, x, in_bias=jnp.ones(4)))(variables))
    assert text.count("conv_general_dilated") == convs, text
    if convs:
      assert "feature_group_count=4" in text


def test_depthwise_conv_with_in_bias_and_gelu_agrees_both_ways(native_convs):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 8)), jnp.float32)
  in_bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
  module = DepthwiseConv(3, gelu=True)
  variables = jax.tree.map(lambda v: v + 0.2, module.init(jax.random.key(0), x))
  ref = jax.nn.gelu(grouped_conv(x + in_bias, variables["params"]["kernel"][:, :, 0])
                    + variables["params"]["bias"], approximate=False)
  np.testing.assert_allclose(module.apply(variables, x, in_bias=in_bias), ref,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="gelu=True only"):
    DepthwiseConv(3).apply({"params": {k: v for k, v in variables["params"].items()}}, x,
                           in_bias=in_bias)


def test_depthwise_conv_rejects_even_kernels():
  with pytest.raises(ValueError, match="odd kernel"):
    depthwise_conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 2)))


def assert_drop_in(ours, ref, x):
  """Same parameter shapes, and (with non-zero parameters) the same outputs and gradients."""
  variables = ours.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == \
      jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
  variables = jax.tree.map(lambda v: v + 0.1, variables)
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))(variables, x)
           for m in (ours, ref)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)


@pytest.mark.parametrize("groups,kernel,strides,padding,bias", [
    (2, 3, 1, 1, False), (4, 3, 2, 1, True), (1, 1, 1, 0, True), (3, 1, 1, 0, True)])
def test_grouped_conv_is_a_drop_in_for_nn_conv(groups, kernel, strides, padding, bias,
                                               native_convs):
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 9, 7, 12)), jnp.float32)
  assert_drop_in(GroupedConv(24, kernel, groups, strides, padding, use_bias=bias),
                 nn.Conv(24, (kernel, kernel), strides, padding, feature_group_count=groups,
                         use_bias=bias), x)


@pytest.mark.parametrize("patch,hw", [(4, (8, 12)), (2, (7, 5)), (8, (8, 8)), (1, (3, 4))])
def test_patch_conv_is_a_drop_in_for_strided_nn_conv(patch, hw, native_convs):
  # Odd sizes: the last row / column that fills no patch is dropped, as VALID padding does.
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, *hw, 5)), jnp.float32)
  assert_drop_in(PatchConv(6, patch), nn.Conv(6, (patch, patch), strides=patch, padding="VALID"),
                 x)


def test_pointwise_patch_conv_in_bfloat16_is_the_rounded_float32_conv():
  # A 1×1 PatchConv (ResNeSt's 1×1 convs) under bfloat16 compute is `linear`; parameters f32.
  patch = 1
  x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 8, 12, 16)), jnp.bfloat16)
  ours = PatchConv(8, patch, dtype=jnp.bfloat16)
  variables = jax.tree.map(lambda v: v + 0.1, ours.init(jax.random.key(0), x))
  ref = nn.Conv(8, (patch, patch), strides=patch, padding="VALID")
  wide = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), variables)
  y, y_ref = ours.apply(variables, x), ref.apply(wide, x.astype(jnp.float32))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2 ** -8,
                             atol=2 ** -8 * float(jnp.abs(y_ref).max()))
  # A linear loss whose weights are bfloat16 numbers: the parameter gradients are then exact
  # float32 sums in both, so they must agree to float32 round-off.
  r = jnp.asarray(np.random.default_rng(13).standard_normal(y.shape), jnp.bfloat16)
  g = jax.grad(lambda v: jnp.sum(ours.apply(v, x).astype(jnp.float32) * r))(variables)
  g_ref = jax.grad(lambda v: jnp.sum(ref.apply(v, x.astype(jnp.float32)) * r))(wide)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4), g, g_ref)


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 6, 5), (5,)])
def test_dense_is_a_drop_in_for_nn_dense(shape):
  x = jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)
  assert_drop_in(Dense(6), nn.Dense(6), x)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bfloat16_linear_accumulates_in_float32_and_keeps_float32_gradients(with_bias):
  # bfloat16 activations, float32 parameters, as under dtype=bfloat16. Reference: float64
  # products of the bfloat16-rounded operands.
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((96, 40)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((40, 24)) * 0.2, jnp.float32)
  b = jnp.asarray(rng.standard_normal(24), jnp.float32) if with_bias else None
  g = jnp.asarray(rng.standard_normal((96, 24)), jnp.bfloat16)
  y, vjp = jax.vjp(linear, x, w, b)
  dx, dw, db = vjp(g)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  xr, wr, gr = f64(x), f64(w.astype(jnp.bfloat16)), f64(g)
  yr = xr @ wr + (f64(b) if with_bias else 0)
  # One rounding to bfloat16 (relative 2^-9) of a float32-accumulated result.
  np.testing.assert_allclose(f64(y), yr, rtol=2 ** -8, atol=1e-6 * np.abs(yr).max())
  np.testing.assert_allclose(f64(dx), gr @ wr.T, rtol=2 ** -8, atol=1e-3)
  # The parameter gradients stay float32-accurate: never rounded to bfloat16 (error ~4e-3).
  np.testing.assert_allclose(f64(dw), xr.T @ gr, rtol=1e-5, atol=1e-5)
  if with_bias:
    np.testing.assert_allclose(f64(db), gr.sum(0), rtol=1e-5, atol=1e-5)
  else:
    assert db is None
  # What makes it fast on XLA:CPU: every dot, forward and backward, takes bfloat16 operands
  # and returns float32.
  text = jax.jit(lambda x, w, b: jax.vjp(linear, x, w, b)[1](g)).lower(x, w, b).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) == 2 and all("bf16>, tensor<" in d and d.endswith("xf32>") for d in dots), dots


@pytest.mark.parametrize("module", [Dense(16), PatchConv(16, 1)])
def test_kernel_gradient_does_not_transpose_the_output_gradient(module):
  # With the leading axes kept, the compiled kernel gradient holds the (4, 12, 20, 16) output
  # gradient transposed to (16, 4, 12, 20): a copy as large as an activation (nn.Dense does).
  x = jnp.ones((4, 12, 20, 8))
  variables = module.init(jax.random.key(0), x)
  grad = jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))))
  hlo = jax.jit(grad, compiler_options=compiler_options("train")).lower(
      variables, x).compile().as_text()
  assert "f32[16,4,12,20]" not in hlo


@pytest.mark.parametrize("hw,window,stride,padding", [
    ((9, 12), 3, 2, ((1, 1), (1, 1))), ((7, 5), 3, 1, ((1, 1), (1, 1))),
    ((8, 8), 2, 2, ((0, 0), (0, 0))), ((7, 9), 3, 2, ((0, 1), (1, 0))), ((2, 3), 3, 2, ((1, 1), (1, 1)))])
def test_pools_match_flax_pools_values_and_gradients(hw, window, stride, padding):
  # Small integers: many tied maxima, so the gradient's choice among ties is tested exactly.
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.integers(-2, 3, (2, *hw, 4)), jnp.float32)
  ref_max = lambda x: nn.max_pool(x, (window, window), (stride, stride), padding)
  ours_max = lambda x: max_pool(x, window, stride, padding)
  pairs = [(ours_max, ref_max)]
  for include in (True, False):
    pairs.append((lambda x, i=include: avg_pool(x, window, stride, padding, i),
                  lambda x, i=include: nn.avg_pool(x, (window, window), (stride, stride), padding,
                                                   count_include_pad=i)))
  for ours, ref in pairs:
    y = ref(x)
    np.testing.assert_allclose(ours(x), y, rtol=1e-6, atol=1e-6)
    g = jnp.asarray(rng.integers(-3, 4, y.shape), jnp.float32)
    np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0],
                               rtol=1e-6, atol=1e-6)


def test_batch_norm_gradient_matches_autodiff_of_the_formula():
  """BatchNorm's hand-written training gradient, with cotangents on y and on the returned
  statistics (mean, biased var), against jax.vjp of the two-pass formula."""
  from effvit.layers import _batch_norm_train
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 5, 6, 7)) * 3 + 2, jnp.float32)
  scale, bias = (jnp.asarray(rng.standard_normal(7), jnp.float32) for _ in range(2))
  cts = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x.shape, (7,), (7,)))

  def formula(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias, mean, var

  want, want_vjp = jax.vjp(formula, x, scale, bias)
  got, got_vjp = jax.vjp(lambda *a: _batch_norm_train(*a, 1e-5), x, scale, bias)
  for a, b in zip(got + got_vjp(cts), want + want_vjp(cts)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_max_pool_bfloat16_and_jit():
  x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 10, 10, 3)), jnp.bfloat16)
  pool = jax.jit(max_pool, static_argnums=(1, 2, 3))
  y = pool(x, 3, 2, ((1, 1), (1, 1)))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))))
  grad = jax.grad(lambda x: pool(x, 3, 2, ((1, 1), (1, 1))).astype(jnp.float32).sum())(x)
  assert grad.dtype == jnp.bfloat16 and float(grad.astype(jnp.float32).sum()) == y.size


def test_pool_that_does_not_fit_says_so():
  with pytest.raises(ValueError, match="does not fit"):
    max_pool(jnp.zeros((1, 2, 2, 1)), 3, 2, ((0, 0), (0, 0)))


@pytest.mark.parametrize("name,kw,tol", [
    ("pvt_v2_b0", dict(depths=(1, 1, 1, 1)), 2e-3),
    ("twins_svt_small", dict(depths=(2, 2, 2, 2), drop_path_rate=0.1), 2e-3),
    ("lavit_tiny", dict(img_size=32, depths=(1, 1, 2, 2), va_layers=(1, 1, 1, 1)), 2e-3),
    ("resnest14d", dict(drop_path_rate=0.1), 2e-2),
])
def test_remat_changes_memory_not_results(name, kw, tol):
  from effvit.models import create_model
  from effvit.train.state import aux_losses
  # ResNeSt at 64 px and 4 images: at 32 px its last BatchNorm normalises over 2 images of 1
  # pixel, where round-off alone moves gradients by 10% (2 images at 64 px: still 2.4%).
  size, batch = (64, 4) if name.startswith("resnest") else (32, 2)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((batch, size, size, 3)), jnp.float32)
  plain, remat = create_model(name, **kw), create_model(name, remat=True, **kw)
  variables = random_variables(plain, x.shape)
  assert jax.tree.map(jnp.shape, abstract_variables(remat, x.shape)) == \
      jax.tree.map(jnp.shape, variables)

  def loss(model):
    def f(params):
      out, mut = model.apply({**variables, "params": params}, x, train=True,
                             rngs={"dropout": jax.random.key(1)},
                             mutable=["batch_stats", "losses"])
      aux = sum(aux_losses(mut.get("losses", {})).values())
      return jnp.mean(out ** 2) + aux, mut.get("batch_stats", {})
    return jax.value_and_grad(f, has_aux=True)

  p = variables["params"]
  (l0, s0), g0 = compile_fast(loss(plain), p)(p)
  (l1, s1), g1 = compile_fast(loss(remat), p)(p)
  np.testing.assert_allclose(l1, l0, rtol=1e-4)   # round-off of a recomputed forward
  # Recomputation fuses differently: round-off only, but amplified by BatchNorm over 2 images
  # of 1-4 pixels in ResNeSt's late stages (there, a 1e-7 change of the input moves gradients
  # by 1%), so each leaf is compared against its own scale.
  def close(a, b):
    assert np.abs(a - b).max() <= tol * np.abs(b).max() + 1e-5, (np.abs(a - b).max(),
                                                                 np.abs(b).max())
  jax.tree.map(close, g1, g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s0)


def test_remat_plans_less_memory_under_the_train_options():
  """With effvit's train-step options (effvit.xla_cpu) remat recomputes each block in the
  backward instead of storing its activations: pvt_v2_b0's gradient at 64 px plans 4.1
  instead of 11.3 MiB of temporaries (XLA:CPU's default pipeline planned 11.3 for both)."""
  from effvit.models import create_model
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  temps = []
  for remat in (False, True):
    model = create_model("pvt_v2_b0", remat=remat)
    params = abstract_variables(model, x.shape)["params"]
    grad = jax.grad(lambda p, x: model.apply({"params": p}, x).sum())
    options = {**compiler_options("train"), **FAST_COMPILE}
    compiled = jax.jit(grad, compiler_options=options).lower(params, x).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temps[1] < 0.5 * temps[0]


@pytest.mark.parametrize("name,kw", [
    ("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),            # depthwise ConvFFN, overlapping embed, SR
    ("twins_pcpvt_small", dict(depths=(1, 1, 1, 1))),    # PEG, patch embeds
    ("resnest14d", dict(radix=2, cardinality=2, base_width=8)),   # grouped split convs
])
def test_models_are_the_same_with_native_convs(name, kw, monkeypatch):
  # Native convs and XLA:CPU's rewrites of them: one model, one function.
  from effvit.models import create_model
  model = create_model(name, **kw)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = random_variables(model, x.shape, seed=3)
  if "batch_stats" in variables:   # running statistics as initialised, not random variances
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else jnp.zeros_like(v),
        variables["batch_stats"])
  loss = lambda v: jnp.sum(jnp.sin(model.apply(v, x)))
  outs = []
  for forced in ("0", "1"):
    monkeypatch.setenv("EFFVIT_NATIVE_CONVS", forced)
    outs.append(compile_fast(jax.value_and_grad(loss), variables)(variables))
  (l0, g0), (l1, g1) = outs
  np.testing.assert_allclose(l0, l1, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                       atol=1e-4 * float(jnp.abs(b).max())),
               g0, g1)

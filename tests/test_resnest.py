"""ResNeSt: sizes and cost against refs/architectures.md §4-6, numerics against timm."""
import functools
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

from effvit.convert import from_torch_state_dict, to_torch_state_dict, torch_key
from effvit.errors import ConfigError
from effvit.models import create_model, list_models
from effvit.profile import count_params, model_cost

# refs §4.6: [run] parameter counts and GMACs at 224.
PARAMS = {
    "resnest14d": 10_611_688, "resnest26d": 17_069_448, "resnest50d": 27_483_240,
    "resnest101e": 48_275_016, "resnest200e": 70_201_544, "resnest269e": 110_929_480,
    "resnest50d_4s2x40d": 30_417_592, "resnest50d_1s4x24d": 25_677_000,
}
GMACS_224 = {"resnest14d": 2.75, "resnest50d": 5.37, "resnest50d_4s2x40d": 4.37,
             "resnest50d_1s4x24d": 4.40}
# refs §4.1: layers, stem width, radix, cardinality, base width.
TABLE = {
    "resnest14d": ((1, 1, 1, 1), 32, 2, 1, 64), "resnest26d": ((2, 2, 2, 2), 32, 2, 1, 64),
    "resnest50d": ((3, 4, 6, 3), 32, 2, 1, 64), "resnest101e": ((3, 4, 23, 3), 64, 2, 1, 64),
    "resnest200e": ((3, 24, 36, 3), 64, 2, 1, 64), "resnest269e": ((3, 30, 48, 8), 64, 2, 1, 64),
    "resnest50d_4s2x40d": ((3, 4, 6, 3), 32, 4, 2, 40),
    "resnest50d_1s4x24d": ((3, 4, 6, 3), 32, 1, 4, 24),
}


def abstract(model, h=224, w=224, batch=1):
  x = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count(name):
  v = abstract(create_model(name))
  assert count_params(v["params"]) == PARAMS[name]


def closed_form_params(layers, sw, radix, card, base_width):
  """refs §6, with the original repo's attention width max(gw·R/4, 32)."""
  total = 27 * sw + 2 * sw + 9 * sw ** 2 + 2 * sw + 18 * sw ** 2 + 4 * sw + 2048 * 1000 + 1000
  inplanes = 2 * sw
  for n, planes in zip(layers, (64, 128, 256, 512)):
    gw = int(planes * base_width / 64) * card
    a, r, k, p = max(gw * radix // 4, 32), radix, card, planes
    for j in range(n):
      i = inplanes if j == 0 else 4 * p
      total += (i * gw + 2 * gw + 9 * gw ** 2 // k + 2 * gw * r + (gw // k) * a + a + 2 * a
                + (a // k) * gw * r + gw * r + gw * 4 * p + 8 * p)
      if j == 0:
        total += i * 4 * p + 8 * p
    inplanes = 4 * planes
  return total


@pytest.mark.parametrize("name", ["resnest50d_4s2x40d", "resnest50d_1s4x24d"])
def test_closed_form_param_count(name):
  assert closed_form_params(*TABLE[name]) == PARAMS[name]
  assert count_params(abstract(create_model(name))["params"]) == PARAMS[name]


def test_checkpoint_shapes_match_refs():
  """refs §4.4/4.5 shapes, in PyTorch layout, of layer2.0 / layer1.0 split attention."""
  def shapes(name):
    flat = traverse_util.flatten_dict(abstract(create_model(name))["params"])
    to_torch = lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else tuple(s)
    return {torch_key(p): to_torch(l.shape) for p, l in flat.items()}
  s = shapes("resnest50d")
  assert s["layer2.0.conv2.conv.weight"] == (256, 64, 3, 3)
  assert s["layer2.0.conv2.fc1.weight"] == (64, 128, 1, 1)
  assert s["layer2.0.conv2.fc2.weight"] == (256, 64, 1, 1)
  assert s["layer2.0.downsample.1.weight"] == (512, 256, 1, 1)
  assert s["fc.weight"] == (2048, 1000)   # Dense kernel (in, out)
  s = shapes("resnest50d_4s2x40d")
  assert s["layer2.0.conv2.conv.weight"] == (640, 20, 3, 3)
  assert s["layer2.0.conv2.fc1.weight"] == (160, 80, 1, 1)
  assert s["layer2.0.conv2.fc2.weight"] == (640, 80, 1, 1)
  s = shapes("resnest50d_1s4x24d")
  assert s["layer1.0.conv2.conv.weight"] == (96, 24, 3, 3)
  assert s["layer1.0.conv2.fc1.weight"] == (32, 24, 1, 1)
  assert s["layer1.0.conv2.fc2.weight"] == (96, 8, 1, 1)


@pytest.mark.parametrize("name", list(GMACS_224))
def test_gmacs(name):
  gmacs = model_cost(create_model(name), 224)["gmacs"]
  assert abs(gmacs / GMACS_224[name] - 1) < 0.03, gmacs


def test_feature_shapes_and_strides():
  """Four NHWC maps at strides 4..32; every stage of a 200×264 input rounds up (ceil)."""
  m = create_model("resnest50d")
  v = abstract(m, 200, 264)
  feats = jax.eval_shape(lambda v, x: m.apply(v, x, method="features"), v,
                         jax.ShapeDtypeStruct((2, 200, 264, 3), jnp.float32))
  assert [f.shape for f in feats] == [
      (2, math.ceil(200 / s), math.ceil(264 / s), c)
      for s, c in zip((4, 8, 16, 32), (256, 512, 1024, 2048))]


def test_registry_and_config_errors():
  assert set(PARAMS) <= set(list_models())
  m = create_model("resnest50d", radix=4, drop_path_rate=0.1, dtype="bfloat16")
  assert (m.config.radix, m.config.drop_path_rate, m.config.dtype) == (4, 0.1, jnp.bfloat16)
  with pytest.raises(ConfigError, match="no setting 'raddix'.*radix"):
    create_model("resnest50d", raddix=2)
  with pytest.raises(ConfigError, match="radix=0"):
    create_model("resnest14d", radix=0)
  with pytest.raises(ConfigError, match="divisible by cardinality\\*radix"):
    create_model("resnest14d", radix=3)
  with pytest.raises(ConfigError, match="divisible by cardinality=3"):
    create_model("resnest14d", radix=1, cardinality=3, base_width=8)
  with pytest.raises(ConfigError, match="increase base_width"):
    create_model("resnest14d", base_width=0)
  m = create_model("resnest14d")
  with pytest.raises(ConfigError, match="too small"):
    abstract(m, 0, 32)
  with pytest.raises(ConfigError, match="3 channels"):
    jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))
  v = abstract(m, 32, 32)
  with pytest.raises(ConfigError, match="batch of at least 2"):
    jax.eval_shape(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]), v,
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def random_variables(model, seed=0):
  """Variables of the model's shapes drawn with numpy (He-scaled kernels, random BN terms);
  cheaper than compiling model.init, and no BN is a near-identity."""
  rng = np.random.RandomState(seed)
  def fill(path, leaf):
    if path[-1] == "kernel":
      return rng.randn(*leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
    if path[-1] in ("var", "scale"):
      return rng.rand(*leaf.shape) + 0.5
    return rng.randn(*leaf.shape) * 0.2   # BN mean / shift, conv and fc biases
  flat = traverse_util.flatten_dict(abstract(model, 32, 32))
  return traverse_util.unflatten_dict(
      {p: jnp.asarray(fill(p, l), l.dtype) for p, l in flat.items()})


def test_bfloat16_close_to_float32():
  f32, bf16 = create_model("resnest14d"), create_model("resnest14d", dtype="bfloat16")
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(abstract(bf16, 32, 32)))
  v = random_variables(f32)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
  ref, out = jax.jit(f32.apply)(v, x), jax.jit(bf16.apply)(v, x)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 0.05


def test_drop_path_is_stochastic_in_training_only():
  m0, m = create_model("resnest14d"), create_model("resnest14d", drop_path_rate=0.5)
  v = random_variables(m)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
  train = jax.jit(lambda v, x, key: m.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": key})[0])
  a, b, c = (train(v, x, jax.random.key(k)) for k in (0, 1, 0))
  assert not np.allclose(a, b) and np.array_equal(a, c)
  np.testing.assert_array_equal(jax.jit(m.apply)(v, x), jax.jit(m0.apply)(v, x))


# ----------------------------------------------------------------------------- timm parity


def randomise_bn(torch, model, seed=0):
  """Random BN affine terms and running statistics, so no BN is a near-identity."""
  g = torch.Generator().manual_seed(seed)
  for mod in model.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
      c = mod.num_features
      mod.weight.data = torch.rand(c, generator=g) + 0.5
      mod.bias.data = torch.randn(c, generator=g) * 0.2
      mod.running_mean.data = torch.randn(c, generator=g) * 0.2
      mod.running_var.data = torch.rand(c, generator=g) + 0.5
  return model


@functools.lru_cache(maxsize=None)
def reference(name):
  """(timm model with randomised BN, our model, converted variables)."""
  import torch
  from effvit.reference import timm_model
  torch.set_num_threads(1)
  torch.manual_seed(0)
  tm = randomise_bn(torch, timm_model(name))
  return tm, create_model(name), from_torch_state_dict(name, tm.state_dict())


def images(batch, h, w, seed=0):
  x = np.random.RandomState(seed).randn(batch, 3, h, w).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name,h,w", [
    ("resnest14d", 224, 224), ("resnest14d", 200, 264),
    ("resnest50d_4s2x40d", 224, 224), ("resnest50d_4s2x40d", 200, 264),
    ("resnest50d_1s4x24d", 200, 264)])
def test_logits_match_timm(timm, name, h, w):
  import torch
  tm, m, v = reference(name)
  x, xj = images(2, h, w)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x)).numpy()
  out = np.asarray(jax.jit(m.apply)(v, xj))
  err = np.abs(out - ref).max()
  assert err < 1e-4 and err / np.abs(ref).max() < 1e-5, err


def test_features_match_timm(timm):
  import torch
  tm, m, v = reference("resnest50d_4s2x40d")
  x, xj = images(1, 200, 264, seed=1)
  with torch.no_grad():
    ref = tm.forward_intermediates(torch.from_numpy(x), indices=[1, 2, 3, 4],
                                   intermediates_only=True)
  feats = jax.jit(lambda v, x: m.apply(v, x, method="features"))(v, xj)
  for f, r in zip(feats, ref):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert f.shape == r.shape
    assert np.abs(np.asarray(f) - r).max() < 1e-5 * max(1.0, np.abs(r).max())


def test_export_round_trips_to_timm_keys(timm):
  tm, _, v = reference("resnest14d")
  sd = {k: t.numpy() for k, t in tm.state_dict().items() if not k.endswith("num_batches_tracked")}
  out = to_torch_state_dict("resnest14d", v)
  assert sorted(out) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


def test_train_step_matches_torch(timm):
  """train=True: batch-statistics forward, every parameter's gradient (effvit's BatchNorm has a
  hand-written one) and every running statistic after one step equal torch's BatchNorm in
  train mode (momentum 0.1, unbiased running variance)."""
  import torch
  from effvit.reference import timm_model
  torch.manual_seed(0)
  tm = randomise_bn(torch, timm_model("resnest14d"), seed=3)
  v = from_torch_state_dict("resnest14d", tm.state_dict())
  m = create_model("resnest14d")
  x, xj = images(4, 64, 72, seed=2)
  r = np.random.RandomState(5).randn(4, 1000).astype(np.float32)
  out_t = tm.train()(torch.from_numpy(x))
  (out_t * torch.from_numpy(r)).sum().backward()
  ref = out_t.detach().numpy()

  def loss(params, v, x):
    out, new = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return (out * r).sum(), (out, new)
  grads, (out, new) = jax.jit(jax.grad(loss, has_aux=True))(v["params"], v, xj)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)
  # torch's gradients in effvit's layout: converted like weights (buffers as they are).
  sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p))
        for k, p in tm.named_parameters()}
  want = from_torch_state_dict("resnest14d", {**tm.state_dict(), **sd})["params"]
  # Each leaf against its own scale: round-off, amplified by BatchNorm over 4 images of 2×3
  # pixels in the last stage, moves both frameworks' gradients by up to ~3.5% (the same with
  # autodiff).
  # Biases followed by a BatchNorm have a zero gradient, so their values are round-off only:
  # the atol, a millionth of the largest gradient.
  want = traverse_util.flatten_dict(want)
  atol = 1e-6 * max(np.abs(w).max() for w in want.values())
  for path, g in traverse_util.flatten_dict(grads).items():
    err = np.abs(np.asarray(g) - want[path]).max()
    assert err <= 5e-2 * np.abs(want[path]).max() + atol, (path, err)
  sd = tm.state_dict()
  flat = traverse_util.flatten_dict(new["batch_stats"])
  assert len(flat) == 2 * sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in tm.modules())
  for path, stat in flat.items():
    np.testing.assert_allclose(np.asarray(stat), sd[torch_key(path)].numpy(), atol=1e-5,
                               rtol=1e-4, err_msg=torch_key(path))

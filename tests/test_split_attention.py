"""Split Attention against the paper's equations (numpy, per cardinal group) and timm."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util
from numpy.lib.stride_tricks import sliding_window_view

from effvit.attention.split import SplitAttention, attention_width, make_divisible
from effvit.convert import torch_key
from effvit.errors import ConfigError

# (radix R, cardinality K, group width gw): timm's default, the 4s2x40d and 1s4x24d layouts.
CASES = [(2, 1, 64), (4, 2, 80), (1, 4, 96)]


def randomised_variables(module, x, seed=0):
  """Random variables of the module's shapes (He-scaled kernels; no BN is a near-identity)."""
  rng = np.random.RandomState(seed)
  def fill(path, leaf):
    if path[-1] == "kernel":
      std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.randn(*leaf.shape) * std, leaf.dtype)
    if path[-1] in ("var", "scale"):
      return jnp.asarray(rng.rand(*leaf.shape) + 0.5, leaf.dtype)
    return jnp.asarray(rng.randn(*leaf.shape) * 0.2, leaf.dtype)   # BN mean / shift, fc biases
  flat = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0), x))
  return traverse_util.unflatten_dict({p: fill(p, l) for p, l in flat.items()})


def conv3x3(x, w, stride):
  """Dense 3×3 conv, pad 1: x (B,H,W,I), w (3,3,I,O)."""
  win = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
  return np.einsum("bhwcij,ijco->bhwo", win[:, ::stride, ::stride], w)


def paper_split_attention(x, v, radix, card, gw, stride=1, eps=1e-5):
  """The ResNeSt equations with explicit loops over cardinal groups k and splits r.

  Layout facts (refs §4.4): conv group g = r·K + k reads input slice g and writes U_{r,k};
  fc1/fc2 group k reads s_k / z_k; fc2 group k's outputs are laid out (r, c).
  """
  p, s = v["params"], v["batch_stats"]
  bn = lambda t, n, ch: (t - s[n]["mean"][ch]) / np.sqrt(s[n]["var"][ch] + eps) \
      * p[n]["scale"][ch] + p[n]["bias"][ch]
  R, K, c_in, c_k = radix, card, gw // (radix * card), gw // card
  a_k = p["fc1"]["kernel"].shape[-1] // K
  w0 = np.asarray(p["conv"]["kernel"])
  out = []
  for k in range(K):
    u = []
    for r in range(R):
      g = r * K + k
      ch = slice(r * gw + k * c_k, r * gw + (k + 1) * c_k)
      y = conv3x3(x[..., g * c_in:(g + 1) * c_in], w0[..., g * c_k:(g + 1) * c_k], stride)
      u.append(np.maximum(bn(y, "bn0", ch), 0))
    s_k = sum(u).mean(axis=(1, 2))                                     # (B, gw/K)
    a_ch = slice(k * a_k, (k + 1) * a_k)
    z = s_k @ p["fc1"]["kernel"][0, 0][:, a_ch] + p["fc1"]["bias"][a_ch]
    z = np.maximum(bn(z, "bn1", a_ch), 0)
    o = slice(k * R * c_k, (k + 1) * R * c_k)
    G = (z @ p["fc2"]["kernel"][0, 0][:, o] + p["fc2"]["bias"][o]).reshape(-1, R, c_k)
    if R > 1:
      a = np.exp(G - G.max(axis=1, keepdims=True))
      a = a / a.sum(axis=1, keepdims=True)
    else:
      a = 1 / (1 + np.exp(-G))
    out.append(sum(a[:, r, None, None, :] * u[r] for r in range(R)))
  return np.concatenate(out, axis=-1)


@pytest.mark.parametrize("radix,card,gw", CASES)
def test_matches_paper_equations(radix, card, gw):
  x = np.random.RandomState(1).randn(2, 7, 9, gw).astype(np.float32)
  m = SplitAttention(gw, radix, card, stride=2)
  v = randomised_variables(m, jnp.asarray(x))
  out = np.asarray(jax.jit(m.apply)(v, x))
  ref = paper_split_attention(x, jax.tree.map(np.asarray, v), radix, card, gw, stride=2)
  assert out.shape == (2, 4, 5, gw)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


def test_attention_width_matches_timm_and_refs(timm):
  from timm.layers import make_divisible as timm_make_divisible
  for v in [1, 7, 12, 20, 24, 31.9, 36, 60, 100, 160, 512, 1000.5]:
    for mv in (None, 32):
      assert make_divisible(v, 8, mv) == timm_make_divisible(v, 8, mv), (v, mv)
  # refs §4.4 shapes: resnest50d layer2.0 fc1 (64, 128), 4s2x40d (160, 80), 1s4x24d (32, 24).
  assert attention_width(128, 2, 1) == 64
  assert attention_width(160, 4, 2) == 160
  assert attention_width(96, 1, 4) == 32


def test_bad_settings_raise_config_error():
  with pytest.raises(ConfigError, match="radix"):
    attention_width(64, 0, 1)
  with pytest.raises(ConfigError, match="divisible by cardinality\\*radix"):
    attention_width(64, 3, 1)
  with pytest.raises(ConfigError, match="attention channels 32 must be divisible"):
    attention_width(24, 1, 3)


def torch_to_flax(template, state_dict):
  """Same mapping as effvit.convert, for a standalone module (conv kernels transposed)."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(template).items():
    w = state_dict[torch_key(path[1:])].detach().numpy().copy()   # torch updates in place
    out[path] = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
    assert out[path].shape == leaf.shape, path
  return traverse_util.unflatten_dict(out)


def timm_split_attn(torch, timm, gw, radix, card, stride):
  from timm.layers import SplitAttn
  torch.manual_seed(0)
  m = SplitAttn(gw, gw, 3, stride, groups=card, radix=radix, norm_layer=torch.nn.BatchNorm2d)
  g = torch.Generator().manual_seed(1)
  for bn in (m.bn0, m.bn1):
    c = bn.num_features
    bn.weight.data, bn.bias.data = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    bn.running_mean.data = torch.randn(c, generator=g) * 0.2
    bn.running_var.data = torch.rand(c, generator=g) + 0.5
  return m


@pytest.mark.parametrize("radix,card,gw", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm(timm, radix, card, gw, train):
  """Eval: output. Train: batch-statistics output and PyTorch's running-stat update
  (momentum 0.1, unbiased variance; bn1 sees only B = 4 values per channel)."""
  import torch
  torch.set_num_threads(1)
  tm = timm_split_attn(torch, timm, gw, radix, card, stride=2).train(train)
  x = np.random.RandomState(2).randn(4, gw, 9, 11).astype(np.float32)
  m = SplitAttention(gw, radix, card, stride=2)
  template = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 9, 11, gw)))
  v = torch_to_flax(template, tm.state_dict())
  with torch.no_grad():
    ref = tm(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  out, new = jax.jit(lambda v, x: m.apply(v, x, train=train, mutable=["batch_stats"]))(
      v, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-4)
  for name in ("bn0", "bn1"):
    bn = getattr(tm, name)
    np.testing.assert_allclose(new["batch_stats"][name]["mean"], bn.running_mean.numpy(),
                               atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][name]["var"], bn.running_var.numpy(),
                               atol=1e-6, rtol=1e-5)

"""Layer-level checks against PyTorch / explicit computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit.attention import core
from effvit.attention.locally_grouped import LocallyGroupedAttention
from effvit.attention.spatial_reduction import adaptive_avg_pool
from effvit.layers import DropPath
from effvit.models import create_model
from pyramid_helpers import compile_fast, random_variables
from pyramid_helpers import torch_1thread  # noqa: F401  (fixture)


@pytest.mark.parametrize("hw", [(9, 13), (57, 30), (56, 56), (7, 7), (3, 5), (15, 8)])
def test_adaptive_avg_pool_matches_torch(torch_1thread, hw):
  # Sizes not divisible by 7 give PyTorch's overlapping / unequal bins; 3x5 is smaller than 7.
  torch = torch_1thread
  x = np.random.default_rng(0).standard_normal((2, *hw, 5)).astype(np.float32)
  ref = torch.nn.AdaptiveAvgPool2d(7)(torch.from_numpy(x).permute(0, 3, 1, 2))
  ours = adaptive_avg_pool(jnp.asarray(x), 7)
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(),
                             rtol=1e-6, atol=1e-6)


# ---- locally-grouped attention with masked padding --------------------------------------------

H, W, C, HEADS, WIN = 6, 9, 8, 2, 4     # pads to 8x12: windows of 4|2 real rows x 4|1 cols


def lsa(masked, hw=(H, W), **kw):
  """The layer's output (and state) for hw-shaped tokens, compiled (much faster than eager)."""
  layer = LocallyGroupedAttention(num_heads=HEADS, window=WIN, masked=masked)
  return jax.jit(lambda p, x: layer.apply(p, x, hw, **kw))


def lsa_params(seed=0):
  rng = np.random.default_rng(seed)
  d = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
  b = lambda n: jnp.asarray(0.5 * rng.standard_normal(n), jnp.float32)
  return {"params": {"qkv": {"kernel": d(C, 3 * C), "bias": b(3 * C)},
                     "proj": {"kernel": d(C, C), "bias": b(C)}}}


def explicit_masked_lsa(x, p):
  """Attention inside each window over its real tokens only, one window at a time (numpy)."""
  x = np.asarray(x, np.float64)
  wq, bq = (np.asarray(p["params"]["qkv"][k], np.float64) for k in ("kernel", "bias"))
  wo, bo = (np.asarray(p["params"]["proj"][k], np.float64) for k in ("kernel", "bias"))
  grid = x.reshape(x.shape[0], H, W, C)
  out = np.zeros_like(grid)
  d = C // HEADS
  for b in range(grid.shape[0]):
    for r0 in range(0, H, WIN):
      for c0 in range(0, W, WIN):
        tok = grid[b, r0:r0 + WIN, c0:c0 + WIN].reshape(-1, C)   # real tokens only
        q, k, v = np.split(tok @ wq + bq, 3, axis=-1)
        heads = []
        for h in range(HEADS):
          s = q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / np.sqrt(d)
          a = np.exp(s - s.max(-1, keepdims=True))
          heads.append((a / a.sum(-1, keepdims=True)) @ v[:, h * d:(h + 1) * d])
        rows, cols = min(WIN, H - r0), min(WIN, W - c0)
        out[b, r0:r0 + rows, c0:c0 + cols] = np.concatenate(heads, -1).reshape(rows, cols, C)
  return out.reshape(x.shape) @ wo + bo


def test_masked_lsa_equals_attention_over_real_tokens_only():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, H * W, C)), jnp.float32)
  p = lsa_params()
  ours, _ = lsa(True)(p, x)
  np.testing.assert_allclose(np.asarray(ours), explicit_masked_lsa(x, p), rtol=1e-5, atol=1e-5)
  # Unmasked (timm's zero padding) lets the padded keys (k = b_k) in, so it must differ here.
  unmasked, _ = lsa(False)(p, x)
  assert np.abs(np.asarray(unmasked) - np.asarray(ours)).max() > 1e-2


def test_masked_lsa_gives_padded_keys_zero_weight():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, H * W, C)), jnp.float32)
  _, state = lsa(True, mutable=[core.ATTENTION_COLLECTION])(lsa_params(), x)
  probs = np.asarray(state[core.ATTENTION_COLLECTION]["probs"][0])  # (windows, heads, k², k²)
  valid = np.zeros((8, 12), bool)
  valid[:H, :W] = True
  valid = valid.reshape(2, WIN, 3, WIN).transpose(0, 2, 1, 3).reshape(6, WIN * WIN)
  assert probs.shape == (6, HEADS, WIN * WIN, WIN * WIN)
  for win in range(6):
    assert np.all(probs[win][..., ~valid[win]] == 0.0)
    np.testing.assert_allclose(probs[win][..., valid[win]].sum(-1), 1.0, rtol=1e-6)
  assert (~valid).any(axis=1).sum() == 4   # the check above did cover padded keys


def test_masked_and_unmasked_lsa_agree_without_padding():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8 * 12, C)), jnp.float32)
  a, _ = lsa(True, (8, 12))(lsa_params(), x)
  b, _ = lsa(False, (8, 12))(lsa_params(), x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masked_lsa_model_runs():
  model = create_model("twins_svt_small", depths=(1, 1, 1, 1), lsa_masked=True)
  x = np.random.default_rng(4).standard_normal((1, 40, 52, 3)).astype(np.float32)  # all pad
  v = random_variables(model, x.shape)
  ref = create_model("twins_svt_small", depths=(1, 1, 1, 1))
  out, out_ref = compile_fast(lambda v, x: (model.apply(v, x), ref.apply(v, x)), v, x)(v, x)
  assert np.isfinite(np.asarray(out)).all()
  assert np.abs(np.asarray(out) - np.asarray(out_ref)).max() > 1e-3   # the flag is honoured


# ---- stochastic depth -------------------------------------------------------------------------

def test_drop_path_drops_whole_samples_and_rescales():
  rate, n = 0.25, 4000
  x = jnp.ones((n, 7, 3))
  y = np.asarray(DropPath(rate).apply({}, x, deterministic=False,
                                      rngs={"dropout": jax.random.key(0)}))
  per_sample = y.reshape(n, -1)
  kept = per_sample[:, 0] != 0
  # Every sample is either entirely zero or entirely scaled by 1 / keep_prob.
  assert np.all(per_sample[~kept] == 0)
  np.testing.assert_allclose(per_sample[kept], 1 / (1 - rate), rtol=1e-6)
  assert abs((~kept).mean() - rate) < 0.03           # ~4.5 sigma of the binomial
  # Off in eval, and at rate 0.
  assert np.array_equal(np.asarray(DropPath(rate).apply({}, x, deterministic=True)), x)
  assert np.array_equal(np.asarray(DropPath(0.0).apply({}, x, deterministic=False)), x)


def test_drop_path_rates_follow_timm(torch_1thread):
  # One linspace over all blocks, split per stage (refs/architectures.md §0.1, §8.5).
  from timm.layers import calculate_drop_path_rates
  depths = (2, 2, 10, 4)
  cfg = create_model("twins_svt_small", drop_path_rate=0.3).config
  ours = cfg.block_drop_path_rates()
  theirs = calculate_drop_path_rates(0.3, list(depths), stagewise=True)
  assert [len(s) for s in ours] == list(depths)
  np.testing.assert_allclose(np.concatenate(ours), np.concatenate(theirs), rtol=1e-6, atol=1e-7)

"""LaViT's less attention: the semantics of VA/LA layers, the residual path, the DP loss, the
"less" mixer inside any pyramid, and the lavit_* sizes against the paper's figures."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from effvit.attention import core, less
from effvit.attention.less import LessAttention, LessCarry, key_cell_matrix
from effvit.errors import ConfigError
from effvit.models import create_model
from effvit.profile import model_cost

# A lavit layout shrunk to compile in about a second at 64 px: grids 16, 8, 4, 2 with 2x2 keys
# (sr 8, 4, 2, 1); stages 3-4 have LA layers.
TINY = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 2, 2),
            mlp_ratios=(2, 2, 2, 2), va_layers=(1, 1, 1, 1), img_size=64, num_classes=10)
X64 = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)


def random_params(model, x, seed=0, **init_kw):
  """Params with O(1) activations and far-from-uniform attention (the init's tiny weights would
  make every attention matrix ~uniform and hide errors). LayerScale γ stays zero."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **init_kw), x)["params"]

  def fill(path, leaf):
    name = path[-1].key
    if name == "res_gamma":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
      return jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    if name == "bias":
      return jnp.asarray(0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1]) or 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


# XLA:CPU's backend optimisation costs seconds per model on a shared CPU and buys nothing here.
FAST = {"xla_backend_optimization_level": 0}


def init(module, *args, **kw):
  # The rbg key compiles the init's many random draws far faster than threefry.
  key = jax.random.key(0, impl="unsafe_rbg")
  return jax.jit(lambda *a: module.init(key, *a, **kw), compiler_options=FAST)(*args)


def apply(module, variables, *args, train=None, mutable=False, **kw):
  """Jitted apply (eager flax compiles every op on its own: slower still)."""
  if train is not None:
    kw["train"] = train
    if train:
      kw["rngs"] = {"dropout": jax.random.key(1)}
  fn = lambda v, *a: module.apply(v, *a, mutable=mutable, **kw)
  return jax.jit(fn, compiler_options=FAST)(variables, *args)


def stochastic(rng, shape):
  p = rng.random(shape).astype(np.float32) ** 4      # peaky rows
  return p / p.sum(-1, keepdims=True)


def softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# One layer.

def test_la_with_identity_maps_and_logits_reproduces_previous_attention():
  rng = np.random.default_rng(1)
  hw, c = (8, 8), 16
  x = jnp.asarray(rng.standard_normal((2, 64, c)), jnp.float32)
  va = LessAttention(num_heads=2, sr_ratio=2, grid=hw, la_input="logits")
  va_params = random_params(va, x, hw=hw)
  y_va, carry = apply(va, {"params": va_params}, x, hw=hw)
  la = LessAttention(num_heads=2, sr_ratio=2, grid=hw, la=True, la_input="logits")
  la_params = init(la, x, hw=hw, carry=carry)["params"]
  assert set(la_params) == {"sr", "norm", "v", "proj", "theta", "psi"}    # no q, no k
  np.testing.assert_array_equal(la_params["theta"]["kernel"], np.eye(16))
  np.testing.assert_array_equal(la_params["psi"]["kernel"], np.eye(64))
  la_params = dict(la_params, sr=va_params["sr"], norm=va_params["norm"], proj=va_params["proj"],
                   v={"kernel": va_params["kv"]["kernel"][:, c:],
                      "bias": va_params["kv"]["bias"][c:]})
  y_la, la_carry = apply(la, {"params": la_params}, x, hw=hw, carry=carry)
  np.testing.assert_allclose(la_carry.probs, carry.probs, rtol=0, atol=1e-7)
  np.testing.assert_allclose(y_la, y_va, rtol=1e-6, atol=1e-6)
  # The VA attention itself is softmax(Q Kᵀ/√d) of the layer's own projections.
  assert carry.probs.shape == (2, 2, 64, 16)
  np.testing.assert_allclose(np.asarray(carry.probs).sum(-1), 1, atol=1e-6)


@pytest.mark.parametrize("share_heads", [True, False])
@pytest.mark.parametrize("la_input", ["probs", "logits"])
def test_la_attention_is_the_matrix_form_of_theta_and_psi(share_heads, la_input):
  # A' = W_Ψᵀ A W_Θ + (W_Ψᵀ 1) b_Θᵀ + b_Ψ 1ᵀ per head, P = softmax(A'), in numpy.
  rng = np.random.default_rng(2)
  hw, k_hw, heads = (4, 4), (2, 2), 2
  x = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
  a_prev = rng.standard_normal((2, heads, 16, 4)).astype(np.float32)
  carry = LessCarry(jnp.asarray(a_prev), jnp.asarray(softmax(a_prev)), hw, k_hw)
  la = LessAttention(num_heads=heads, sr_ratio=2, grid=hw, la=True, la_input=la_input,
                     share_heads=share_heads)
  params = random_params(la, x, hw=hw, carry=carry)
  _, state = apply(la, {"params": params}, x, hw=hw, carry=carry,
                   mutable=[core.ATTENTION_COLLECTION])
  probs = np.asarray(state[core.ATTENTION_COLLECTION]["probs"][0])
  wt, bt = (np.asarray(params["theta"][k], np.float64) for k in ("kernel", "bias"))
  wp, bp = (np.asarray(params["psi"][k], np.float64) for k in ("kernel", "bias"))
  for h in range(heads):
    pick = (lambda w: w) if share_heads else (lambda w: w[h])
    wt_h, bt_h, wp_h, bp_h = pick(wt), pick(bt), pick(wp), pick(bp)
    for b in range(2):
      a = wp_h.T @ a_prev[b, h] @ wt_h + np.outer(wp_h.T @ np.ones(16), bt_h) + np.outer(
          bp_h, np.ones(4))
      np.testing.assert_allclose(probs[b, h], softmax(a), rtol=1e-5, atol=1e-6)


def test_la_rejects_other_resolution_and_missing_attention():
  x = jnp.zeros((1, 16, 8))
  la = LessAttention(num_heads=2, sr_ratio=1, grid=(4, 4), la=True)
  with pytest.raises(ConfigError, match="va_layers"):
    la.init(jax.random.key(0), x, (4, 4), carry=None)
  carry = LessCarry(jnp.zeros((1, 2, 36, 36)), jnp.zeros((1, 2, 36, 36)), (6, 6), (6, 6))
  with pytest.raises(ConfigError, match="img_size"):
    la.init(jax.random.key(0), jnp.zeros((1, 36, 8)), (6, 6), carry=carry)


# --------------------------------------------------------------------------------------------
# Residual attention downsampling.

def pooled_reference(p, q0, k0, q1, k1):
  """numpy: queries averaged over 2x2 (or equal) cells, keys summed over them."""
  b, g = p.shape[:2]
  fq, fk = q0[0] // q1[0], k0[0] // k1[0]
  x = p.reshape(b, g, q1[0], fq, q1[1], fq, k1[0], fk, k1[1], fk)
  return x.mean(axis=(3, 5)).sum(axis=(5, 7)).reshape(b, g, q1[0] * q1[1], k1[0] * k1[1])


@pytest.mark.parametrize("residual_on", ["probs", "logits"])
def test_residual_adds_gamma_scaled_downsampled_previous_attention(residual_on):
  rng = np.random.default_rng(3)
  q0 = k0 = (4, 4)                                        # previous stage: global 16x16 attention
  hw = (2, 2)                                             # this stage: global 4x4, 3 heads
  p_prev = stochastic(rng, (2, 2, 16, 16))
  carry = LessCarry(jnp.asarray(p_prev), jnp.asarray(p_prev), q0, k0)
  x = jnp.asarray(rng.standard_normal((2, 4, 12)), jnp.float32)
  va = LessAttention(num_heads=3, sr_ratio=1, grid=hw, residual_from=(2, q0, k0),
                     residual_on=residual_on)
  params = random_params(va, x, hw=hw, carry=carry)
  assert params["res_gamma"].shape == (3,) and params["res_heads"].shape == (2, 3)

  def attn(params):
    _, st = apply(va, {"params": params}, x, hw=hw, carry=carry,
                  mutable=[core.ATTENTION_COLLECTION])
    return np.asarray(st[core.ATTENTION_COLLECTION]["probs"][0], np.float64)

  p0 = attn(params)                                       # γ = 0: plain attention
  gamma = np.array([0.5, -1.0, 2.0], np.float32)
  p1 = attn(dict(params, res_gamma=jnp.asarray(gamma)))
  ds = pooled_reference(p_prev.astype(np.float64), q0, k0, hw, hw)
  np.testing.assert_allclose(ds.sum(-1), 1, atol=1e-6)     # keys summed: rows stay distributions
  res = np.einsum("bgnm,gh->bhnm", ds, np.asarray(params["res_heads"])) * gamma[:, None, None]
  want = p0 + res if residual_on == "probs" else softmax(np.log(p0) + res)
  np.testing.assert_allclose(p1, want, rtol=1e-5, atol=1e-6)


def test_residual_conv_starts_as_the_pool():
  rng = np.random.default_rng(4)
  q0 = k0 = (4, 4)
  hw = (2, 2)
  p_prev = stochastic(rng, (2, 2, 16, 16))
  carry = LessCarry(jnp.asarray(p_prev), jnp.asarray(p_prev), q0, k0)
  x = jnp.asarray(rng.standard_normal((2, 4, 12)), jnp.float32)
  make = lambda ds: LessAttention(num_heads=3, sr_ratio=1, grid=hw, residual_from=(2, q0, k0),
                                  residual_ds=ds)
  pool, conv = make("pool"), make("conv")
  vc = init(conv, x, hw=hw, carry=carry)["params"]
  assert vc["res_q_kernel"].shape == (2, 2, 2) and vc["res_k_kernel"].shape == (2, 2, 2)
  vp = dict(random_params(pool, x, hw=hw, carry=carry), res_gamma=jnp.full((3,), 0.7))
  vc = dict(vc, **vp)                                     # shared weights; conv kernels at init
  np.testing.assert_allclose(apply(conv, {"params": vc}, x, hw=hw, carry=carry)[0],
                             apply(pool, {"params": vp}, x, hw=hw, carry=carry)[0],
                             rtol=1e-5, atol=1e-6)


def test_residual_path_skipped_where_a_grid_would_grow():
  abstract = lambda m: jax.eval_shape(lambda x: m.init(jax.random.key(0), x),
                                      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
  # sr 8, 4, 1, 1 at 64 px: keys 2x2, 2x2, 4x4 (global), 2x2; stage 2's keys would grow.
  v = abstract(create_model("lavit_tiny", **dict(TINY, sr_ratios=(8, 4, 1, 1))))
  assert "res_gamma" in v["stages_1"]["blocks_0"]["attn"]
  assert "res_gamma" not in v["stages_2"]["blocks_0"]["attn"]
  assert "res_gamma" in v["stages_3"]["blocks_0"]["attn"]
  # With "conv", a kernel only where a grid shrinks: stage 1 keys stay 2x2, queries halve.
  v = abstract(create_model("lavit_tiny", **TINY, la_residual_ds="conv"))
  att = v["stages_1"]["blocks_0"]["attn"]
  assert att["res_q_kernel"].shape == (1, 2, 2) and "res_k_kernel" not in att
  assert not any(k.startswith("res_") for k in v["stages_0"]["blocks_0"]["attn"])


# --------------------------------------------------------------------------------------------
# Diagonality-preserving loss.

def literal_reference(a):
  """The recollected paper formula, per matrix, by loops; mean over batch and heads."""
  vals = []
  for mat in a.reshape(-1, *a.shape[-2:]):
    m = mat.shape[0]
    sym = sum(abs(mat[i, j] - mat[j, i]) for i in range(m) for j in range(m))
    dia = sum((m - 1) * mat[i, i] - sum(mat[i, j] for j in range(m) if j != i) for i in range(m))
    vals.append(sym + dia)
  return np.mean(vals)


def test_dp_loss_zero_for_identity_positive_for_asymmetric_off_diagonal():
  dp_loss_bounded = jax.jit(less.dp_loss_bounded, compiler_options=FAST)
  dp_loss_literal = jax.jit(less.dp_loss_literal, compiler_options=FAST)
  eye = jnp.broadcast_to(jnp.eye(5), (2, 3, 5, 5))
  assert float(dp_loss_bounded(eye)) == 0.0
  shift = jnp.broadcast_to(jnp.roll(jnp.eye(5), 1, axis=1), (2, 3, 5, 5))   # i attends i+1
  assert float(dp_loss_bounded(shift)) > 0.5
  swap = jnp.asarray(np.eye(4)[[1, 0, 3, 2]])[None, None]   # symmetric but off-diagonal
  assert float(dp_loss_bounded(swap)) > 0.0
  assert float(dp_loss_bounded(jnp.full((1, 1, 4, 4), 0.25))) == 0.0   # diag = off mean: no push
  a = np.random.default_rng(5).standard_normal((2, 2, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(dp_loss_literal(jnp.asarray(a)), literal_reference(a), rtol=1e-5)
  # Its sign flaw, kept for the metric: identity attention scores M(M-1) > 0.
  np.testing.assert_allclose(dp_loss_literal(eye), 5 * 4)


def test_key_cell_matrix_averages_the_queries_of_each_key():
  p = np.random.default_rng(6).random((1, 2, 16, 4)).astype(np.float32)   # 4x4 queries, 2x2 keys
  s = np.asarray(key_cell_matrix(jnp.asarray(p), (4, 4), (2, 2), 2))
  for ki, kj in np.ndindex(2, 2):
    rows = [(2 * ki + a) * 4 + 2 * kj + b for a in range(2) for b in range(2)]
    np.testing.assert_allclose(s[0, :, ki * 2 + kj], p[0, :, rows].mean(0), rtol=1e-6)


def test_dp_loss_gradient_reaches_theta_and_psi():
  rng = np.random.default_rng(7)
  hw = (4, 4)
  x = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
  p = stochastic(rng, (2, 2, 16, 4))
  carry = LessCarry(jnp.asarray(p), jnp.asarray(p), hw, (2, 2))
  la = LessAttention(num_heads=2, sr_ratio=2, grid=hw, la=True)
  params = init(la, x, hw=hw, carry=carry)["params"]     # identity Θ/Ψ

  def loss(params):
    _, st = la.apply({"params": params}, x, hw, carry=carry, deterministic=False,
                     mutable=["losses"])
    return sum(jax.tree.leaves(st["losses"]))

  grads = jax.jit(jax.grad(loss))(params)
  for name in ("theta", "psi"):
    assert float(jnp.abs(grads[name]["kernel"]).sum()) > 0, name
  assert float(jnp.abs(grads["v"]["kernel"]).sum()) == 0    # the loss sees only the attention


# --------------------------------------------------------------------------------------------
# Whole models.

@functools.lru_cache(maxsize=None)
def tiny_eval():
  """(params, eval logits, eval "losses") of the TINY model, shared by the tests below."""
  model = create_model("lavit_tiny", **TINY)
  params = random_params(model, jnp.asarray(X64))
  logits, state = apply(model, {"params": params}, jnp.asarray(X64), train=False,
                        mutable=["losses"])
  return params, np.asarray(logits), state


def test_dp_loss_is_sown_in_training_only():
  params, _, eval_state = tiny_eval()
  assert not eval_state.get("losses")
  model = create_model("lavit_tiny", **TINY)
  _, st = apply(model, {"params": params}, jnp.asarray(X64), train=True,
                mutable=["losses", "metrics"])
  losses = traverse_util.flatten_dict(st["losses"])
  # One value per LA layer: block 1 of stages 3 and 4.
  assert sorted(k[:2] for k in losses) == [("stages_2", "blocks_1"), ("stages_3", "blocks_1")]
  assert all(np.isfinite(v[0]) and v[0] >= 0 for v in losses.values())
  assert len(traverse_util.flatten_dict(st["metrics"])) == 2          # literal term, as metric


def test_all_vanilla_matches_plain_sra_pyramid():
  x = jnp.asarray(X64)
  sra = create_model("lavit_tiny", **dict(TINY, mixers=("sra",) * 4))
  p_sra = random_params(sra, x)
  want = apply(sra, {"params": p_sra}, x)
  vanilla = create_model("lavit_tiny", **dict(TINY, va_layers=TINY["depths"]))
  flat = traverse_util.flatten_dict(jax.eval_shape(
      lambda x: vanilla.init(jax.random.key(0), x), x)["params"])
  # Same names as SRA, plus the residual path's head maps and γ (= 0, as initialised).
  extra = {k: (jnp.zeros if k[-1] == "res_gamma" else jnp.ones)(v.shape)
           for k, v in flat.items() if k[-1] in ("res_heads", "res_gamma")}
  assert len(extra) == 2 * 3                                # stages 2-4 take the residual
  assert set(flat) - set(extra) == set(traverse_util.flatten_dict(p_sra))
  p_less = traverse_util.unflatten_dict({**traverse_util.flatten_dict(p_sra), **extra})
  np.testing.assert_allclose(apply(vanilla, {"params": p_less}, x), want, rtol=1e-5, atol=1e-5)


def test_less_is_a_mixer_of_any_pyramid():
  x = jnp.asarray(X64[:1])
  pvt = create_model("pvt_v2_b0", mixers=("sra", "sra", "less", "less"), img_size=64,
                     num_classes=10)
  v = random_params(pvt, x)
  assert "psi" in v["stages_2"]["blocks_1"]["attn"]
  out = apply(pvt, {"params": v}, x)
  assert out.shape == (1, 10) and np.isfinite(out).all()
  # Twins-SVT with LA in stage 3 interleaved with LSA: the LA block reads block 1's attention
  # through the LSA block between them, and stage 4 gets the residual from stage 3's LA block.
  svt = create_model("twins_svt_small", mixers=("lsa/sra", "lsa/sra", "lsa/less", "less"),
                     embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 4, 2),
                     img_size=64, num_classes=10)
  v = random_params(svt, x)
  stage = v["stages_2"]
  assert "q" in stage["blocks_1"]["attn"] and "psi" in stage["blocks_3"]["attn"]
  assert "res_gamma" in v["stages_3"]["blocks_0"]["attn"]
  out, st = apply(svt, {"params": v}, x, train=True, mutable=["losses"])
  assert out.shape == (1, 10) and np.isfinite(out).all()
  assert len(jax.tree.leaves(st["losses"])) == 2


@pytest.mark.parametrize("opts", [
    dict(la_input="logits", la_residual_on="logits", la_share_heads=False,
         la_identity_init=False, la_residual_ds="conv"),
    dict(la_dp_loss="literal", la_residual=False),
])
def test_option_combinations_train(opts):
  model = create_model("lavit_tiny", **TINY, **opts)
  x = jnp.asarray(X64)
  params = random_params(model, x)                          # traces init with these options
  out, st = apply(model, {"params": params}, x, train=True, mutable=["losses"])
  assert np.isfinite(out).all() and len(jax.tree.leaves(st["losses"])) == 2
  off = create_model("lavit_tiny", **{**TINY, **opts, "la_dp_loss": "none"})   # not computed
  assert not jax.eval_shape(lambda x: off.apply({"params": params}, x, train=True,
                                                mutable=["losses"]), x)[1]


def test_bfloat16_compute():
  params, ref, _ = tiny_eval()
  bf16 = create_model("lavit_tiny", **TINY, dtype="bfloat16")
  out, st = apply(bf16, {"params": params}, jnp.asarray(X64), train=True, mutable=["losses"])
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  assert all(np.isfinite(v) for v in jax.tree.leaves(st["losses"]))
  # No dropout / drop path in TINY, so train-mode logits equal eval-mode ones up to bf16 error.
  assert np.abs(np.asarray(out) - ref).max() < 0.1 * np.abs(ref).max()


# --------------------------------------------------------------------------------------------
# Configuration errors.

@pytest.mark.parametrize("bad, match", [
    (dict(va_layers=(1, 1, 0, 1)), r"va_layers\[2\]=0"),           # LA first in a stage
    (dict(va_layers=(1, 1, 3, 1)), r"va_layers\[2\]=3 exceeds"),    # more VA than blocks
    (dict(va_layers=(1, 1, 1)), "one value per stage"),
    (dict(img_size=16), r"smaller than sr_ratios\[0\]=8"),           # no keys at img_size
    (dict(la_input="post"), "unknown la_input"),
    (dict(la_residual_on="both"), "unknown la_residual_on"),
    (dict(la_dp_loss="l2"), "unknown la_dp_loss"),
    (dict(img_size=200, embed_dims=(16, 32, 48, 64)), None),        # fine with the pool ...
    (dict(img_size=200, la_residual_ds="conv"), "whole factors"),   # ... not with the conv
])
def test_bad_configs_raise_config_error(bad, match):
  if match is None:
    create_model("lavit_tiny", **{**TINY, **bad})
    return
  with pytest.raises(ConfigError, match=match):
    create_model("lavit_tiny", **{**TINY, **bad})


def test_other_input_size_says_which_img_size_to_build():
  model = create_model("lavit_tiny", **TINY)
  for shape, match in (((1, 128, 128, 3), "img_size=128"), ((1, 64, 96, 3), "square")):
    with pytest.raises(ConfigError, match=match):
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                     jax.ShapeDtypeStruct(shape, jnp.float32))


# --------------------------------------------------------------------------------------------
# Sizes of the registered models (trace only).

PUBLISHED = {"lavit_tiny": (10.9e6, 1.6), "lavit_small": (22.4e6, 3.3), "lavit_base": (39.6e6, 6.1)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_lavit_sizes_within_10_percent_of_paper(name):
  cost = model_cost(create_model(name), 224)
  params, gmacs = PUBLISHED[name]
  assert abs(cost["params"] / params - 1) < 0.10, cost
  assert abs(cost["gmacs"] / gmacs - 1) < 0.10, cost


def test_theta_psi_sized_by_the_token_counts_at_img_size():
  # 224 px: stage grids 56, 28, 14, 7; keys 7x7 everywhere (sr 8, 4, 2, 1).
  model = create_model("lavit_small")
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  p = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  assert p["stages_2"]["blocks_1"]["attn"]["psi"]["kernel"].shape == (196, 196)
  assert p["stages_2"]["blocks_1"]["attn"]["theta"]["kernel"].shape == (49, 49)
  assert p["stages_3"]["blocks_2"]["attn"]["psi"]["kernel"].shape == (49, 49)
  assert "psi" not in p["stages_1"]["blocks_3"]["attn"] and "q" in p["stages_2"]["blocks_0"]["attn"]

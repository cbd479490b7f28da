"""effvit.xla_cpu: XLA accepts the per-step options and they change what goes to YNNPACK."""
import jax
import jax.numpy as jnp
import pytest

from effvit import xla_cpu


def _ynn_fusions(kind, fn, *args):
  """Number of YNNPACK fusions in fn compiled with effvit's options for `kind`."""
  options = xla_cpu.compiler_options(kind)
  compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
  return compiled.as_text().count('"kind":"__ynn_fusion"')


def _layer_norm_then_dense(x, w):
  mu = x.mean(-1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(jnp.square(x - mu).mean(-1, keepdims=True) + 1e-6)
  return y @ w


def test_options_route_reductions_per_step(monkeypatch):
  monkeypatch.delenv("EFFVIT_XLA_CPU", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  x, w = jnp.ones((64, 96)), jnp.ones((96, 32))
  # Inference: the dot alone goes to YNNPACK, the LayerNorm stays with XLA's emitters.
  assert _ynn_fusions("inference", _layer_norm_then_dense, x, w) == 1
  # Training: a weight-gradient-like reduction over the leading axis goes to YNNPACK too.
  grad_w = lambda x, w: jax.grad(lambda w: _layer_norm_then_dense(x, w).sum())(w)
  assert _ynn_fusions("train", lambda x: (x * 2.0).sum(0), x) == 1
  assert _ynn_fusions("inference", lambda x: (x * 2.0).sum(0), x) == 0
  assert _ynn_fusions("train", grad_w, x, w) >= 1


def test_bfloat16_training_keeps_dot_operands_in_bfloat16(monkeypatch):
  """Under the float32 training set (DOT), XLA widens a bfloat16 dot's operand to float32
  before YNNPACK's fusion; bfloat16 training's set hands YNNPACK the bfloat16 operands."""
  monkeypatch.delenv("EFFVIT_XLA_CPU", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  x, w = jnp.ones((64, 96), jnp.bfloat16), jnp.ones((96, 32), jnp.bfloat16)
  dot = lambda x, w: (jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32) * 2.0)
  def operands(dtype):
    options = xla_cpu.compiler_options("train", dtype)
    text = jax.jit(dot, compiler_options=options).lower(x, w).compile().as_text()
    line = next(l for l in text.splitlines() if "%ynn_fusion = " in l)
    return line.split("fusion(")[1].split(")")[0]
  assert operands(jnp.bfloat16) == "%x.1, %w.1"
  assert "convert" in operands(jnp.float32)
  assert xla_cpu.compiler_options("train", jnp.float32) == xla_cpu.compiler_options("train")


def test_opt_outs_and_bad_kind(monkeypatch):
  monkeypatch.setenv("EFFVIT_XLA_CPU", "default")
  assert xla_cpu.compiler_options("train") == {"xla_disable_hlo_passes": "cse_barrier_expander"}
  assert xla_cpu.compiler_options("inference") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=foo")   # the user's own list wins
  assert xla_cpu.compiler_options("train") == {}
  monkeypatch.delenv("EFFVIT_XLA_CPU")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_cpu.compiler_options("inference") == {}
  with pytest.raises(ValueError, match="kind must be one of"):
    xla_cpu.compiler_options("eval")


def test_init_compiles_unoptimised_with_the_same_values(monkeypatch):
  """The train state's init (random numbers only) is compiled without LLVM's optimisation:
  XLA accepts the option, and the parameters match the optimised build to an ulp."""
  monkeypatch.delenv("EFFVIT_XLA_CPU", raising=False)
  options = xla_cpu.compiler_options("init")
  assert options == {"xla_backend_optimization_level": 0}
  def init(key):
    k1, k2 = jax.random.split(key)
    return (0.02 * jax.random.truncated_normal(k1, -2.0, 2.0, (64, 96)),
            jax.random.normal(k2, (3, 3, 1, 32)) * 0.3)
  fast, plain = (jax.jit(init, compiler_options=o)(jax.random.key(3)) for o in (options, None))
  for a, b in zip(fast, plain):
    assert float(a.std()) > 0
    assert jnp.allclose(a, b, rtol=3e-7, atol=0.0)
  monkeypatch.setenv("EFFVIT_XLA_CPU", "default")
  assert xla_cpu.compiler_options("init") == {}


def test_remat_recomputes_under_the_train_options(monkeypatch):
  """XLA:CPU strips jax.checkpoint's barriers and merges the backward's recomputation into
  the forward: remat planned as much memory as no remat (11 MiB both here). Under the train
  options a chain of checkpointed residual MLP blocks keeps its recomputation (more dots),
  stores only the blocks' inputs, not their 4x wider hidden maps, and gives the same
  gradients."""
  monkeypatch.delenv("EFFVIT_XLA_CPU", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  block = lambda w, x: x + jnp.tanh(x @ w[0]) @ w[1]
  def grad(remat):
    step = jax.checkpoint(block) if remat else block
    def loss(ws, x):
      for w in ws:
        x = step(w, x)
      return (x * x).sum()
    return jax.grad(loss)
  ws = [(jnp.full((64, 256), 0.002 * (i + 1)), jnp.full((256, 64), -0.003)) for i in range(8)]
  x = jnp.linspace(-1, 1, 1024 * 64).reshape(1024, 64)
  plans = {}
  for remat in (False, True):
    compiled = jax.jit(grad(remat), compiler_options=xla_cpu.compiler_options("train")).lower(
        ws, x).compile()
    plans[remat] = (compiled.memory_analysis().temp_size_in_bytes,
                    compiled.as_text().count(" dot("), compiled(ws, x))
  (mem0, dots0, g0), (mem1, dots1, g1) = plans[False], plans[True]
  assert dots1 > dots0            # the forward's dots are computed again in the backward
  assert mem1 < 0.6 * mem0        # measured 12 -> 5.25 MiB
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)

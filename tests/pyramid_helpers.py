"""Shared helpers for the pyramid tests: cheap random weights and error measures.

Weights are drawn so that activations stay O(1) and attention is far from uniform (Linear /
conv weights ~ N(0, 1/fan_in), norm scales 1 ± 0.2, biases ~ N(0, 0.2²)). The references' own
init (trunc-normal(.02) linears, zero biases, unit norms) gives near-zero attention logits,
i.e. near-uniform attention, and zero biases: errors in the attention scale, the head split,
the qkv order or the handling of padded tokens would barely show.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@functools.lru_cache(maxsize=None)
def registered_abstract_variables(name, size=224):
  """Shapes of the variables of registered model `name` (shared by the count/GMAC tests)."""
  from effvit.models import create_model
  return abstract_variables(create_model(name), (1, size, size, 3))


def random_variables(model, shape=(1, 64, 64, 3), seed=0):
  """Variables of `model` filled from the distribution above (no init compile)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      v = 1 + 0.2 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      v = 0.2 * rng.standard_normal(leaf.shape)
    elif name == "kernel":    # Dense (in, out) / Conv (kh, kw, in/g, out): fan_in = all but last
      v = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
    else:                     # pos_embed, cls_token
      v = 0.5 * rng.standard_normal(leaf.shape)
    return jnp.asarray(v, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, shape))


def perturb_torch(module, seed=0):
  """The same distribution for a PyTorch model's parameters, in place."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":    # norm scales
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf == "bias":
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      elif leaf == "weight":                  # Linear (out, in) / Conv (O, I/g, k, k)
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
      else:                                   # pos_embed, cls_token
        p.copy_(0.5 * torch.randn(p.shape, generator=g))


def errors(ours, ref):
  """(max |Δ|, max |Δ| / max |ref|) of two arrays of the same shape."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  diff = np.abs(ours - ref).max()
  return float(diff), float(diff / np.abs(ref).max())


def grouped_conv(x, kernel):
  """Depthwise conv as XLA's grouped conv, "same" zero padding, stride 1: the reference for
  effvit's depthwise conv and its C++ kernels. kernel: (kh, kw, C)."""
  k = kernel.shape[0] // 2, kernel.shape[1] // 2
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), (k, k), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


# Compiling dominates these tests on CPU. These options make XLA compile 3-5x faster (less
# LLVM optimisation, no fusion emitters); they change speed, not semantics (outputs agree with
# the default compile to ~1e-6).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def compile_fast(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def logits_and_features(model, variables, x):
  """(logits, [4 NHWC stage maps]) from one compiled function."""
  fn = lambda v, x: (model.apply(v, x), model.apply(v, x, method="features"))
  return compile_fast(fn, variables, x)(variables, x)


@pytest.fixture(scope="module")
def torch_1thread(timm):
  """torch on one thread for the module: on a shared 2-core machine its thread pool otherwise
  fights XLA's and other processes', making small reference forwards 10-30x slower."""
  import torch
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(before)

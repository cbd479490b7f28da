"""Numerical parity with timm (PVTv2, Twins) through effvit.convert.

timm's random weights are perturbed (see pyramid_helpers) so logits are O(1) and attention is
far from uniform, then converted with from_torch_state_dict. Logits and the four stage maps
must agree to float32 round-off, at 224x224 and at a size that is not a multiple of 32
(uneven ceil/floor sizes, LSA window padding, adaptive-pool bins that overlap).
Stage maps are compared with timm's `forward_intermediates` (its default norm=False): PVTv2
returns each stage's output after that stage's LayerNorm; Twins returns the raw stage outputs,
the final norm being part of the head.
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit.convert import from_torch_state_dict, to_torch_state_dict
from effvit.layers import LayerNorm
from effvit.models import create_model
from pyramid_helpers import errors, logits_and_features, nchw_to_nhwc, perturb_torch
from pyramid_helpers import torch_1thread  # noqa: F401  (fixture)

# Reduced depths keep the suite fast; SVT keeps 2 blocks per stage so every stage has both
# an LSA block (with its PEG after it) and a GSA block.
MODELS = {
    "pvt_v2_b0": dict(depths=(1, 1, 1, 1)),
    "pvt_v2_b2_li": dict(depths=(1, 1, 1, 1)),
    "twins_pcpvt_small": dict(depths=(1, 1, 1, 1)),
    "twins_svt_small": dict(depths=(2, 2, 2, 2)),
}
SIZES = [(224, 224), (200, 264)]
ABS_TOL, REL_TOL = 1e-4, 1e-5


@functools.lru_cache(maxsize=None)
def reference(name):
  """(timm model with perturbed weights, its state_dict as numpy, our model, our variables)."""
  from effvit.reference import timm_model
  kw = MODELS[name]
  tm = timm_model(name, **kw)
  perturb_torch(tm, seed=0)
  sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
  return tm, sd, create_model(name, **kw), from_torch_state_dict(name, sd, **kw)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_stage_maps_match_timm(torch_1thread, name, size):
  torch = torch_1thread
  tm, _, model, variables = reference(name)
  x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ref_logits = tm(xt).numpy()
    ref_maps = [nchw_to_nhwc(f) for f in tm.forward_intermediates(xt, intermediates_only=True)]
  logits, maps = logits_and_features(model, variables, x)

  assert np.abs(ref_logits).max() > 1.0   # the perturbation makes the comparison meaningful
  abs_err, rel_err = errors(logits, ref_logits)
  assert abs_err < ABS_TOL and rel_err < REL_TOL, (abs_err, rel_err)
  assert len(maps) == len(ref_maps) == 4
  for i, (ours, ref) in enumerate(zip(maps, ref_maps)):
    abs_err, rel_err = errors(ours, ref)   # errors() also checks the shapes
    assert rel_err < REL_TOL and abs_err < ABS_TOL * max(1.0, np.abs(ref).max()), (i, abs_err,
                                                                                   rel_err)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_norm_eps_matches_timm(torch_1thread, name):
  # eps only shows in outputs when a norm's input variance is tiny, so check it directly:
  # record every LayerNorm's epsilon and name it with the exporter's timm key.
  torch = torch_1thread
  tm, _, model, _ = reference(name)
  eps = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, LayerNorm) and context.method_name == "__call__":
      eps[("params", *context.module.path, "scale")] = np.float64(context.module.epsilon)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  from flax import traverse_util
  ours = to_torch_state_dict(name, traverse_util.unflatten_dict(eps))
  theirs = {f"{n}.weight": m.eps for n, m in tm.named_modules()
            if isinstance(m, torch.nn.LayerNorm)}
  assert {k: float(v) for k, v in ours.items()} == theirs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_round_trips_to_timm_state_dict(torch_1thread, name):
  _, sd, _, variables = reference(name)
  back = to_torch_state_dict(name, variables)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def to_original_pvt_v2_names(sd):
  """timm PVTv2 keys -> whai362/PVT v2 keys (refs/architectures.md §2.3)."""
  rules = [(r"^patch_embed\.", "patch_embed1."),
           (r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}."),
           (r"^stages\.(\d+)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}."),
           (r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}."),
           (r"\.mlp\.dwconv\.", ".mlp.dwconv.dwconv.")]
  out = {}
  for key, value in sd.items():
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_original_repo_names_convert_like_timm_names(torch_1thread, name):
  from timm.models.pvt_v2 import checkpoint_filter_fn
  tm, sd, _, variables = reference(name)
  original = to_original_pvt_v2_names(sd)
  assert {"patch_embed1.proj.weight", "block1.0.attn.q.weight", "norm1.weight",
          "block1.0.mlp.dwconv.dwconv.weight", "patch_embed2.proj.weight"} <= set(original)
  # The renaming above is the one timm itself undoes when loading original checkpoints.
  assert sorted(checkpoint_filter_fn(original, tm)) == sorted(sd)
  converted = from_torch_state_dict(name, original, **MODELS[name])
  flat = lambda v: jax.tree_util.tree_flatten_with_path(v)[0]
  assert [p for p, _ in flat(converted)] == [p for p, _ in flat(variables)]
  for (path, a), (_, b) in zip(flat(converted), flat(variables)):
    assert np.array_equal(a, b), path


def test_pvt_v2_logits_match_timm_with_the_cpu_kernels(torch_1thread, single_device):
  """As a single-device run executes PVTv2 at 224 px: the C++ LayerNorm, the fused ConvFFN on
  the 56-, 28- and 14-px maps, the conv + GELU kernel on the 7-px one and the few-keys
  attention kernel in every stage (the suite's 8 simulated devices otherwise keep XLA's
  path)."""
  torch = torch_1thread
  tm, _, model, variables = reference("pvt_v2_b0")
  x = np.random.default_rng(2).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    ref_logits = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  for target in ("effvit_convffn_f32", "effvit_depthwise_conv3x3_bias_gelu_f32",
                 "effvit_layer_norm_f32"):
    assert target in hlo, target
  assert hlo.count("@effvit_convffn_f32(") == 3   # one block per stage (depths 1)
  assert hlo.count("@effvit_attention_f32(") == 4   # 49 keys in each stage
  abs_err, rel_err = errors(logits_and_features(model, variables, x)[0], ref_logits)
  assert abs_err < ABS_TOL and rel_err < REL_TOL, (abs_err, rel_err)

"""Parameter counts: every variant against the reference table, and the table against the
closed-form formulas of refs/architectures.md §6 (which use neither our code nor the table).

Counts come from jax.eval_shape of `init`, so no weights are ever materialised.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effvit.models import create_model, list_models
from effvit.profile import count_params
from pyramid_helpers import compile_fast, random_variables, registered_abstract_variables

# refs/architectures.md §1.3, §2.4, §3.4 ([run] columns, i.e. sum(p.numel()) of the references).
REFERENCE_PARAMS = {
    "pvt_v1_tiny": 13_229_288, "pvt_v1_small": 24_485_864,
    "pvt_v1_medium": 44_208_104, "pvt_v1_large": 61_369_320,
    "pvt_v2_b0": 3_666_760, "pvt_v2_b1": 14_009_000, "pvt_v2_b2": 25_362_856,
    "pvt_v2_b2_li": 22_553_512, "pvt_v2_b3": 45_238_696, "pvt_v2_b4": 62_556_072,
    "pvt_v2_b5": 81_956_008,
    "twins_pcpvt_small": 24_106_216, "twins_pcpvt_base": 43_828_456,
    "twins_pcpvt_large": 60_989_672,
    "twins_svt_small": 24_060_776, "twins_svt_base": 56_070_952, "twins_svt_large": 99_271_400,
}


def abstract_params(model, size=224):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def test_every_registered_pyramid_has_a_reference_count():
  pyramids = {n for n in list_models() if n.startswith(("pvt_", "twins_"))}
  assert pyramids == set(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_equals_reference(name):
  assert count_params(registered_abstract_variables(name)["params"]) == REFERENCE_PARAMS[name]


# ---- closed forms (§6); hyper-parameters from the config tables §1.1, §2.1, §3.1 -------------

def lin(i, o):
  return i * o + o


def ln(c):
  return 2 * c


def sra_block(c, r, sr, *, dwconv=False, linear=False):
  h = int(r * c)
  n = ln(c) + lin(c, c) + lin(c, 2 * c) + lin(c, c) + ln(c) + lin(c, h) + lin(h, c)
  if linear:
    n += c * c + c + ln(c)             # 1x1 conv + norm after the 7x7 pool, in every stage
  elif sr > 1:
    n += c * c * sr * sr + c + ln(c)   # reduction conv + norm
  return n + (9 * h + h if dwconv else 0)


def lsa_block(c, r, *, dwconv=False):
  h = int(r * c)
  n = ln(c) + lin(c, 3 * c) + lin(c, c) + ln(c) + lin(c, h) + lin(h, c)
  return n + (9 * h + h if dwconv else 0)


def patch_embeds(dims, kernels, cin=3):
  total = 0
  for c, k in zip(dims, kernels):
    total += cin * c * k * k + c + ln(c)
    cin = c
  return total


def pvt_v1_formula(depths):
  dims, mlp, sr = (64, 128, 320, 512), (8, 8, 4, 4), (8, 4, 2, 1)
  n = patch_embeds(dims, (4, 2, 2, 2))
  n += sum(d * sra_block(c, r, s) for c, d, r, s in zip(dims, depths, mlp, sr))
  grids = (56, 28, 14, 7)                                        # 224 / stride
  n += sum((g * g + (i == 3)) * c for i, (g, c) in enumerate(zip(grids, dims)))  # pos embeds
  return n + dims[-1] + ln(dims[-1]) + lin(dims[-1], 1000)        # cls token, norm, head


def pvt_v2_formula(depths, dims=(64, 128, 320, 512), mlp=(8, 8, 4, 4), linear=False,
                   block=None):
  sr = (8, 4, 2, 1)
  n = patch_embeds(dims, (7, 3, 3, 3))
  for i, (c, d, r, s) in enumerate(zip(dims, depths, mlp, sr)):
    n += sum(block(i, j, c, r, s) if block else sra_block(c, r, s, dwconv=True, linear=linear)
             for j in range(d))
  return n + sum(ln(c) for c in dims) + lin(dims[-1], 1000)       # stage norms, head


def twins_formula(depths, dims, mlp, svt):
  sr = (8, 4, 2, 1)
  n = patch_embeds(dims, (4, 2, 2, 2))
  for c, d, r, s in zip(dims, depths, mlp, sr):
    # SVT: even blocks LSA, odd blocks GSA (= SRA); PCPVT: all GSA. One PEG per stage.
    n += sum(lsa_block(c, r) if svt and j % 2 == 0 else sra_block(c, r, s) for j in range(d))
    n += 9 * c + c
  return n + ln(dims[-1]) + lin(dims[-1], 1000)


PCPVT = dict(dims=(64, 128, 320, 512), mlp=(8, 8, 4, 4), svt=False)
FORMULAS = {
    "pvt_v1_tiny": lambda: pvt_v1_formula((2, 2, 2, 2)),
    "pvt_v1_small": lambda: pvt_v1_formula((3, 4, 6, 3)),
    "pvt_v1_medium": lambda: pvt_v1_formula((3, 4, 18, 3)),
    "pvt_v1_large": lambda: pvt_v1_formula((3, 8, 27, 3)),
    "pvt_v2_b0": lambda: pvt_v2_formula((2, 2, 2, 2), dims=(32, 64, 160, 256)),
    "pvt_v2_b1": lambda: pvt_v2_formula((2, 2, 2, 2)),
    "pvt_v2_b2": lambda: pvt_v2_formula((3, 4, 6, 3)),
    "pvt_v2_b2_li": lambda: pvt_v2_formula((3, 4, 6, 3), linear=True),
    "pvt_v2_b3": lambda: pvt_v2_formula((3, 4, 18, 3)),
    "pvt_v2_b4": lambda: pvt_v2_formula((3, 8, 27, 3)),
    "pvt_v2_b5": lambda: pvt_v2_formula((3, 6, 40, 3), mlp=(4, 4, 4, 4)),
    "twins_pcpvt_small": lambda: twins_formula((3, 4, 6, 3), **PCPVT),
    "twins_pcpvt_base": lambda: twins_formula((3, 4, 18, 3), **PCPVT),
    "twins_pcpvt_large": lambda: twins_formula((3, 8, 27, 3), **PCPVT),
    "twins_svt_small": lambda: twins_formula((2, 2, 10, 4), (64, 128, 256, 512), (4,) * 4, True),
    "twins_svt_base": lambda: twins_formula((2, 2, 18, 2), (96, 192, 384, 768), (4,) * 4, True),
    "twins_svt_large": lambda: twins_formula((2, 2, 18, 2), (128, 256, 512, 1024), (4,) * 4,
                                             True),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_closed_form_equals_reference_table(name):
  # Together with test_param_count_equals_reference this ties our count to two independent
  # sources: the measured reference and the architecture's own arithmetic.
  assert FORMULAS[name]() == REFERENCE_PARAMS[name]


# ---- the token mixer is a config value --------------------------------------------------------

MIXED = ("lsa/sra", "lsa/sra", "sra", "sra")


def mixed_b0_formula():
  def block(i, j, c, r, s):
    lsa = i < 2 and j % 2 == 0
    return lsa_block(c, r, dwconv=True) if lsa else sra_block(c, r, s, dwconv=True)
  return pvt_v2_formula((2, 2, 2, 2), dims=(32, 64, 160, 256), block=block)


def test_mixer_layout_from_config_builds_and_counts():
  # A list, as it arrives from a ConfigDict / the command line.
  params = abstract_params(create_model("pvt_v2_b0", mixers=list(MIXED)))
  assert count_params(params) == mixed_b0_formula()
  for i in range(4):
    for j in range(2):
      attn = params[f"stages_{i}"][f"blocks_{j}"]["attn"]
      if i < 2 and j == 0:
        assert set(attn) == {"qkv", "proj"}
        assert attn["qkv"]["kernel"].shape == (32 * 2 ** i, 3 * 32 * 2 ** i)
      else:
        assert "qkv" not in attn and {"q", "kv", "proj"} <= set(attn)
        assert ("sr" in attn) == (i < 3)


def test_mixer_layout_runs():
  model = create_model("pvt_v2_b0", mixers=MIXED, depths=(2, 2, 1, 1))
  x = np.random.default_rng(0).standard_normal((1, 64, 48, 3)).astype(np.float32)
  variables = random_variables(model, x.shape)
  logits = compile_fast(model.apply, variables, x)(variables, x)
  assert logits.shape == (1, 1000) and np.isfinite(np.asarray(logits)).all()
  maps = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), variables, x)
  assert [m.shape for m in maps] == [(1, 16, 12, 32), (1, 8, 6, 64), (1, 4, 3, 160),
                                     (1, 2, 2, 256)]

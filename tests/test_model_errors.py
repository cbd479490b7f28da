"""Bad input fails early with one line that names what to change.

Configuration mistakes fail in create_model; input sizes a model cannot take fail while the
forward is traced (jax.eval_shape: nothing is computed).
"""
import jax
import jax.numpy as jnp
import pytest

from effvit.errors import ConfigError
from effvit.models import create_model


def one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert msg and "\n" not in msg, msg
  return msg


def trace(model, h, w, c=3):
  x = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize("typo,expected", [("pvt_v2_b9", "pvt_v2_b5"),
                                           ("twins_svt_smal", "twins_svt_small"),
                                           ("pvt2_b0", "pvt_v2_b0"),
                                           ("pvt_tiny", "pvt_v1_tiny")])
def test_unknown_model_lists_closest_names(typo, expected):
  with pytest.raises(ConfigError) as e:
    create_model(typo)
  msg = one_line(e)
  assert repr(typo) in msg and expected in msg.split("did you mean")[1]


@pytest.mark.parametrize("name", ["pvt_v1_tiny", "twins_pcpvt_small", "twins_svt_small"])
def test_too_small_for_non_overlapping_patches(name):
  with pytest.raises(ConfigError) as e:
    trace(create_model(name), 16, 16)
  msg = one_line(e)
  assert "16x16" in msg and "32" in msg
  with pytest.raises(ConfigError, match="31x64"):
    trace(create_model(name), 31, 64)


def test_stage_map_smaller_than_sr_ratio():
  # PVTv2's overlapping embeds take any size, but a 24x24 input gives a 6x6 stage-1 map,
  # which the 8x8/8 reduction conv cannot cover (PyTorch fails there too).
  with pytest.raises(ConfigError) as e:
    trace(create_model("pvt_v2_b0"), 24, 24)
  msg = one_line(e)
  assert "6x6" in msg and "sr_ratio=8" in msg
  with pytest.raises(ConfigError, match="sr_ratio=16"):
    trace(create_model("pvt_v1_tiny", sr_ratios=(16, 4, 2, 1)), 32, 32)   # 8x8 map, R=16


def test_smallest_sizes_that_work_are_accepted():
  # The limits above are the real ones, not a blanket minimum.
  trace(create_model("pvt_v2_b0"), 29, 32)        # ceil: 8x8 stage-1 map = sr_ratio
  trace(create_model("twins_svt_small"), 32, 35)  # 1x1 last map; LSA pads every stage


def test_channels_first_input_is_rejected():
  with pytest.raises(ConfigError) as e:
    trace(create_model("pvt_v2_b0"), 3, 224, 224)
  assert "NHWC" in one_line(e)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(sr_ratios=(8, 4, 2)), r"one value per stage.*sr_ratios=3"),
    (dict(depths=(2, 2, 2, 2, 2)), r"one value per stage.*depths=5"),
    (dict(num_heads=(3, 2, 5, 8)), r"embed_dims\[0\]=32 must be divisible by num_heads\[0\]=3"),
    (dict(mixers=("sra", "sra", "swin", "sra")), r"unknown token mixer 'swin'"),
    (dict(mixers=("lsa/sra", "lsa/xformer", "sra", "sra")), r"unknown token mixer 'xformer'"),
    (dict(sr_ratio=(8, 4, 2, 1)), r"no setting 'sr_ratio'.*did you mean: sr_ratios"),
    (dict(dtype="bfloat"), r"unknown dtype 'bfloat'.*bfloat16"),
    (dict(dtype="int8"), r"unknown dtype"),
    (dict(depths=(2, 2, 0, 2)), r"depths\[2\]=0"),
    (dict(windows=(7, 0, 7, 7)), r"windows\[1\]=0"),
    (dict(ffn="conv"), r"unknown ffn 'conv'"),
])
def test_inconsistent_overrides_rejected_at_build(overrides, pattern):
  with pytest.raises(ConfigError, match=pattern) as e:
    create_model("pvt_v2_b0", **overrides)
  one_line(e)


def test_cls_token_needs_global_last_stage():
  # PVTv1's cls token cannot go through a reduction conv (refs/architectures.md §1.2).
  with pytest.raises(ConfigError, match="cls_token") as e:
    create_model("pvt_v1_tiny", sr_ratios=(8, 4, 2, 2))
  one_line(e)

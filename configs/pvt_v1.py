"""PVTv1 on ImageNet-1k: `--config=configs/pvt_v1.py:small` (tiny, small, medium, large).

Recipe of the PVT repo (classification/configs/pvt): configs/common.py's DeiT-style AdamW
schedule, drop path 0.1 for tiny/small and 0.3 for medium/large. Evaluation: crop 0.875
bicubic (DeiT's default; PVTv1 has no timm config).
"""
from configs import common

DROP_PATH = dict(tiny=0.1, small=0.1, medium=0.3, large=0.3)


def get_config(arg=None):
  arg = common.parse_arg(arg, **{**common.COMMON_ARGS, "variant": "small"})
  common.check_variant(arg, "PVTv1", list(DROP_PATH))
  c = common.base_config(f"pvt_v1_{arg.variant}", drop_path_rate=DROP_PATH[arg.variant])
  c.evals.val.crop_pct, c.evals.val.interpolation = 0.875, "bicubic"
  return common.apply_common_args(c, arg)

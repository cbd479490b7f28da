"""PVTv2 on ImageNet-1k: `--config=configs/pvt_v2.py:b2` (variants b0-b5, b2_li).

Recipe of the PVTv2 repo (classification/configs/pvt_v2): configs/common.py's DeiT-style
AdamW schedule; drop path 0.1 for b0/b1/b2/b2_li and 0.3 with gradient clipping at 1.0 for
b3/b4/b5. Evaluation at 224 with crop 0.9 bicubic (timm's pretrained config).
"""
from configs import common

DROP_PATH = dict(b0=0.1, b1=0.1, b2=0.1, b2_li=0.1, b3=0.3, b4=0.3, b5=0.3)


def get_config(arg=None):
  arg = common.parse_arg(arg, **{**common.COMMON_ARGS, "variant": "b2"})
  common.check_variant(arg, "PVTv2", list(DROP_PATH))
  c = common.base_config(f"pvt_v2_{arg.variant}", drop_path_rate=DROP_PATH[arg.variant])
  if arg.variant in ("b3", "b4", "b5"):
    c.optimizer.grad_clip_norm = 1.0
  c.evals.val.crop_pct, c.evals.val.interpolation = 0.9, "bicubic"
  return common.apply_common_args(c, arg)

"""LaViT on ImageNet-1k: `--config=configs/lavit.py:small` (tiny, small, base).

LaViT's recipe was not published in the sources we have (refs/lavit.md §7); we use the DeiT
defaults the paper cites (configs/common.py) with drop path 0.1 / 0.1 / 0.3 and the
diagonality-preserving loss weighted by `aux_loss_weights.dp_loss` = 0.1 (§5, §8-D).
"""
from configs import common

DROP_PATH = dict(tiny=0.1, small=0.1, base=0.3)


def get_config(arg=None):
  arg = common.parse_arg(arg, **{**common.COMMON_ARGS, "variant": "small"})
  common.check_variant(arg, "LaViT", list(DROP_PATH))
  c = common.base_config(f"lavit_{arg.variant}", drop_path_rate=DROP_PATH[arg.variant])
  c.evals.val.crop_pct, c.evals.val.interpolation = 0.9, "bicubic"
  return common.apply_common_args(c, arg)

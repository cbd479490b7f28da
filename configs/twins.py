"""Twins on ImageNet-1k: `--config=configs/twins.py:svt_small` (pcpvt_/svt_ small|base|large).

Recipe of the Twins repo: configs/common.py's DeiT-style AdamW schedule. Drop path 0.2 / 0.3 /
0.5 for small / base / large (the paper's setting as we recall it; the repo's main.py default
is 0.1 and its README trains SVT-B with 0.3). Evaluation: crop 0.9 bicubic (timm's config).
"""
from configs import common

DROP_PATH = dict(small=0.2, base=0.3, large=0.5)
VARIANTS = [f"{kind}_{size}" for kind in ("pcpvt", "svt") for size in DROP_PATH]


def get_config(arg=None):
  arg = common.parse_arg(arg, **{**common.COMMON_ARGS, "variant": "svt_small"})
  common.check_variant(arg, "Twins", VARIANTS)
  size = arg.variant.split("_")[-1]
  c = common.base_config(f"twins_{arg.variant}", drop_path_rate=DROP_PATH[size])
  c.evals.val.crop_pct, c.evals.val.interpolation = 0.9, "bicubic"
  return common.apply_common_args(c, arg)

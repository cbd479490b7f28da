"""PVTv1 (Wang et al. 2021) and PVTv2 (Wang et al. 2022) on the generic pyramid.

PVTv1: non-overlapping patch embeddings (4, 2, 2, 2), learned per-stage position embeddings
(bilinearly resized for other input sizes), a cls token in stage 4, SRA with R = 8, 4, 2, 1,
plain MLPs, one final norm, cls-token head.
PVTv2: overlapping patch embeddings (7/4, 3/2), no position embeddings (the depthwise conv in
the FFN supplies position), SRA (or linear SRA in `_li`), a norm after every stage, mean-pool
head. Numbers and names from refs/architectures.md §1-2; timm names for v2.
"""
from __future__ import annotations

from effvit.models.pyramid import PyramidConfig, PyramidTransformer
from effvit.models.registry import build_from_table, register

PVT_V1_BASE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                   sr_ratios=(8, 4, 2, 1), pos_embed="learned", cls_token=True)
PVT_V1 = {
    "tiny": dict(depths=(2, 2, 2, 2)),
    "small": dict(depths=(3, 4, 6, 3)),
    "medium": dict(depths=(3, 4, 18, 3)),
    "large": dict(depths=(3, 8, 27, 3)),
}

PVT_V2_BASE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                   sr_ratios=(8, 4, 2, 1), overlap_patch_embed=True, ffn="dwconv",
                   stage_norms=True, final_norm=False)
PVT_V2 = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(depths=(2, 2, 2, 2)),
    "b2": dict(depths=(3, 4, 6, 3)),
    "b2_li": dict(depths=(3, 4, 6, 3), mixers=("linear_sra",) * 4, ffn="dwconv_relu"),
    "b3": dict(depths=(3, 4, 18, 3)),
    "b4": dict(depths=(3, 8, 27, 3)),
    "b5": dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


def pvt_v1(variant: str, **overrides) -> PyramidTransformer:
  return build_from_table(PyramidConfig, PyramidTransformer, PVT_V1_BASE, PVT_V1[variant],
                          overrides, f"pvt_v1_{variant}")


def pvt_v2(variant: str, **overrides) -> PyramidTransformer:
  return build_from_table(PyramidConfig, PyramidTransformer, PVT_V2_BASE, PVT_V2[variant],
                          overrides, f"pvt_v2_{variant}")


for _v in PVT_V1:
  register(lambda _v=_v, **kw: pvt_v1(_v, **kw), name=f"pvt_v1_{_v}")
for _v in PVT_V2:
  register(lambda _v=_v, **kw: pvt_v2(_v, **kw), name=f"pvt_v2_{_v}")

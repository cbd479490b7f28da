"""Twins (Chu et al. 2021): PCPVT and SVT on the generic pyramid.

Both use non-overlapping patch embeddings (4, 2, 2, 2), a PEG (depthwise 3×3 conv, residual)
after the first block of every stage, plain MLPs, one final norm and a mean-pool head.
PCPVT: every block is global sub-sampled attention (= SRA, R = 8, 4, 2, 1), head dim 64.
SVT: blocks alternate LSA (7×7 windows) and GSA, starting with LSA; head dim 32.
Numbers and timm names from refs/architectures.md §3.
"""
from __future__ import annotations

from effvit.models.pyramid import PyramidConfig, PyramidTransformer
from effvit.models.registry import build_from_table, register

TWINS_BASE = dict(sr_ratios=(8, 4, 2, 1), pos_embed="peg", final_norm=True)
PCPVT_BASE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))
SVT_BASE = dict(mlp_ratios=(4, 4, 4, 4), windows=(7, 7, 7, 7), mixers=("lsa/sra",) * 4)
TWINS = {
    "pcpvt_small": dict(PCPVT_BASE, depths=(3, 4, 6, 3)),
    "pcpvt_base": dict(PCPVT_BASE, depths=(3, 4, 18, 3)),
    "pcpvt_large": dict(PCPVT_BASE, depths=(3, 8, 27, 3)),
    "svt_small": dict(SVT_BASE, embed_dims=(64, 128, 256, 512), depths=(2, 2, 10, 4),
                      num_heads=(2, 4, 8, 16)),
    "svt_base": dict(SVT_BASE, embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                     num_heads=(3, 6, 12, 24)),
    "svt_large": dict(SVT_BASE, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                      num_heads=(4, 8, 16, 32)),
}


def twins(variant: str, **overrides) -> PyramidTransformer:
  return build_from_table(PyramidConfig, PyramidTransformer, TWINS_BASE, TWINS[variant],
                          overrides, f"twins_{variant}")


for _v in TWINS:
  register(lambda _v=_v, **kw: twins(_v, **kw), name=f"twins_{_v}")

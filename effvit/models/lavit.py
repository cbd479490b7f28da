"""LaViT (Zhang et al., CVPR 2024) on the generic pyramid: PVTv2 layout with less attention.

The paper's per-stage table was not retrievable (refs/lavit.md §6, §8-A), so the layout is ours,
chosen to land near the published sizes while keeping PVTv2's proven pieces (overlapping patch
embeddings, depthwise-conv FFN, stage norms, mean-pool head, SRA with R = 8, 4, 2, 1):

    variant  dims             heads      depths     mlp   va_layers  params / GMACs@224 (published)
    tiny     64,128,320,448   1,2,5,7    2,2,2,2    4     2,2,1,1    11.37M / 1.567  (10.9M / 1.6)
    small    64,128,320,512   1,2,5,8    3,4,6,3    4     3,4,1,1    22.85M / 3.148  (22.4M / 3.3)
    base     64,128,320,512   1,2,5,8    3,4,18,3   4     3,4,1,1    40.75M / 5.822  (39.6M / 6.1)

Why:
- Every stage's mixer is "less". Stages 1-2 are all vanilla (va_layers = depth): Ψ would be
  N×N over 3136 or 784 queries (9.8M / 0.6M parameters a layer) and cost more than the Q·Kᵀ it
  replaces. Stages 3-4 have one VA layer and the rest LA (the recommended L_VA = 1).
- Keeping SRA keys in stage 3 (R = 2, so N×M = 196×49) makes LA cheaper there than VA, and at
  224 every stage has 7×7 keys, so the residual attention path connects all four stages
  (queries shrink 2×2 per stage, keys stay). Global attention in stage 3 (§8-A's suggestion)
  would cost more with LA than without (§3) and cut the residual path 2→3 (keys would grow).
- S and B are PVTv2-b2/b3 depths with MLP ratio 4 in stages 1-2 (PVTv2: 8): LaViT sits ~0.7 G
  below them and less attention saves only ~16 M MACs per stage-3 layer at 224; the stride-4/8
  FFNs are the cost that does not touch the attention layout.
- T: PVTv2-b1 depths with the same change still gives 13.0M (+19%); stage 4 holds half the
  parameters, so T narrows it to 448 (7 heads of 64), the smallest change that lands within 5%.

Cost of the mechanism (effvit.profile.model_cost; "all VA" = the same model with va_layers =
depths, i.e. every block a vanilla SRA layer; each model built with img_size = input size,
since Θ/Ψ are sized by the token counts):

    lavit_small   224: 3.148 GMACs, 22.85M    all VA: 3.280 GMACs, 24.71M    LA saves 4.0%
                  448: 18.087 GMACs, 26.06M   all VA: 15.073 GMACs, 24.71M   LA costs 20% MORE

Per LA layer at 224, stage 3 (h = 5, N = 196, M = 49): Θ + Ψ = h·N·M² + h·N²·M = 11.8 M
against 28.1 M skipped (Q, K projections and Q·Kᵀ); stage 4 (h = 8, N = M = 49): 1.9 M against
26.9 M. At 448 stage 3 has N = 784, M = 196: Ψ alone is 602 M MACs a layer against 150 M
skipped (+603 M a layer, five layers), and stage 4 (N = M = 196) breaks even. Less attention
with dense token maps is more expensive than attention wherever h·N·M exceeds about C²
(refs/lavit.md §3); at 224 the saving is real but small, because SRA already made attention
cheap and the FFNs dominate.
"""
from __future__ import annotations

from effvit.models.pvt import PVT_V2_BASE
from effvit.models.pyramid import PyramidConfig, PyramidTransformer
from effvit.models.registry import build_from_table, register

LAVIT_BASE = dict(PVT_V2_BASE, mixers=("less",) * 4, mlp_ratios=(4, 4, 4, 4))
LAVIT = {
    "tiny": dict(embed_dims=(64, 128, 320, 448), num_heads=(1, 2, 5, 7), depths=(2, 2, 2, 2),
                 va_layers=(2, 2, 1, 1)),
    "small": dict(depths=(3, 4, 6, 3), va_layers=(3, 4, 1, 1)),
    "base": dict(depths=(3, 4, 18, 3), va_layers=(3, 4, 1, 1)),
}


def lavit(variant: str, **overrides) -> PyramidTransformer:
  return build_from_table(PyramidConfig, PyramidTransformer, LAVIT_BASE, LAVIT[variant],
                          overrides, f"lavit_{variant}")


for _v in LAVIT:
  register(lambda _v=_v, **kw: lavit(_v, **kw), name=f"lavit_{_v}")

"""PVTv1 against a PyTorch reference (timm has no PVTv1).

The reference is assembled here from timm parts exactly as refs/architectures.md §1.2 writes
the forward: Conv(k=s)+LayerNorm(1e-5) patch embeds, a learned pos_embed per stage (resized
with F.interpolate(bilinear, align_corners=False) off the native grid, the cls entry kept), a
cls token joining in stage 4 only, blocks = timm Twins' GlobalSubSampleAttn block (identical
to PVTv1's SRA block, §3.1), a final LayerNorm(1e-6) and a head on the cls token. Its
parameters carry the original repo's names (§1.4), which the converter must accept.
"""
import functools

import flax.linen as nn
import numpy as np
import pytest

from effvit.convert import from_torch_state_dict, to_torch_state_dict
from effvit.models import create_model
from effvit.models.pyramid import PyramidStage
from pyramid_helpers import errors, logits_and_features, nchw_to_nhwc, perturb_torch
from pyramid_helpers import torch_1thread  # noqa: F401  (fixture)

# refs/architectures.md §1.1
DIMS, HEADS, MLP, SR = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1)
PATCH = (4, 2, 2, 2)
DEPTHS = (1, 1, 1, 1)   # reduced for speed; the full Tiny is only built for its param count


def build_reference(depths, img_size=224):
  import torch
  import torch.nn.functional as F
  from timm.models.twins import Block

  class PatchEmbed(torch.nn.Module):
    def __init__(self, cin, dim, patch):
      super().__init__()
      self.proj = torch.nn.Conv2d(cin, dim, patch, stride=patch)
      self.norm = torch.nn.LayerNorm(dim)    # eps 1e-5

    def forward(self, x):
      x = self.proj(x)
      return self.norm(x.flatten(2).transpose(1, 2)), x.shape[2:]

  class PVTv1(torch.nn.Module):
    def __init__(self):
      super().__init__()
      cin, grid = 3, img_size
      self.grids = []
      for i in range(4):
        grid //= PATCH[i]
        self.grids.append(grid)
        setattr(self, f"patch_embed{i + 1}", PatchEmbed(cin, DIMS[i], PATCH[i]))
        setattr(self, f"pos_embed{i + 1}",
                torch.nn.Parameter(torch.zeros(1, grid * grid + (i == 3), DIMS[i])))
        setattr(self, f"block{i + 1}", torch.nn.ModuleList(
            Block(DIMS[i], HEADS[i], MLP[i],
                  norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                  sr_ratio=SR[i], ws=1) for _ in range(depths[i])))
        cin = DIMS[i]
      self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, DIMS[-1]))
      self.norm = torch.nn.LayerNorm(DIMS[-1], eps=1e-6)
      self.head = torch.nn.Linear(DIMS[-1], 1000)

    def pos_embed(self, i, hw):
      pos, n0 = getattr(self, f"pos_embed{i + 1}"), self.grids[i]
      if tuple(hw) == (n0, n0):
        return pos
      extra = pos.shape[1] - n0 * n0
      grid = pos[:, extra:].reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
      grid = F.interpolate(grid, size=tuple(hw), mode="bilinear", align_corners=False)
      return torch.cat([pos[:, :extra], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_stages(self, x):
      maps, b = [], x.shape[0]
      for i in range(4):
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        if i == 3:
          x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embed(i, hw)
        for blk in getattr(self, f"block{i + 1}"):
          x = blk(x, tuple(hw))
        maps.append(x[:, x.shape[1] - hw[0] * hw[1]:].reshape(b, *hw, -1).permute(0, 3, 1, 2))
        if i < 3:
          x = maps[-1]
      return x, maps

    def forward(self, x):
      x, _ = self.forward_stages(x)
      return self.head(self.norm(x)[:, 0])

  return PVTv1().eval()


@functools.lru_cache(maxsize=None)
def reference():
  ref = build_reference(DEPTHS)
  perturb_torch(ref, seed=3)
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  return ref, sd, create_model("pvt_v1_tiny", depths=DEPTHS), \
      from_torch_state_dict("pvt_v1_tiny", sd, depths=DEPTHS)


def test_reference_is_pvt_v1(torch_1thread):
  # The reference built at Tiny's depths has Tiny's published parameter count and §1.4's keys.
  full = build_reference((2, 2, 2, 2))
  assert sum(p.numel() for p in full.parameters()) == 13_229_288
  keys = set(full.state_dict())
  assert {"pos_embed1", "pos_embed4", "cls_token", "patch_embed1.proj.weight",
          "patch_embed1.norm.weight", "block1.0.norm1.weight", "block1.0.attn.q.weight",
          "block1.0.attn.kv.weight", "block1.0.attn.proj.weight", "block1.0.attn.sr.weight",
          "block1.0.attn.norm.weight", "block1.0.mlp.fc1.weight", "block1.0.mlp.fc2.weight",
          "norm.weight", "head.weight"} <= keys
  assert "block4.0.attn.sr.weight" not in keys
  assert tuple(full.pos_embed4.shape) == (1, 50, 512)


@pytest.mark.parametrize("size", [(224, 224), (200, 264)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_and_stage_maps_match_reference(torch_1thread, size):
  # 200x264 gives 50x66, 25x33, 12x16, 6x8 maps: every pos_embed is resized (up in W, down in H).
  torch = torch_1thread
  ref, _, model, variables = reference()
  x = np.random.default_rng(2).standard_normal((2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ref_logits = ref(xt).numpy()
    ref_maps = [nchw_to_nhwc(m) for m in ref.forward_stages(xt)[1]]
  logits, maps = logits_and_features(model, variables, x)
  assert np.abs(ref_logits).max() > 1.0
  abs_err, rel_err = errors(logits, ref_logits)
  assert abs_err < 1e-4 and rel_err < 1e-5, (abs_err, rel_err)
  for i, (ours, theirs) in enumerate(zip(maps, ref_maps)):
    abs_err, rel_err = errors(ours, theirs)
    assert rel_err < 1e-5, (i, abs_err, rel_err)


def test_export_round_trips_to_original_names(torch_1thread):
  _, sd, _, variables = reference()
  back = to_torch_state_dict("pvt_v1_tiny", variables)
  assert sorted(back) == sorted(sd)
  assert all(np.array_equal(back[k], v) for k, v in sd.items())


class PosEmbedProbe(PyramidStage):
  """Just the stage's position-embedding lookup (it needs a compact context to own its param)."""

  @nn.compact
  def __call__(self, hw, with_cls):
    return self.learned_pos_embed(hw, with_cls)


@pytest.mark.parametrize("stage,hw", [(0, (56, 56)), (0, (50, 66)), (1, (9, 41)),
                                      (3, (6, 8)), (3, (7, 7)), (3, (11, 3))])
def test_pos_embed_resize_matches_torch_interpolate(torch_1thread, stage, hw):
  torch = torch_1thread
  cfg = create_model("pvt_v1_tiny").config
  n0, dim, with_cls = 56 // 2 ** stage, DIMS[stage], stage == 3
  pos = np.random.default_rng(stage).standard_normal((1, n0 * n0 + with_cls, dim)).astype(
      np.float32)
  ours = PosEmbedProbe(cfg, stage, (0.0,) * 2).apply({"params": {"pos_embed": pos}}, hw, with_cls)
  grid = torch.from_numpy(pos[:, with_cls:]).reshape(1, n0, n0, dim).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=hw, mode="bilinear", align_corners=False)
  ref = np.concatenate([pos[:, :with_cls], grid.flatten(2).transpose(1, 2).numpy()], axis=1)
  assert ours.shape == ref.shape
  if hw == (n0, n0):   # the native grid is used as is
    assert np.array_equal(np.asarray(ours), pos)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-6, atol=2e-6)   # float32 round-off

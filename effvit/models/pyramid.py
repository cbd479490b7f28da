"""A generic four-stage pyramid vision transformer, built from per-stage specs.

PVTv1, PVTv2, Twins-PCPVT, Twins-SVT and LaViT are all tables of values for this one module
(see pvt.py, twins.py, lavit.py). Every stage i runs

    x, (H, W) = PatchEmbed_i(x)                       # stride 4, then 2, 2, 2
    [x = concat(cls, x)]  [x = x + pos_embed_i]       # PVTv1 only
    for each block j:  x = x + DropPath(Mixer_ij(LN(x)))  ;  x = x + DropPath(FFN_ij(LN(x)))
                       [x = PEG_i(x) after block 0]   # Twins only
    [x = LN(x)]                                       # PVTv2 stage norm

and the head pools (mean over tokens, or the cls token), normalises and classifies.

The token mixer of each stage is a string, so a layout is a config value: a "/"-separated
cycle over the stage's blocks of
    mhsa        global multi-head self-attention
    sra         spatial-reduction attention with the stage's sr_ratio (R = 1: global)
    linear_sra  linear SRA, average-pooled to the stage's pool_size
    lsa         locally-grouped attention in the stage's window
    less        LaViT less attention: the first va_layers "less" blocks compute attention (with
                the stage's sr_ratio), the rest transform the previous "less" block's matrix
e.g. Twins-SVT is ("lsa/sra",)*4 and a PVTv2 with windowed stages 1-2 is
("lsa/sra", "lsa/sra", "sra", "sra").

Parameter names follow timm's PVTv2 layout with every stage uniform (`stages_i/patch_embed`,
`stages_i/blocks_j/{norm1,attn,norm2,mlp}`, `stages_i/norm`, `stages_i/pos_block`, `norm`,
`head`), so effvit.convert maps PyTorch checkpoints by renaming keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit.attention.locally_grouped import LocallyGroupedAttention
from effvit.attention.spatial_reduction import SpatialReductionAttention
from effvit.errors import ConfigError, closest
from effvit.layers import PEG, Dense, DropPath, Mlp, PatchEmbed, layer_norm, tokens_to_map

Dtype = Any

MIXER_KINDS = ("mhsa", "sra", "linear_sra", "lsa", "less")
FFN_KINDS = ("mlp", "dwconv", "dwconv_relu")
POS_EMBED_KINDS = ("none", "learned", "peg")
# Fields given per stage; they must all have one entry per stage.
PER_STAGE = ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios", "mixers",
             "windows", "pool_sizes", "patch_strides")


def resolve_dtype(dtype) -> Any:
  """'bfloat16' / jnp.bfloat16 / np.dtype -> a jnp scalar type; a clear error otherwise."""
  names = ("float32", "bfloat16", "float16")
  try:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in names:
    raise ConfigError(f"unknown dtype {dtype!r}{closest(str(name), names)}; choose from "
                      + ", ".join(names))
  return getattr(jnp, name)


def block_mixer_kinds(spec: str, depth: int) -> list[str]:
  """'lsa/sra' over 4 blocks -> ['lsa', 'sra', 'lsa', 'sra']."""
  cycle = [s.strip() for s in spec.split("/")]
  return [cycle[j % len(cycle)] for j in range(depth)]


@dataclasses.dataclass(frozen=True)
class PyramidConfig:
  """Everything that defines a pyramid; validated on construction."""
  num_classes: int = 1000
  in_chans: int = 3
  embed_dims: Sequence[int] = (64, 128, 320, 512)
  depths: Sequence[int] = (3, 4, 6, 3)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  mixers: Sequence[str] = ("sra", "sra", "sra", "sra")
  windows: Sequence[int] = (7, 7, 7, 7)
  pool_sizes: Sequence[int] = (7, 7, 7, 7)
  patch_strides: Sequence[int] = (4, 2, 2, 2)
  overlap_patch_embed: bool = False    # PVTv2: kernel 2s-1 (7, 3, 3, 3), padding k//2
  ffn: str = "mlp"                     # "mlp" | "dwconv" (PVTv2) | "dwconv_relu" (PVTv2-li)
  pos_embed: str = "none"              # "none" | "learned" (PVTv1) | "peg" (Twins)
  cls_token: bool = False              # PVTv1: a cls token joins in the last stage
  stage_norms: bool = False            # PVTv2: LayerNorm at the end of every stage
  final_norm: bool = True              # PVTv1 / Twins: one LayerNorm before the head
  img_size: int = 224                  # native size of learned position embeddings
  qkv_bias: bool = True
  lsa_masked: bool = False             # mask padded LSA keys instead of timm's zero padding
  drop_rate: float = 0.0               # dropout before the head and inside MLPs
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  # Less attention (LaViT): see effvit/attention/less.py for the equations and each default.
  va_layers: Sequence[int] = (1, 1, 1, 1)  # vanilla layers first in each "less" stage; rest LA
  la_input: str = "probs"              # what VA hands to LA: "probs" (literal) | "logits"
  la_share_heads: bool = True          # one Θ/Ψ per layer for all heads
  la_identity_init: bool = True        # Θ = Ψ = I, zero bias (else trunc-normal .02)
  la_residual: bool = True             # residual attention downsampling across stages
  la_residual_on: str = "probs"        # add it to the post-softmax A (literal) | "logits"
  la_residual_ds: str = "pool"         # shrink the grids by "pool" | "conv" (learned, k = s)
  la_dp_loss: str = "bounded"          # diagonality loss "bounded" | "literal" | "none" (not
                                       # sown); its λ is the trainer's aux_loss_weights.dp_loss
  remat: bool = False                  # recompute each block's activations in the backward
                                       # pass (jax.checkpoint): less memory, ~1/3 more compute
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for f in dataclasses.fields(self):   # lists from configs / the command line -> tuples
      if isinstance(getattr(self, f.name), list):
        object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
    for f in ("dtype", "param_dtype"):
      object.__setattr__(self, f, resolve_dtype(getattr(self, f)))
    self.validate()

  def validate(self):
    n = len(self.depths)
    lengths = {f: len(getattr(self, f)) for f in PER_STAGE}
    if any(v != n for v in lengths.values()):
      raise ConfigError("per-stage settings must all have one value per stage, got lengths "
                        + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    for i in range(n):
      dim, heads = self.embed_dims[i], self.num_heads[i]
      if self.depths[i] < 1:
        raise ConfigError(f"depths[{i}]={self.depths[i]}: every stage needs at least one block")
      if heads < 1 or dim % heads:
        raise ConfigError(f"embed_dims[{i}]={dim} must be divisible by num_heads[{i}]={heads}")
      for field in ("sr_ratios", "windows", "pool_sizes", "patch_strides"):
        if getattr(self, field)[i] < 1:
          raise ConfigError(f"{field}[{i}]={getattr(self, field)[i]} must be a positive integer")
      for kind in block_mixer_kinds(self.mixers[i], self.depths[i]):
        if kind not in MIXER_KINDS:
          raise ConfigError(f"unknown token mixer {kind!r} in mixers[{i}]={self.mixers[i]!r}; "
                            f"choose from {', '.join(MIXER_KINDS)} ('/' alternates them)")
    if self.ffn not in FFN_KINDS:
      raise ConfigError(f"unknown ffn {self.ffn!r}; choose from {', '.join(FFN_KINDS)}")
    if self.pos_embed not in POS_EMBED_KINDS:
      raise ConfigError(f"unknown pos_embed {self.pos_embed!r}; choose from "
                        f"{', '.join(POS_EMBED_KINDS)}")
    if any(any(self.less_roles(i)) for i in range(n)):
      from effvit.attention.less import check_config  # LaViT; imported lazily
      check_config(self)
    if self.cls_token:
      kinds = set(block_mixer_kinds(self.mixers[-1], self.depths[-1]))
      if kinds - {"mhsa", "sra"} or ("sra" in kinds and self.sr_ratios[-1] != 1):
        raise ConfigError("cls_token needs global attention in the last stage: set its mixer to "
                          "'sra' with sr_ratios[-1]=1, or 'mhsa'")

  def block_drop_path_rates(self) -> list[list[float]]:
    """Stochastic depth rising linearly over all blocks of the network, split per stage."""
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    starts = np.cumsum([0, *self.depths])
    return [rates[starts[i]:starts[i + 1]] for i in range(len(self.depths))]

  def min_input_size(self) -> int:
    return 1 if self.overlap_patch_embed else int(np.prod(self.patch_strides))

  def token_grids(self, hw: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Token grid of every stage for an input of size hw (default img_size x img_size)."""
    h, w = hw or (self.img_size, self.img_size)
    grids = []
    for s in self.patch_strides:  # overlapping embeddings pad to ceil sizes, the others floor
      h, w = (-(-h // s), -(-w // s)) if self.overlap_patch_embed else (h // s, w // s)
      grids.append((h, w))
    return grids

  def less_roles(self, stage: int) -> list[str | None]:
    """Per block of a stage: "va" / "la" for "less" blocks (first va_layers are VA), else None."""
    roles, seen = [], 0
    for kind in block_mixer_kinds(self.mixers[stage], self.depths[stage]):
      if kind != "less":
        roles.append(None)
        continue
      va = stage < len(self.va_layers) and seen < self.va_layers[stage]
      roles.append("va" if va else "la")
      seen += 1
    return roles


class PyramidTransformer(nn.Module):
  """Four-stage pyramid transformer; see the module docstring for the stage recipe."""
  config: PyramidConfig

  def features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """The stage outputs as NHWC maps (strides 4, 8, 16, 32 by default)."""
    return self(x, train, return_features=True)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
      raise ConfigError(f"expected NHWC images with {cfg.in_chans} channels, got shape "
                        f"{tuple(x.shape)}")
    h, w = x.shape[1:3]
    if min(h, w) < cfg.min_input_size():
      raise ConfigError(f"input {h}x{w} is too small for this model: non-overlapping patch "
                        f"embeddings with strides {tuple(cfg.patch_strides)} need H and W >= "
                        f"{cfg.min_input_size()}")
    if any("la" in cfg.less_roles(i) for i in range(len(cfg.depths))):
      from effvit.attention.less import check_input  # LaViT: Θ/Ψ fix the token counts
      check_input(cfg, (h, w))
    dprs = cfg.block_drop_path_rates()
    maps, carry, tokens = [], None, None
    for i in range(len(cfg.depths)):
      tokens, hw, carry = PyramidStage(cfg, i, tuple(dprs[i]), name=f"stages_{i}")(
          x, carry, deterministic=not train)
      x = tokens_to_map(tokens[:, tokens.shape[1] - hw[0] * hw[1]:], hw)  # drop a cls token
      maps.append(x)
    if return_features:
      return maps
    if cfg.final_norm:
      tokens = layer_norm(1e-6, "norm")(tokens)
    pooled = tokens[:, 0] if cfg.cls_token else tokens.mean(axis=1)
    pooled = nn.Dropout(cfg.drop_rate)(pooled, deterministic=not train)
    if cfg.num_classes <= 0:
      return pooled
    return Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name="head")(pooled).astype(jnp.float32)


class PyramidStage(nn.Module):
  cfg: PyramidConfig
  index: int
  drop_path_rates: Sequence[float]

  @nn.compact
  def __call__(self, x: jax.Array, carry: Any, *, deterministic: bool):
    cfg, i = self.cfg, self.index
    stride = cfg.patch_strides[i]
    kernel = 2 * stride - 1 if cfg.overlap_patch_embed else stride
    x, hw = PatchEmbed(cfg.embed_dims[i], kernel, stride, overlap=cfg.overlap_patch_embed,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="patch_embed")(x)
    last = i == len(cfg.depths) - 1
    if cfg.cls_token and last:
      cls = self.param("cls_token", nn.initializers.truncated_normal(0.02),
                       (1, 1, cfg.embed_dims[i]), cfg.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])).astype(x.dtype),
                           x], axis=1)
    if cfg.pos_embed == "learned":
      x = x + self.learned_pos_embed(hw, with_cls=cfg.cls_token and last).astype(x.dtype)
      x = nn.Dropout(cfg.drop_rate)(x, deterministic=deterministic)
    kinds = block_mixer_kinds(cfg.mixers[i], cfg.depths[i])
    # hw and deterministic are Python values: static under remat.
    block_cls = nn.remat(Block, static_argnums=(2, 4)) if cfg.remat else Block
    for j, kind in enumerate(kinds):
      x, out = block_cls(cfg, i, j, kind, self.drop_path_rates[j], name=f"blocks_{j}")(
          x, hw, carry, deterministic)
      # LaViT: in a stage with "less" blocks, other mixers pass the last attention through.
      carry = carry if kind != "less" and "less" in kinds else out
      if j == 0 and cfg.pos_embed == "peg":
        x = PEG(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="pos_block")(x, hw)
    if cfg.stage_norms:
      x = layer_norm(1e-6, "norm")(x)
    return x, hw, carry

  def learned_pos_embed(self, hw: tuple[int, int], with_cls: bool) -> jax.Array:
    """PVTv1's per-stage embedding, resized bilinearly (no antialias) off the native grid."""
    cfg, i = self.cfg, self.index
    n0 = cfg.img_size // int(np.prod(cfg.patch_strides[:i + 1]))
    extra = 1 if with_cls else 0
    pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                     (1, n0 * n0 + extra, cfg.embed_dims[i]), cfg.param_dtype)
    if hw == (n0, n0):
      return pos
    grid = pos[:, extra:].reshape(1, n0, n0, -1)
    grid = jax.image.resize(grid, (1, *hw, grid.shape[-1]), "bilinear", antialias=False)
    return jnp.concatenate([pos[:, :extra], grid.reshape(1, hw[0] * hw[1], -1)], axis=1)


def build_mixer(cfg: PyramidConfig, stage: int, block: int, kind: str) -> nn.Module:
  common = dict(num_heads=cfg.num_heads[stage], qkv_bias=cfg.qkv_bias,
                attn_drop_rate=cfg.attn_drop_rate, proj_drop_rate=cfg.drop_rate,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="attn")
  if kind == "mhsa":
    return SpatialReductionAttention(sr_ratio=1, **common)
  if kind == "sra":
    return SpatialReductionAttention(sr_ratio=cfg.sr_ratios[stage], **common)
  if kind == "linear_sra":
    return SpatialReductionAttention(linear=True, pool_size=cfg.pool_sizes[stage], **common)
  if kind == "lsa":
    return LocallyGroupedAttention(window=cfg.windows[stage], masked=cfg.lsa_masked, **common)
  if kind == "less":
    from effvit.attention.less import build_less_attention  # LaViT; imported lazily
    return build_less_attention(cfg, stage, block, common)
  raise ConfigError(f"unknown token mixer {kind!r}")


class Block(nn.Module):
  """Pre-norm transformer block: x += DP(mixer(LN(x))); x += DP(FFN(LN(x)))."""
  cfg: PyramidConfig
  stage: int
  index: int
  kind: str
  drop_path_rate: float

  @nn.compact
  def __call__(self, x, hw, carry, deterministic: bool = True):
    cfg, i = self.cfg, self.stage
    y, carry = build_mixer(cfg, i, self.index, self.kind)(
        layer_norm(1e-6, "norm1")(x), hw, deterministic=deterministic, carry=carry)
    x = x + DropPath(self.drop_path_rate)(y, deterministic)
    y = Mlp(int(cfg.embed_dims[i] * cfg.mlp_ratios[i]), dwconv=cfg.ffn != "mlp",
            relu=cfg.ffn == "dwconv_relu", drop_rate=cfg.drop_rate, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, name="mlp")(layer_norm(1e-6, "norm2")(x), hw,
                                                     deterministic)
    return x + DropPath(self.drop_path_rate)(y, deterministic), carry

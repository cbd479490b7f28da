"""ResNeSt (Zhang et al. 2020): ResNet-D bottlenecks whose 3×3 conv is Split Attention.

    stem:  conv1_0 3×3/2 (sw) -> BN -> ReLU -> conv1_3 3×3 (sw) -> BN -> ReLU
           -> conv1_6 3×3 (2sw) -> bn1 -> ReLU -> max-pool 3×3/2 (pad 1)              stride 4
    layerX_Y (planes P = 64, 128, 256, 512; group width gw = ⌊P·base_width/64⌋·K):
           y = ReLU(BN(conv1 1×1 -> gw)(x))
           [y = AvgPool 3×3/s, pad 1 (pads counted)]       avd_first: before the split attention
           y = SplitAttention(gw, R, K)(y)                 effvit/attention/split.py
           [y = AvgPool 3×3/s, pad 1 (pads counted)]       default: after it
           y = BN(conv3 1×1 -> 4P)(y)
           out = ReLU(shortcut(x) + DropPath(y))
    shortcut: identity, or in a stage's first block [AvgPool 2×2/s (ceil mode, pads not
           counted: an odd map's last row/column averages only real pixels)] -> 1×1 conv -> BN
    head:  global average pool -> dropout -> fc

The stride s = 2 of layer2..4 sits in the avd pools ("average downsampling"), not in the
conv. Names follow timm's state_dict (`conv1_0` <-> `conv1.0`, `layer2_0/conv2/fc1`,
`downsample_1`), so effvit.convert loads timm and original-repo checkpoints with no renames.
BatchNorm follows PyTorch (eps 1e-5, momentum 0.1 = flax 0.9, unbiased running variance; see
effvit.layers.BatchNorm): params hold scale/bias, "batch_stats" the running statistics.

Stochastic depth is the standard form: each block drops its residual branch y per sample,
rates rising linearly from 0 to drop_path_rate over all blocks. timm's ResNestBottleneck
instead applies drop path to the block *input* x before the downsample: in a stage's first
block it zeroes the shortcut's input while the branch always survives, and in every other
block the dropped x is never used, so nothing is dropped (refs §4.3, §8.6). Both are the
identity in eval mode, so converted weights give the same logits either way.
Variants and numbers: refs/architectures.md §4.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from effvit.attention.split import SplitAttention, attention_width
from effvit.errors import ConfigError
from effvit.layers import BatchNorm, Dense, DropPath, GroupedConv, PatchConv, conv_init
from effvit.models.pyramid import resolve_dtype
from effvit.models.registry import build_from_table, register
from effvit.pooling import avg_pool, max_pool

Dtype = Any
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNeStConfig:
  """Everything that defines a ResNeSt; validated on construction."""
  num_classes: int = 1000
  in_chans: int = 3
  depths: Sequence[int] = (3, 4, 6, 3)
  planes: Sequence[int] = (64, 128, 256, 512)   # bottleneck unit per stage; outputs 4·planes
  stem_width: int = 32                          # "d" models 32, "e" models 64
  radix: int = 2                                # R splits per cardinal group (1: sigmoid gate)
  cardinality: int = 1                          # K cardinal groups
  base_width: int = 64                          # group width gw = ⌊planes·base_width/64⌋·K
  avd: bool = True                              # stride in a 3×3 avg pool, not in the conv
  avd_first: bool = False                       # that pool before the split attention
  drop_rate: float = 0.0                        # dropout before fc
  drop_path_rate: float = 0.0
  remat: bool = False                           # recompute each bottleneck's activations in
                                                # the backward pass (jax.checkpoint)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for f in ("depths", "planes"):   # lists from configs / the command line -> tuples
      object.__setattr__(self, f, tuple(getattr(self, f)))
    for f in ("dtype", "param_dtype"):
      object.__setattr__(self, f, resolve_dtype(getattr(self, f)))
    self.validate()

  def validate(self):
    if len(self.depths) != len(self.planes) or not self.depths:
      raise ConfigError(f"depths {self.depths} and planes {self.planes} need one value per stage")
    if min(self.depths) < 1:
      raise ConfigError(f"depths={self.depths}: every stage needs at least one block")
    if self.stem_width < 1:
      raise ConfigError(f"stem_width={self.stem_width} must be a positive integer")
    for i, p in enumerate(self.planes):
      if int(p * self.base_width / 64) < 1:
        raise ConfigError(f"base_width={self.base_width} leaves stage {i} (planes={p}) with no "
                          "channels per cardinal group: increase base_width")
      attention_width(self.group_width(p), self.radix, self.cardinality)
    for f in ("drop_rate", "drop_path_rate"):
      if not 0.0 <= getattr(self, f) < 1.0:
        raise ConfigError(f"{f}={getattr(self, f)} must lie in [0, 1)")

  def group_width(self, planes: int) -> int:
    return int(planes * self.base_width / 64) * self.cardinality

  def block_drop_path_rates(self) -> list[list[float]]:
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
    starts = np.cumsum([0, *self.depths])
    return [rates[starts[i]:starts[i + 1]] for i in range(len(self.depths))]


def avg_pool_ceil(x: jax.Array, s: int) -> jax.Array:
  """PyTorch AvgPool2d(s, s, ceil_mode=True, count_include_pad=False) on NHWC."""
  pad = ((0, -x.shape[1] % s), (0, -x.shape[2] % s))
  return avg_pool(x, s, s, pad, count_include_pad=False)


class ResNeSt(nn.Module):
  """ResNeSt backbone + classifier; see the module docstring for the recipe."""
  config: ResNeStConfig

  def features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """The layer1..4 outputs as NHWC maps (strides 4, 8, 16, 32)."""
    return self(x, train, return_features=True)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
      raise ConfigError(f"expected NHWC images with {cfg.in_chans} channels, got shape "
                        f"{tuple(x.shape)}")
    if min(x.shape[1:3]) < 1:
      raise ConfigError(f"input {x.shape[1]}x{x.shape[2]} is too small: H and W must be >= 1")
    if train and x.shape[0] < 2:
      # As in PyTorch: split attention's bn1 normalises the pooled (B, A) context over B.
      raise ConfigError("train=True needs a batch of at least 2 images: BatchNorm over the "
                        "pooled split-attention context has one value per channel otherwise")
    # nn.Conv's parameters; stride 1 gets the C++ filter gradient (effvit.layers.conv3x3).
    conv = lambda f, name, stride=1: GroupedConv(
        f, 3, strides=stride, padding=1, use_bias=False, kernel_init=conv_init(),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    norm = lambda name: BatchNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)

    sw = cfg.stem_width
    x = nn.relu(norm("conv1_1")(conv(sw, "conv1_0", 2)(x), train))
    x = nn.relu(norm("conv1_4")(conv(sw, "conv1_3")(x), train))
    x = nn.relu(norm("bn1")(conv(2 * sw, "conv1_6")(x), train))
    x = max_pool(x, 3, 2, ((1, 1), (1, 1)))   # pads are -inf

    maps = []
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if cfg.remat else Bottleneck
    for i, rates in enumerate(cfg.block_drop_path_rates()):
      for j, rate in enumerate(rates):
        x = block_cls(cfg, cfg.planes[i], 2 if i > 0 and j == 0 else 1, rate,
                      name=f"layer{i + 1}_{j}")(x, train)
      maps.append(x)
    if return_features:
      return maps
    x = x.astype(jnp.float32).mean(axis=(1, 2))
    x = nn.Dropout(cfg.drop_rate)(x, deterministic=not train)
    if cfg.num_classes <= 0:
      return x
    return Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                 name="fc")(x).astype(jnp.float32)


class Bottleneck(nn.Module):
  """ResNeSt bottleneck: 1×1 -> split attention (+ avd pool) -> 1×1, average-pool shortcut."""
  cfg: ResNeStConfig
  planes: int
  stride: int
  drop_path_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg, s = self.cfg, self.stride
    gw, out_ch = cfg.group_width(self.planes), EXPANSION * self.planes
    # 1×1 convs as matmuls (PatchConv with k = 1): same parameters, ~2x faster on XLA:CPU.
    conv = lambda f, name: PatchConv(f, 1, use_bias=False, dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, name=name)
    norm = lambda name, **kw: BatchNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                                        **kw)
    avd = cfg.avd and s > 1
    avd_pool = lambda t: avg_pool(t, 3, s, ((1, 1), (1, 1)), count_include_pad=True)

    y = nn.relu(norm("bn1")(conv(gw, "conv1")(x), train))
    if avd and cfg.avd_first:
      y = avd_pool(y)
    y = SplitAttention(gw, cfg.radix, cfg.cardinality, stride=1 if avd else s, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, name="conv2")(y, train)
    if avd and not cfg.avd_first:
      y = avd_pool(y)
    # bn3 starts at zero (timm's zero_init_last), so every block starts as its shortcut.
    y = norm("bn3", scale_init=nn.initializers.zeros)(conv(out_ch, "conv3")(y), train)

    shortcut = x
    if s != 1 or x.shape[-1] != out_ch:
      if s != 1:
        shortcut = avg_pool_ceil(x, s)
      shortcut = norm("downsample_2")(conv(out_ch, "downsample_1")(shortcut), train)
    y = DropPath(self.drop_path_rate)(y, deterministic=not train)
    return nn.relu(y + shortcut)


RESNEST = {
    "resnest14d": dict(depths=(1, 1, 1, 1)),
    "resnest26d": dict(depths=(2, 2, 2, 2)),
    "resnest50d": dict(depths=(3, 4, 6, 3)),
    "resnest101e": dict(depths=(3, 4, 23, 3), stem_width=64),
    "resnest200e": dict(depths=(3, 24, 36, 3), stem_width=64),
    "resnest269e": dict(depths=(3, 30, 48, 8), stem_width=64),
    # The "fast" ablation models of the paper: pool before the split attention.
    "resnest50d_4s2x40d": dict(depths=(3, 4, 6, 3), radix=4, cardinality=2, base_width=40,
                               avd_first=True),
    "resnest50d_1s4x24d": dict(depths=(3, 4, 6, 3), radix=1, cardinality=4, base_width=24,
                               avd_first=True),
}


def resnest(variant: str, **overrides) -> ResNeSt:
  return build_from_table(ResNeStConfig, ResNeSt, {}, RESNEST[variant], overrides, variant)


for _v in RESNEST:
  register(lambda _v=_v, **kw: resnest(_v, **kw), name=_v)

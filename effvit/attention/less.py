"""Less attention (LaViT, Zhang et al., CVPR 2024): most layers reuse attention, few compute it.

The blocks of a stage whose mixer is "less" are, in order, L = va_layers[m] vanilla-attention
(VA) layers and then less-attention (LA) layers. A stage has N = H·W query tokens and, through
the stage's spatial reduction (as in SRA, R = sr_ratios[m]), M = ⌊H/R⌋·⌊W/R⌋ key tokens
(M = N for R = 1); h heads of width d; X_r = LN(Conv_{k=s=R}(X)), or X for R = 1.

    VA:  Q = X Wq,  [K | V] = X_r Wkv,   S = Q_i K_iᵀ · d^-½                   (B, h, N, M)
         P = softmax(S) + Res                (la_residual_on="probs")   or softmax(S + Res)
         hands on A = P                      (la_input="probs")         or its logits ("logits")
    LA:  V = X_r Wv                          (no Q, no K)
         A^l = Ψ(Θ(A^{l-1})ᵀ)ᵀ = W_Ψᵀ A^{l-1} W_Θ + (W_Ψᵀ 1) b_Θᵀ + b_Ψ 1ᵀ
               Θ: dense M→M over the key axis,  Ψ: dense N→N over the query axis
         P = softmax(A^l),  hands on A^l (pre-softmax, as the paper's recursion reads)
    both: Z = concat_i(P_i V_i) Wo

Residual attention downsampling, in the first VA layer of stage m when stage m-1 ends with a
less block (its last attention P' on grids q', k'):

    Res = γ_h · Σ_g W_gh · DS(P')_g,    W: 1×1 map over heads h_{m-1} → h_m (init 1/h_{m-1}),
                                        γ ∈ R^h (LayerScale, init 0: training starts vanilla)
    DS  "pool": queries averaged over the adaptive bins of the new query grid (2×2 at the
        stride-2 patch merge), keys summed over those of the new key grid (mass kept, so
        rows stay distributions); "conv": per-head convs k = s = the grid ratio, initialised
        to that average / sum (needs whole-number ratios).
    Skipped, with no parameters, where a grid would have to grow (keys 7×7 → 14×14 when an
    SRA stage precedes a global one): up-sampling an attention matrix invents structure.

Diagonality-preserving (DP) loss, LA layers, training-mode apply only, on the M×M matrix of key
cells S̄ (rows of P averaged over the R×R queries of each key; S̄ = P for R = 1):

    "bounded" (default):  mean_bhij |S̄_ij − S̄_ji| + mean_bhi ReLU(mean_{j≠i} S̄_ij − S̄_ii)
    "literal":            mean_bh [Σ_ij |Ā_ij − Ā_ji| + Σ_i ((M−1) Ā_ii − Σ_{j≠i} Ā_ij)], Ā from A^l

sown as `losses/dp_loss` ("none": not computed); the literal value is sown as
`metrics/dp_literal` whenever the "metrics" collection is mutable. The trainer minimises
CE + λ · mean over layers of dp_loss, λ = config.aux_loss_weights.dp_loss (configs/common.py,
default 0.1, as refs/lavit.md §5 recommends; ablate {0, 0.01, 1}).

Open choices (refs/lavit.md §8), each a PyramidConfig field; defaults and why:
  va_layers (1 per stage)    the paper's L_VA is unknown; 1 is the recommendation (ablate 2).
  la_input "probs"           literal: the first LA layer transforms the VA's post-softmax A.
                             With "logits" and identity Θ/Ψ an LA layer exactly reuses the VA
                             attention; with "probs" it starts near uniform (softmax of [0, 1]).
  la_share_heads True        one Θ/Ψ per layer for all heads; per-head maps cost h× parameters.
  la_identity_init True      Θ = Ψ = I, zero bias: LA starts as "reuse the previous attention".
  la_residual True           the paper's residual path; off for ablation.
  la_residual_on "probs"     literal: added to the post-softmax A, not renormalised.
  la_residual_ds "pool"      parameter-free and valid at any grid ratio; "conv" is the
                             recollected depthwise conv (the same map at init, learnable, whole
                             ratios only).
  la_dp_loss "bounded"       the literal form pushes the diagonal down and is unbounded below
                             on pre-softmax values (both toy re-implementations switched it off).
With SRA keys the attention is N×M, so the DP terms use the key-cell matrix S̄ above, the one
square reading in which "diagonal" means "attends to its own place".

Resolution: Θ and Ψ are dense over token positions, so their sizes are the stage's key and
query counts at PyramidConfig.img_size. Another input size is a ConfigError naming the img_size
to build with (no resize: a resampled N×N position map has no principled meaning). VA-only
stages and the residual path ("pool") work at any size.

Cost (multiply-accumulates per LA layer): Θ h·N·M² + Ψ h·N²·M, against the Q and K
projections (N·C² + M·C²) and Q·Kᵀ (N·M·C) it saves; the SR conv (N·C²) stays because V needs
it. So LA is cheaper only while h·N·M·(N+M) < C²·(N+M) + N·M·C, roughly h·N·M < C²: true for
lavit_small at 224 (stage 3: 5·196·49 vs 320²), false at 448 (5·784·196), where the model costs
20% more than with attention everywhere; models/lavit.py has the measured totals.

Parameter names: VA layers use SRA's (`q`, `kv`, `sr`, `norm`, `proj`), so weights move between
"sra" and all-VA "less" models unchanged; LA layers have `v`, `sr`, `norm`, `proj`, `theta`,
`psi`; the first VA layer of a stage adds `res_heads`, `res_gamma` (and `res_q_kernel`,
`res_k_kernel` with "conv").
"""
from __future__ import annotations

from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from effvit.attention import core
from effvit.attention.spatial_reduction import SpatialReductionAttention, adaptive_pool_matrix
from effvit.errors import ConfigError
from effvit.layers import Dense, dense_init

Dtype = Any
Grid = tuple[int, int]

LOSSES_COLLECTION = "losses"
METRICS_COLLECTION = "metrics"
LA_INPUTS = ("probs", "logits")
RESIDUAL_ON = ("probs", "logits")
RESIDUAL_DS = ("pool", "conv")
DP_LOSSES = ("bounded", "literal", "none")


@struct.dataclass
class LessCarry:
  """What a less block hands to the next block (and across the stage boundary)."""
  matrix: jax.Array                          # (B, h, N, M) input of a following LA layer
  probs: jax.Array                           # (B, h, N, M) the weights this layer applied to V
  q_hw: Grid = struct.field(pytree_node=False)
  k_hw: Grid = struct.field(pytree_node=False)


def reduced_grid(hw: Grid, sr_ratio: int) -> Grid:
  """Key grid of SRA's conv k = s = R (VALID, floor); the query grid itself for R = 1."""
  return hw if sr_ratio == 1 else (hw[0] // sr_ratio, hw[1] // sr_ratio)


def can_shrink(src: Grid, dst: Grid) -> bool:
  return dst[0] <= src[0] and dst[1] <= src[1]


def residual_grids(cfg, stage: int) -> tuple[Grid, Grid, Grid, Grid] | None:
  """(q', k', q, k) native grids of the residual path into `stage`, or None where it is skipped."""
  if not cfg.la_residual or stage == 0 or not any(cfg.less_roles(stage - 1)):
    return None
  grids = cfg.token_grids()
  q0, q1 = grids[stage - 1], grids[stage]
  k0, k1 = reduced_grid(q0, cfg.sr_ratios[stage - 1]), reduced_grid(q1, cfg.sr_ratios[stage])
  return (q0, k0, q1, k1) if can_shrink(q0, q1) and can_shrink(k0, k1) else None


def check_config(cfg) -> None:
  """LaViT-specific checks of a PyramidConfig that uses the "less" mixer (one-line errors)."""
  for field, value, choices in (("la_input", cfg.la_input, LA_INPUTS),
                                ("la_residual_on", cfg.la_residual_on, RESIDUAL_ON),
                                ("la_residual_ds", cfg.la_residual_ds, RESIDUAL_DS),
                                ("la_dp_loss", cfg.la_dp_loss, DP_LOSSES)):
    if value not in choices:
      raise ConfigError(f"unknown {field} {value!r}; choose from {', '.join(choices)}")
  n = len(cfg.depths)
  if len(cfg.va_layers) != n:
    raise ConfigError(f"va_layers needs one value per stage ({n}), got {tuple(cfg.va_layers)}")
  grids = cfg.token_grids()
  for i in range(n):
    roles = cfg.less_roles(i)
    n_less = sum(r is not None for r in roles)
    if not n_less:
      continue
    va = cfg.va_layers[i]
    if va < 1:
      raise ConfigError(f"va_layers[{i}]={va}: a 'less' stage must start with a vanilla layer "
                        f"(LA layers transform an earlier layer's attention); set "
                        f"va_layers[{i}] >= 1")
    if va > n_less:
      raise ConfigError(f"va_layers[{i}]={va} exceeds the {n_less} 'less' blocks of stage {i} "
                        f"(depths[{i}]={cfg.depths[i]}); set va_layers[{i}] <= {n_less}")
    (h, w), r = grids[i], cfg.sr_ratios[i]
    if min(h, w) < r or min(h, w) < 1:
      raise ConfigError(f"img_size={cfg.img_size} gives a {h}x{w} token grid in stage {i}, "
                        f"smaller than sr_ratios[{i}]={r}; raise img_size or lower sr_ratios[{i}]")
    res = residual_grids(cfg, i) if cfg.la_residual_ds == "conv" else None
    if res and any(s % d for a, b in ((res[0], res[2]), (res[1], res[3])) for s, d in zip(a, b)):
      raise ConfigError(f"la_residual_ds='conv' needs grids that shrink by whole factors, but "
                        f"stage {i - 1} -> {i} at img_size={cfg.img_size} maps {res[0]} -> "
                        f"{res[2]} queries, {res[1]} -> {res[3]} keys; use la_residual_ds='pool'")


def check_input(cfg, hw: Grid) -> None:
  """Θ/Ψ are sized for img_size: any other input size is a ConfigError saying what to change."""
  grids, native = cfg.token_grids(hw), cfg.token_grids()
  for i in range(len(cfg.depths)):
    if "la" in cfg.less_roles(i) and grids[i] != native[i]:
      g, n = grids[i], native[i]
      square = "" if hw[0] == hw[1] else " (less attention needs square inputs)"
      raise ConfigError(f"input {hw[0]}x{hw[1]} gives a {g[0]}x{g[1]} token grid in stage {i}, "
                        f"but its less-attention maps Θ/Ψ are sized for {n[0]}x{n[1]} "
                        f"(img_size={cfg.img_size}); feed {cfg.img_size}x{cfg.img_size} images "
                        f"or build the model with img_size={max(hw)}{square}")


# ---------------------------------------------------------------------------------------------
# Diagonality-preserving loss.

def key_cell_matrix(a: jax.Array, q_hw: Grid, k_hw: Grid, cell: int) -> jax.Array:
  """(B, h, N, M) -> (B, h, M, M): rows averaged over the cell×cell queries under each key."""
  if q_hw == k_hw:
    return a
  b, h, _, m = a.shape
  x = a.reshape(b, h, *q_hw, m)[:, :, :k_hw[0] * cell, :k_hw[1] * cell]
  x = x.reshape(b, h, k_hw[0], cell, k_hw[1], cell, m).mean(axis=(3, 5))
  return x.reshape(b, h, m, m)


def dp_loss_bounded(p: jax.Array) -> jax.Array:
  """Symmetry + hinge "diagonal >= mean off-diagonal" on square (..., M, M) probabilities."""
  p = p.astype(jnp.float32)
  m = p.shape[-1]
  loss = jnp.abs(p - jnp.swapaxes(p, -1, -2)).mean()
  if m < 2:
    return loss
  diag = jnp.diagonal(p, axis1=-2, axis2=-1)
  off_mean = (p.sum(-1) - diag) / (m - 1)
  return loss + jax.nn.relu(off_mean - diag).mean()


def dp_loss_literal(a: jax.Array) -> jax.Array:
  """The recollected paper formula on square (B, h, M, M) matrices, summed, mean over B and h."""
  a = a.astype(jnp.float32)
  m = a.shape[-1]
  sym = jnp.abs(a - jnp.swapaxes(a, -1, -2)).sum((-2, -1))
  diag = jnp.diagonal(a, axis1=-2, axis2=-1)
  dia = ((m - 1) * diag - (a.sum(-1) - diag)).sum(-1)
  return (sym + dia).mean()


# ---------------------------------------------------------------------------------------------
# Residual downsampling of the previous stage's attention.

def _bins(src: int, dst: int, mass: bool) -> np.ndarray:
  """(dst, src): adaptive-average bins; with `mass`, each source split over its bins (sums)."""
  m = adaptive_pool_matrix(src, dst)
  if mass:
    m = (m > 0).astype(np.float32)
    m /= m.sum(0, keepdims=True)
  return m


def _shrink_last(x: jax.Array, src: Grid, dst: Grid, mass: bool,
                 kernel: jax.Array | None) -> jax.Array:
  """Maps the last axis of (B, g, n, src-grid tokens) onto dst-grid tokens."""
  if src == dst:
    return x
  b, g, n, _ = x.shape
  x = x.reshape(b, g, n, *src)
  if kernel is None:
    ph, pw = (jnp.asarray(_bins(s, d, mass)) for s, d in zip(src, dst))
    x = jnp.einsum("bgnhw,ph,qw->bgnpq", x, ph, pw)
  else:
    if src != (dst[0] * kernel.shape[1], dst[1] * kernel.shape[2]):
      raise ConfigError(f"la_residual_ds='conv' was built for a {kernel.shape[1]}x"
                        f"{kernel.shape[2]} shrink but this input maps {src} -> {dst}; run at "
                        "the model's img_size or use la_residual_ds='pool'")
    x = x.reshape(b, g, n, dst[0], kernel.shape[1], dst[1], kernel.shape[2])
    x = jnp.einsum("bgniajc,gac->bgnij", x, kernel)
  return x.reshape(b, g, n, dst[0] * dst[1])


# ---------------------------------------------------------------------------------------------
# Modules.

def _identity(key, shape, dtype=jnp.float32):
  return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


class TokenMap(nn.Module):
  """Dense map over one token axis of (B, h, N, M) attention: Θ (keys, axis -1) or Ψ (queries,
  axis -2), shared by all heads (`heads=0`) or one per head."""
  size: int
  heads: int = 0
  identity_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, a: jax.Array, axis: int) -> jax.Array:
    lead = (self.heads,) if self.heads else ()
    w = self.param("kernel", _identity if self.identity_init else dense_init,
                   (*lead, self.size, self.size), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (*lead, self.size), self.param_dtype)
    per = "h" if self.heads else ""
    eq = f"bhnm,{per}mk->bhnk" if axis == -1 else f"bhnm,{per}nk->bhkm"
    # Output in the compute dtype, then float32 for the softmax: XLA:CPU has no bf16 x bf16 ->
    # f32 dot for these layouts (dots accumulate in float32 either way).
    y = jnp.einsum(eq, a.astype(self.dtype), w.astype(self.dtype)).astype(jnp.float32)
    bias = bias.astype(jnp.float32)
    bias = bias.reshape(*(lead or (1,)), *((1, self.size) if axis == -1 else (self.size, 1)))
    return y + bias


class LessAttention(SpatialReductionAttention):
  """The mixer of one "less" block: vanilla attention (`la=False`) or less attention."""
  la: bool = False
  grid: Grid = (0, 0)                        # query grid at img_size: sizes Ψ (and Θ, via sr)
  la_input: str = "probs"
  share_heads: bool = True
  identity_init: bool = True
  residual_from: tuple | None = None         # (heads, q', k') of the previous stage at img_size
  residual_on: str = "probs"
  residual_ds: str = "pool"
  dp_loss: str = "bounded"

  @nn.compact
  def __call__(self, x: jax.Array, hw: Grid, *, deterministic: bool = True, carry: Any = None):
    c = x.shape[-1]
    if c % self.num_heads:
      raise ConfigError(f"dim {c} is not divisible by num_heads={self.num_heads}")
    dense = lambda f, name, bias=True: Dense(f, use_bias=bias, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
    x_r = self.reduce(x, hw)
    k_hw = reduced_grid(hw, self.sr_ratio)
    if self.la:
      a = self.transform(carry, hw, k_hw)
      v = core.split_heads(dense(c, "v", self.qkv_bias)(x_r), self.num_heads)
      probs = jax.nn.softmax(a, axis=-1)
      self.diagonality(a, probs, hw, k_hw, deterministic)
      out_carry = LessCarry(a, probs, hw, k_hw)
    else:
      q = core.split_heads(dense(c, "q", self.qkv_bias)(x), self.num_heads)
      kv = dense(2 * c, "kv", self.qkv_bias)(x_r)
      k, v = (core.split_heads(t, self.num_heads) for t in (kv[..., :c], kv[..., c:]))
      s = core.attention_logits(q, k)
      res = self.residual(carry, hw, k_hw)
      if res is not None and self.residual_on == "logits":
        s = s + res
      probs = jax.nn.softmax(s, axis=-1)
      if res is not None and self.residual_on == "probs":
        probs = probs + res                  # literal: no renormalisation
      out_carry = LessCarry(probs if self.la_input == "probs" else s, probs, hw, k_hw)
    if self.is_mutable_collection(core.ATTENTION_COLLECTION) and not self.is_initializing():
      self.sow(core.ATTENTION_COLLECTION, "probs", probs)
    weights = probs
    if self.attn_drop_rate and not deterministic:
      weights = nn.Dropout(self.attn_drop_rate)(probs, deterministic=False)
    out = dense(c, "proj")(core.merge_heads(core.apply_attention(weights, v)))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic), out_carry

  def transform(self, carry: Any, hw: Grid, k_hw: Grid) -> jax.Array:
    """A^l = Ψ(Θ(A^{l-1})ᵀ)ᵀ in float32."""
    if not isinstance(carry, LessCarry):
      raise ConfigError("a less-attention (LA) layer needs the attention of an earlier 'less' "
                        "block of its stage; set va_layers >= 1 for this stage")
    if hw != self.grid:
      raise ConfigError(f"less attention's Θ/Ψ are sized for the {self.grid[0]}x{self.grid[1]} "
                        f"token grid of the model's img_size, but this input gives {hw[0]}x"
                        f"{hw[1]}; build the model with img_size set to the input size")
    native_k = reduced_grid(self.grid, self.sr_ratio)
    heads = 0 if self.share_heads else self.num_heads
    tmap = lambda size, name: TokenMap(size, heads, self.identity_init, self.dtype,
                                       self.param_dtype, name=name)
    a = tmap(native_k[0] * native_k[1], "theta")(carry.matrix, axis=-1)
    return tmap(self.grid[0] * self.grid[1], "psi")(a, axis=-2)

  def residual(self, carry: Any, hw: Grid, k_hw: Grid) -> jax.Array | None:
    """γ · heads(DS(P')) from the previous stage's last attention, or None (skipped)."""
    if self.residual_from is None:
      return None
    prev_heads, q0, k0 = self.residual_from
    h = self.num_heads
    kq = kk = None
    if self.residual_ds == "conv":             # per-head k = s = ratio, equal to the pool at init
      k1 = reduced_grid(self.grid, self.sr_ratio)
      conv = lambda name, a, b, mass: None if a == b else self.param(
          name, lambda _, s: jnp.full(s, 1.0 if mass else 1.0 / (s[1] * s[2]), self.param_dtype),
          (prev_heads, a[0] // b[0], a[1] // b[1]))
      kq, kk = conv("res_q_kernel", q0, self.grid, False), conv("res_k_kernel", k0, k1, True)
    heads = self.param("res_heads", nn.initializers.constant(1.0 / prev_heads),
                       (prev_heads, h), self.param_dtype)
    gamma = self.param("res_gamma", nn.initializers.zeros, (h,), self.param_dtype)
    if not isinstance(carry, LessCarry):
      return None
    if not (can_shrink(carry.q_hw, hw) and can_shrink(carry.k_hw, k_hw)):
      return None                            # a grid would have to grow at this input size
    p = carry.probs.astype(jnp.float32)
    p = jnp.swapaxes(_shrink_last(jnp.swapaxes(p, -1, -2), carry.q_hw, hw, False, kq),
                     -1, -2)
    p = _shrink_last(p, carry.k_hw, k_hw, True, kk)
    p = jnp.einsum("bgnm,gh->bhnm", p, heads.astype(jnp.float32))
    return p * gamma.astype(jnp.float32)[:, None, None]

  def diagonality(self, a: jax.Array, probs: jax.Array, hw: Grid, k_hw: Grid,
                  deterministic: bool) -> None:
    if self.is_initializing():
      return
    square = lambda t: key_cell_matrix(t, hw, k_hw, self.sr_ratio)
    if self.is_mutable_collection(METRICS_COLLECTION):
      self.sow(METRICS_COLLECTION, "dp_literal", dp_loss_literal(square(a)))
    if not deterministic and self.dp_loss != "none":
      loss = (dp_loss_bounded(square(probs)) if self.dp_loss == "bounded"
              else dp_loss_literal(square(a)))
      self.sow(LOSSES_COLLECTION, "dp_loss", loss)


def build_less_attention(cfg, stage: int, block: int, common: dict) -> LessAttention:
  """The "less" mixer of block `block` of stage `stage` of a PyramidConfig."""
  roles = cfg.less_roles(stage)
  residual_from = None
  if roles.index("va") == block:             # first less block: the residual path enters here
    grids = residual_grids(cfg, stage)
    if grids is not None:
      residual_from = (cfg.num_heads[stage - 1], grids[0], grids[1])
  return LessAttention(
      sr_ratio=cfg.sr_ratios[stage], la=roles[block] == "la", grid=cfg.token_grids()[stage],
      la_input=cfg.la_input, share_heads=cfg.la_share_heads, identity_init=cfg.la_identity_init,
      residual_from=residual_from, residual_on=cfg.la_residual_on,
      residual_ds=cfg.la_residual_ds, dp_loss=cfg.la_dp_loss, **common)

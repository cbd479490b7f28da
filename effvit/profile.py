"""Model cost: parameter counts and GMACs.

GMACs follow the PVT / Twins / ResNeSt papers (and fvcore / torch's flop counter): one
multiply-accumulate per term of every convolution and matrix product, attention products
included, elementwise work excluded. They are counted exactly from the shapes of the
`dot_general` and `conv_general_dilated` equations of the traced forward pass. XLA's own
cost analysis of the compiled forward is reported next to it (`xla_gflops`); it also counts
softmax, GELU, norms and adds, so it runs 5-15% above the papers' numbers.

`python -m effvit.profile --config=...` adds compile times, images/s and memory per resolution,
optionally against timm (effvit/profile_cli.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend import core as jcore


def tune_cpu_allocator() -> bool:
  """Make glibc keep freed memory in the process: no mmap for large blocks, no trimming, one
  arena (mallopt; like MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<max size_t>
  MALLOC_ARENA_MAX=1 in the environment). Returns False where glibc is not the allocator.

  XLA:CPU (and PyTorch) allocate every large buffer afresh each step; glibc serves those with
  mmap and returns them with munmap, so every page is faulted in and zeroed again on every
  step. On the project's 2-core VM that costs ~0.5 ms per MB touched: 8x on a large
  elementwise op, 2x on a whole pvt_v2_b2 forward. Call it once, early, in a process that
  computes on the CPU; the price is that the process keeps its peak memory.
  The trim threshold must be unbounded (-1 is SIZE_MAX to glibc): with 2**31 - 1, a step whose
  temporaries exceed 2 GiB (pvt_v2_b2 training at batch 32) still had its heap trimmed and
  re-faulted every step, which was half of its CPU time.
  """
  import ctypes
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return (libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_arena_max, 1) == 1
            and libc.mallopt(m_trim_threshold, -1) == 1)
  except (OSError, AttributeError):
    return False


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    contract = math.prod(lhs[d] for d in lc)
    batch = math.prod(lhs[d] for d in lb)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params[
        "dimension_numbers"][1][1])
    return batch * lhs_free * rhs_free * contract
  if name == "conv_general_dilated":
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    # rhs spec: (out_feature_dim, in_feature_dim, *spatial); macs/output = in/g * prod(kernel)
    in_per_group = rhs[dn.rhs_spec[1]]
    kernel = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return math.prod(out) * in_per_group * kernel // eqn.params["batch_group_count"]
  if name == "ffi_call" and eqn.params["target_name"] in ("effvit_convffn_f32", "effvit_mlp_f32"):
    # the fused ConvFFN and MLP (effvit.layers.fused_convffn, fused_mlp): fc1, [the 3×3
    # depthwise conv,] fc2; x, W1, ..., W2, b2
    x, w1, w2 = (eqn.invars[i].aval.shape for i in (0, 1, -2))
    taps = 9 if eqn.params["target_name"] == "effvit_convffn_f32" else 0
    return math.prod(x[:-1]) * w1[1] * (x[-1] + taps + w2[1])
  if name == "ffi_call" and eqn.params["target_name"] == "effvit_attention_f32":
    # effvit.attention.core.few_keys_attention: Q Kᵀ and P V, N·M·d each per batch and head
    (b, n, h, d), m = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[1]
    return 2 * b * n * m * h * d
  if name == "custom_vjp_call" and _custom_name(eqn) in ("depthwise_conv", "depthwise_conv_gelu",
                                                         "biased_conv_gelu"):
    # effvit.layers' depthwise convs are shifted adds or a C++ call: kh·kw MACs per output
    # element, as the grouped conv they replace.
    kh, kw = eqn.invars[1].aval.shape[:2]
    return math.prod(eqn.outvars[0].aval.shape) * kh * kw
  return 0


def _custom_name(eqn) -> str:
  """Name of the Python function behind a custom_vjp_call equation ('' if unknown)."""
  info = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
  src = getattr(info, "func_src_info", None) or ""
  return src.split(" ")[0]


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    macs = _eqn_macs(eqn)
    total += macs
    if macs:   # counted whole (a depthwise conv): not its inner ops or C++ call again
      continue
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in _subjaxprs(eqn):
      total += mult * _jaxpr_macs(sub)
  return total


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def count_macs(fn: Callable, *args) -> int:
  """Multiply-accumulates of fn(*args) (args may be ShapeDtypeStructs)."""
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def model_cost(model, image_size: int | tuple[int, int] = 224, batch: int = 1,
               variables: Any = None, xla: bool = False) -> dict:
  """{'params', 'gmacs'[, 'xla_gflops']} of a model's inference forward at one input size."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jax.ShapeDtypeStruct((batch, h, w, model_in_chans(model)), jnp.float32)
  if variables is None:
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  fwd = lambda v, x: model.apply(v, x)
  out = {"params": count_params(variables.get("params", {})),
         "gmacs": count_macs(fwd, variables, x) / batch / 1e9}
  if xla:
    cost = jax.jit(fwd).lower(variables, x).cost_analysis()
    out["xla_gflops"] = float(cost["flops"]) / batch / 1e9
  return out


def model_in_chans(model) -> int:
  return getattr(getattr(model, "config", None), "in_chans", 3)


def main(argv: list[str] | None = None) -> None:
  """`python -m effvit.profile --config=... [--resolutions=224,448] [--batch=8]
  [--compare-timm] [--dtype=bfloat16]`: see effvit/profile_cli.py."""
  from effvit import profile_cli   # its absl flags exist only when the command line is used
  profile_cli.run(argv)


if __name__ == "__main__":
  main()
